"""An AlexNet-style network for small images: the GTSRB model of the l-inf pruning paper, in the spirit of it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bdguard.models.base import MODELS, BackdoorModel, check_positive_int, init_weights
from bdguard.models.small_cnn import conv_bn_relu

# channels of the five convolutions at width 1; width 4 gives the 64-192-384-256-256 of
# docs/methods/linf-pruning.md section 9
BASE_CHANNELS = (16, 48, 96, 64, 64)


class AlexNetStyle(BackdoorModel):
    """Five 3x3 Conv-BN-ReLU layers with a max-pool after the first two, then two fully connected layers.

    Our choices where the paper says nothing: 3x3 kernels and two pools (not AlexNet's 11x11/stride 4 and three
    pools, which would leave nothing of a 32x32 image), BatchNorm so that the training recipe of the other models
    works unchanged (and CLP finds its Conv-BN pairs), and the global average pool every bdguard model has before
    its head, so that pruning curves and Grad-CAM read one pooled map."""

    def __init__(
        self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], width: int = 4
    ) -> None:
        check_positive_int("alexnet width", width)
        c1, c2, c3, c4, c5 = (width * c for c in BASE_CHANNELS)
        super().__init__(num_classes, in_channels, mean, std, feature_channels=c5, hidden=c5)
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, c1),
            nn.MaxPool2d(2),
            conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            conv_bn_relu(c2, c3),
            conv_bn_relu(c3, c4),
            conv_bn_relu(c4, c5),
        )
        init_weights(self)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


MODELS.register("alexnet")(AlexNetStyle)
