"""Case: a torchvision-style ResNet with BatchNorm, strided bottleneck shortcuts, an
in-place ReLU, and an auxiliary classifier whose output comes back only in training:
`ResNetOutputs(logits, aux_logits)` (a namedtuple) in train mode, the logits tensor
alone in eval mode, as torchvision's Inception3 and GoogLeNet do.

Scenario: the placed model must update BatchNorm's running statistics and
num_batches_tracked exactly as eager, switch its output structure with
`train()`/`eval()`, and use the running statistics in eval mode.
Model: own code after torchvision's `BasicBlock` and `InceptionOutputs`.
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES, BATCH, IMAGE = 10, 4, 32

ResNetOutputs = namedtuple("ResNetOutputs", ["logits", "aux_logits"])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class AuxResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.aux = nn.Linear(32, CLASSES)
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64, 1))
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        aux = self.aux(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)) if self.training else None
        x = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer3(x), 1), 1))
        return ResNetOutputs(x, aux) if self.training else x


def build_model():
    torch.manual_seed(0)
    return AuxResNet()


def example_inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),)


def loss_fn(out, images):
    target = torch.arange(images.shape[0]) % CLASSES
    if isinstance(out, ResNetOutputs):
        return F.cross_entropy(out.logits, target) + 0.4 * F.cross_entropy(out.aux_logits, target)
    return F.cross_entropy(out, target)
