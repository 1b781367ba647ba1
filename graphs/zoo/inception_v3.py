"""Inception-V3 (Szegedy et al. 2016), the paper's image benchmark, in plain torch.

The architecture and module names follow torchvision's `inception_v3` (torchvision
is not a dependency): a convolutional stem, the inception blocks Mixed_5b..Mixed_7c
whose parallel towers are separate submodules (`branch1x1`, `branch5x5_1`,
`branch5x5_2`, ...), global pooling and the classifier. The auxiliary classifier is
omitted (it only adds a side loss) and so is dropout (placed and unplaced runs must
compute identical outputs).

Sizes (`CONFIGS`): `paper` is the paper's setting: full width, 299x299 images,
batch 32 (about 23.8M parameters, 1000 classes). `small` is the same architecture at
a quarter of the channels, 75x75 images (the smallest the stride pattern allows) and
batch 2: every block and branch is there, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    width: float  # channel multiplier; 1.0 is the published network
    image: int  # height and width of the input images
    batch: int
    classes: int = 1000


CONFIGS = {
    "small": Config(width=0.25, image=75, batch=2),
    "medium": Config(width=0.5, image=139, batch=4),
    "paper": Config(width=1.0, image=299, batch=32),
}
SIZES = tuple(CONFIGS)

Channels = Callable[[int], int]  # published channel count -> this size's channel count


class BasicConv2d(nn.Module):
    """Convolution, batch norm, ReLU: the unit every tower is made of."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


# Each block lists its towers: the name prefixes of the submodules that make up
# one parallel path, in output order. The expert placement deals towers over devices.

class InceptionA(nn.Module):
    towers = ("branch1x1", "branch5x5", "branch3x3dbl", "branch_pool")

    def __init__(self, in_channels: int, ch: Channels, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, ch(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, ch(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(ch(48), ch(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, ch(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(ch(64), ch(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(ch(96), ch(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, ch(pool_features), kernel_size=1)
        self.out_channels = ch(64) + ch(64) + ch(96) + ch(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""
    towers = ("branch3x3", "branch3x3dbl")  # the third tower, max pooling, has no module

    def __init__(self, in_channels: int, ch: Channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, ch(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, ch(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(ch(64), ch(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(ch(96), ch(96), kernel_size=3, stride=2)
        self.out_channels = ch(384) + ch(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """Factorized 7x7 convolutions at 17x17 (Mixed_6b..Mixed_6e)."""
    towers = ("branch1x1", "branch7x7", "branch7x7dbl", "branch_pool")

    def __init__(self, in_channels: int, ch: Channels, channels_7x7: int):
        super().__init__()
        c7 = ch(channels_7x7)
        self.branch1x1 = BasicConv2d(in_channels, ch(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, ch(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, ch(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, ch(192), kernel_size=1)
        self.out_channels = 4 * ch(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""
    towers = ("branch3x3", "branch7x7x3")  # the third tower, max pooling, has no module

    def __init__(self, in_channels: int, ch: Channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, ch(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(ch(192), ch(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, ch(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(ch(192), ch(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(ch(192), ch(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(ch(192), ch(192), kernel_size=3, stride=2)
        self.out_channels = ch(320) + ch(192) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """Expanded filter banks at 8x8 (Mixed_7b, Mixed_7c); towers fork again inside."""
    towers = ("branch1x1", "branch3x3", "branch3x3dbl", "branch_pool")

    def __init__(self, in_channels: int, ch: Channels):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, ch(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, ch(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(ch(384), ch(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(ch(384), ch(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, ch(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(ch(448), ch(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(ch(384), ch(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(ch(384), ch(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, ch(192), kernel_size=1)
        self.out_channels = ch(320) + 4 * ch(384) + ch(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


# The inception blocks in order: name, class, arguments besides (in_channels, ch).
BLOCKS = (
    ("Mixed_5b", InceptionA, {"pool_features": 32}),
    ("Mixed_5c", InceptionA, {"pool_features": 64}),
    ("Mixed_5d", InceptionA, {"pool_features": 64}),
    ("Mixed_6a", InceptionB, {}),
    ("Mixed_6b", InceptionC, {"channels_7x7": 128}),
    ("Mixed_6c", InceptionC, {"channels_7x7": 160}),
    ("Mixed_6d", InceptionC, {"channels_7x7": 160}),
    ("Mixed_6e", InceptionC, {"channels_7x7": 192}),
    ("Mixed_7a", InceptionD, {}),
    ("Mixed_7b", InceptionE, {}),
    ("Mixed_7c", InceptionE, {}),
)
TOWERS = {name: block.towers for name, block, _ in BLOCKS}
STEM_AND_HEAD = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "avgpool", "fc")


class InceptionV3(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()

        def ch(channels: int) -> int:
            return max(1, int(channels * cfg.width))

        self.Conv2d_1a_3x3 = BasicConv2d(3, ch(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(ch(32), ch(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(ch(32), ch(64), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(ch(64), ch(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(ch(80), ch(192), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        channels = ch(192)
        for name, block, args in BLOCKS:
            module = block(channels, ch, **args)
            self.add_module(name, module)
            channels = module.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, cfg.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (batch, 3, H, W) -> logits (batch, classes)."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(images))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name, _, _ in BLOCKS:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(size: str = "small") -> nn.Module:
    return InceptionV3(CONFIGS[size])


def example_inputs(size: str = "small") -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[size]
    return (torch.randn(cfg.batch, 3, cfg.image, cfg.image),)


def loss_fn(output: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against fixed labels: image i of the batch is of class i mod classes."""
    labels = torch.arange(output.shape[0], device=output.device) % output.shape[1]
    return F.cross_entropy(output, labels)


def expert_placement(module_path: str, n_devices: int, size: str = "small") -> int | None:
    """Branch-parallel towers: within each inception block, tower k on device k mod n;
    stem, pooling and classifier on device 0. Blocks' own ops (pools without a
    module, concatenations) and the root are not covered: None."""
    head, _, rest = module_path.partition(".")
    if head in STEM_AND_HEAD:
        return 0
    branch = rest.split(".")[0]
    for k, tower in enumerate(TOWERS.get(head, ())):
        if branch == tower or branch.startswith(tower + "_"):
            return k % n_devices
    return None
