"""A small, fast Conv-BN-ReLU network for 28x28 digits (any input of at least 4x4 works)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bdguard.models.base import MODELS, BackdoorModel, init_weights


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


class SmallCNN(BackdoorModel):
    """conv32 - pool - conv64 - pool - conv128; the last conv map (128 x H/4 x W/4) is the feature map."""

    def __init__(self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(num_classes, in_channels, mean, std, feature_channels=128)
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            conv_bn_relu(64, 128),
        )
        init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


MODELS.register("small-cnn")(SmallCNN)
