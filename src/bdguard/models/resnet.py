"""CIFAR-style ResNets: ResNet-18 (He et al. ImageNet widths, CIFAR stem) and the small ResNet-20."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bdguard.models.base import MODELS, BackdoorModel, check_positive_int, init_weights


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stages(
    block: Callable[[int, int, int], nn.Module], in_channels: int, widths: Sequence[int], depths: Sequence[int]
) -> nn.Sequential:
    """One stage per width; every stage but the first halves the resolution in its first block."""
    stages = []
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        blocks = []
        for j in range(depth):
            blocks.append(block(in_channels, width, 2 if i > 0 and j == 0 else 1))
            in_channels = width
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


class ResNet(BackdoorModel):
    """3x3 stride-1 stem (no max-pool), BasicBlock stages; features = output of the last block (after its ReLU)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        widths: Sequence[int],
        depths: Sequence[int],
    ) -> None:
        super().__init__(num_classes, in_channels, mean, std, feature_channels=widths[-1])
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layers = make_stages(BasicBlock, widths[0], widths, depths)
        init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> ResNet:
    return ResNet(num_classes, in_channels, mean, std, widths=(64, 128, 256, 512), depths=(2, 2, 2, 2))


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], width: int = 1) -> ResNet:
    """He et al.'s CIFAR ResNet-20 (0.27 M parameters at width 1) with 1x1-conv shortcuts; `width` multiplies."""
    check_positive_int("resnet20 width", width)
    return ResNet(num_classes, in_channels, mean, std, widths=(16 * width, 32 * width, 64 * width), depths=(3, 3, 3))
