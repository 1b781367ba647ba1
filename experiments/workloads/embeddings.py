"""Embedding tables: a DLRM-style recommender with six tables of very unequal size.

Dense features go through a bottom MLP; each sparse feature looks up a bag of rows in
its own table; the pooled embeddings and the dense vector meet in a top MLP. The
tables hold most of the memory and their optimizer step most of the update time, but
little of the compute: a good placement spreads the tables' updates and the MLPs'
compute, and keeps the crossings (one small pooled vector per table) few.

    placer optimize experiments/workloads/embeddings.py --devices cpu:0,cpu:1
"""

from __future__ import annotations

import torch
from torch import nn

BATCH, DENSE, DIM, BAG = 512, 64, 64, 8
TABLES = (200_000, 100_000, 50_000, 20_000, 5_000, 1_000)  # rows per table


class Recommender(nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(DENSE, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                    nn.Linear(256, DIM), nn.ReLU())
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, DIM, mode="sum") for rows in TABLES)
        width = DIM * (len(TABLES) + 1)
        self.top = nn.Sequential(nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                                 nn.Linear(512, 1))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        pooled = [self.bottom(dense)] + [table(sparse[:, i]) for i, table in enumerate(self.tables)]
        return self.top(torch.cat(pooled, dim=1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Recommender()


def example_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    sparse = torch.stack([torch.randint(0, rows, (BATCH, BAG), generator=g) for rows in TABLES], dim=1)
    return torch.randn(BATCH, DENSE, generator=g), sparse


def loss_fn(output: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(output.squeeze(1), (dense[:, 0] > 0).float())


def expert_placement(module_path: str, n_devices: int) -> int | None:
    """Tables dealt over the devices, largest first; both MLPs on device 0."""
    parts = module_path.split(".")
    if len(parts) >= 2 and parts[0] == "tables":
        return int(parts[1]) % n_devices
    return 0
