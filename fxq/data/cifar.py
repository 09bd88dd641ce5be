"""The CIFAR-10 ResNets of He et al. 2016 (section 4.2, "option A" shortcuts), as in akamaster/pytorch_resnet_cifar10.

Module names match that repository's checkpoints (after its `module.` prefix), so its state dicts load strictly.
The option-A shortcut is written as a strided slice and a channel pad, both of which torch.fx traces.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fxq.errors import ModelError

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "CIFAR_DEPTHS"]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # depth = 6n + 2


class BasicBlock(nn.Module):
    """3x3 conv-bn-relu, 3x3 conv-bn, plus the shortcut, then relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # option A: no parameters, so the checkpoints hold no shortcut keys; a plain bool is a constant to fx
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # halve the map, zero-pad planes/4 channels on each side: in_planes + 2 * planes/4 = planes
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.downsample else x
        return F.relu(out + short)


class CifarResNet(nn.Module):
    """conv1/bn1 (16 ch), layer1..3 of `n` BasicBlocks at 16/32/64 channels, global average pool, `linear`."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._layer(16, 16, n, 1)
        self.layer2 = self._layer(16, 32, n, 2)
        self.layer3 = self._layer(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the original's init: only matters for random_weights runs
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # the original pools with avg_pool2d(out, out.size(3)): the same on the 8x8 map of a 32x32 input
        return self.linear(out.mean((2, 3)))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """ResNet-`depth` for 32x32 inputs; depth = 6n + 2 (20, 32, 44, 56, 110 as in the paper)."""
    if depth < 8 or (depth - 2) % 6:
        raise ModelError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (e.g. {CIFAR_DEPTHS}), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)
