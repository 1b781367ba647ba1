"""MLP: a deep chain of equal blocks, the shape GPipe pipelines best.

Not one of the paper's benchmarks: it stands for the models that are one long chain
(deep MLPs, the towers of a recommender), where placement alone runs one device at
a time and only micro-batches (GPipe, Huang et al. 2019) keep several busy. Each
block is Linear -> LayerNorm -> GELU, so that activations keep their scale at any
depth; a final Linear maps to the classes. The task is learnable and needs no
second input: the label of a row is the index of its largest input feature among
the first `classes`.

Sizes (`CONFIGS`): `small` for tests; `medium` takes about a third of a second per
training step on one core of the development host (its blocks are matmuls of
256 x 1024 by 1024 x 1024); `paper` is a GPipe-scale stand-in (no paper fixes an MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    width: int
    depth: int  # blocks
    classes: int
    batch: int


CONFIGS = {
    "small": Config(width=64, depth=8, classes=10, batch=32),
    "medium": Config(width=1024, depth=16, classes=64, batch=256),
    "paper": Config(width=4096, depth=32, classes=1000, batch=1024),
}
SIZES = tuple(CONFIGS)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.fc(x)))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(cfg.width) for _ in range(cfg.depth)])
        self.head = nn.Linear(cfg.width, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, width) -> logits (batch, classes)."""
        return self.head(self.blocks(x))


def build_model(size: str = "small") -> nn.Module:
    return MLP(CONFIGS[size])


def example_inputs(size: str = "small") -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[size]
    return (torch.randn(cfg.batch, cfg.width),)


def loss_fn(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against each row's label (its largest feature among the first
    `classes`): a mean over the batch, so micro-batched gradients are the batch's."""
    return F.cross_entropy(output, x[:, :output.shape[-1]].argmax(-1))


def expert_placement(module_path: str, n_devices: int, size: str = "small") -> int | None:
    """Contiguous runs of blocks split evenly over the devices (block i of N on device
    floor(i * n / N)), the head beside the last block; the root and the `blocks`
    container are not covered: None."""
    depth = CONFIGS[size].depth
    head, _, rest = module_path.partition(".")
    if head == "head":
        return (depth - 1) * n_devices // depth
    if head == "blocks" and rest:
        return int(rest.split(".")[0]) * n_devices // depth
    return None
