"""Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings") with the CIFAR stem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bdguard.models.base import MODELS, BackdoorModel, init_weights
from bdguard.models.resnet import conv3x3, make_stages


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # a projection shortcut sees the pre-activated input; the identity shortcut the raw one
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet18(BackdoorModel):
    """Block outputs are un-activated sums, so the feature map is relu(bn(last stage output))."""

    def __init__(self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(num_classes, in_channels, mean, std, feature_channels=512)
        self.conv1 = conv3x3(in_channels, 64)
        self.layers = make_stages(PreActBlock, 64, (64, 128, 256, 512), (2, 2, 2, 2))
        self.bn = nn.BatchNorm2d(512)
        init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layers(self.conv1(x))))


MODELS.register("preact-resnet18")(PreActResNet18)
