"""Independent towers: four MLP stacks of unequal cost read one input and meet only at the end.

The fastest placement on k devices runs whole towers side by side; any heuristic that
cuts the topological order into blocks (balanced, sequential fill) or deals groups
round robin sends activations across devices inside a tower. A search that moves one
group at a time must pass through placements with extra crossings to move a tower.

    placer optimize experiments/workloads/towers.py --devices cpu:0,cpu:1
"""

from __future__ import annotations

import torch
from torch import nn

BATCH, IN = 256, 256
TOWERS = ((768, 6), (768, 6), (512, 8), (1024, 3))  # (width, depth): unequal costs


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleList()
        for width, depth in TOWERS:
            layers: list[nn.Module] = [nn.Linear(IN, width), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.towers.append(nn.Sequential(*layers))
        self.head = nn.Linear(sum(w for w, _ in TOWERS), 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([tower(x) for tower in self.towers], dim=1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Towers()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(BATCH, IN, generator=torch.Generator().manual_seed(1)),)


def expert_placement(module_path: str, n_devices: int) -> int | None:
    """Tower i on device i mod n; the input and the head with tower 0."""
    parts = module_path.split(".")
    if len(parts) >= 2 and parts[0] == "towers":
        return int(parts[1]) % n_devices
    return 0
