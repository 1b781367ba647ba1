"""Narrow towers: a multi-task model whose layers are too small for intra-op threads.

Four task towers of 16 x Linear(128) + ReLU read one input, batch 128, and a head
sums them. Each matrix product is about 4 MFLOP, too small for torch's intra-op thread
pool to pay: on the 2-core development host the eager step runs only 1.10x faster on
two threads than on one (`experiments/results/runtime_scaling_narrow.md`), so `unplaced`
gains little from the second core, while two 1-core devices running two towers each
gain more. A workload where a placement over `cpu:0,cpu:1` beats the model run without
placer on a host without GPUs (docs/results.md, "Beating unplaced").

    placer optimize experiments/workloads/narrow_towers.py --devices cpu:0,cpu:1
"""

from __future__ import annotations

import torch
from torch import nn

BATCH, WIDTH, DEPTH, TOWERS = 128, 128, 16, 4


class NarrowTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())])
            for _ in range(TOWERS))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(sum(tower(x) for tower in self.towers))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return NarrowTowers()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1)),)


def expert_placement(module_path: str, n_devices: int) -> int | None:
    """Tower i on device i mod n; the input and the head with tower 0."""
    parts = module_path.split(".")
    if len(parts) >= 2 and parts[0] == "towers":
        return int(parts[1]) % n_devices
    return 0
