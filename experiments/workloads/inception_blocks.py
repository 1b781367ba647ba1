"""Inception-style blocks: a stem, then blocks of four parallel branches joined by concatenation.

Each block's branches (1x1; 1x1 then 3x3; 1x1 then two 3x3; pooling then 1x1) are
independent between the block's input and its concatenation: work that two devices
can share inside every block, at the price of moving the block's input and outputs.
Smaller than zoo:inception_v3 and with fewer kinds of block, so that the trade-off
between parallel branches and crossings is the whole problem.

    placer optimize experiments/workloads/inception_blocks.py --devices cpu:0,cpu:1
"""

from __future__ import annotations

import torch
from torch import nn

BATCH, SIZE, BLOCKS = 8, 24, 4


def conv(cin: int, cout: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Block(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.b1 = conv(cin, width, 1)
        self.b3 = nn.Sequential(conv(cin, width, 1), conv(width, width, 3))
        self.b5 = nn.Sequential(conv(cin, width // 2, 1), conv(width // 2, width, 3), conv(width, width, 3))
        self.pool = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), conv(cin, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


class InceptionBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 64, 3)
        self.blocks = nn.Sequential(*(Block(64 if i == 0 else 256, 64) for i in range(BLOCKS)))
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return InceptionBlocks()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)),)


def expert_placement(module_path: str, n_devices: int) -> int | None:
    """Within each block, branches dealt over the devices; stem and head on device 0."""
    parts = module_path.split(".")
    if len(parts) >= 3 and parts[0] == "blocks":
        return ("b1", "b3", "b5", "pool").index(parts[2]) % n_devices if parts[2] in ("b1", "b3", "b5", "pool") else 0
    return 0
