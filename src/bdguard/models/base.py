"""The one model interface: images in [0, 1] -> `features` (last conv map, masked) -> `classify` -> logits."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from bdguard.config import coerce
from bdguard.errors import BdguardError
from bdguard.registry import Registry


class BackdoorModel(nn.Module):
    """An image classifier whose last convolutional feature map is exposed and maskable per channel.

    Subclasses build their layers after calling this constructor and implement `_features` on normalised input.
    `mean`, `std` and `feature_mask` are buffers, so a saved state dict carries the normalisation and any pruning.
    The head is a global average pool, then a `hidden`-unit ReLU layer with dropout where `hidden` > 0, then `fc`:
    whatever it is, it reads only the pooled map, which is what lets pruning curves skip the convolutions.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        feature_channels: int,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if len(mean) != in_channels or len(std) != in_channels:
            raise BdguardError(
                f"mean and std need one value per input channel ({in_channels}), got {len(mean)} and {len(std)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
            raise BdguardError(f"mean must be finite and std finite and > 0, got mean={list(mean)} std={list(std)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_channels = feature_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("feature_mask", torch.ones(feature_channels))
        self.hidden = (
            nn.Sequential(nn.Linear(feature_channels, hidden), nn.ReLU(), nn.Dropout(0.5)) if hidden else nn.Identity()
        )
        self.fc = nn.Linear(hidden or feature_channels, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv feature map (after its activation) of normalised images."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images in [0, 1] -> (N, feature_channels, h, w), with `feature_mask` applied."""
        # uint8 images would silently be normalised on the 0-255 scale; refuse them where the mistake happens
        if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BdguardError(
                f"model expects float images in [0, 1] of shape (N, {self.in_channels}, H, W), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        f = self._features((x - self.mean) / self.std)
        # the mask acts on the output, not the conv weights: in a ResNet no single conv owns a channel of the sum
        return f * self.feature_mask.to(f.dtype).view(1, -1, 1, 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map -> logits: global average pool, flatten, the head."""
        return self.fc(self.hidden(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)))

    def head_weight(self) -> torch.Tensor:
        """(out, feature_channels): the weight of the first linear layer after the pool, the one that reads the
        feature channels."""
        first = self.hidden[0] if isinstance(self.hidden, nn.Sequential) else self.fc
        return first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


ModelBuilder = Callable[..., BackdoorModel]
# builders are called as builder(num_classes, in_channels, mean, std, **options)
MODELS: Registry[ModelBuilder] = Registry("model")


def check_model_options(name: str, options: Mapping[str, Any]) -> Callable[..., BackdoorModel]:
    """The builder of architecture `name`, once `options` are known to be among its own (checked before any data
    loads)."""
    builder = MODELS.get(name)
    accepted = list(inspect.signature(builder).parameters)[4:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BdguardError(
            f"model {name!r} has no option {', '.join(unknown)}; its options: {', '.join(accepted) or 'none'}"
        )
    return builder


def build_model(
    name: str, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], **kwargs: Any
) -> BackdoorModel:
    """Build a registered architecture; an unknown name or option is a BdguardError naming what is accepted."""
    builder = check_model_options(name, kwargs)
    # options given as --set strings ("2") get the type the builder declares
    hints = get_type_hints(builder.__init__ if inspect.isclass(builder) else builder)
    typed = {
        key: coerce(value, hints[key], f"model option {key}") if key in hints else value
        for key, value in kwargs.items()
    }
    return builder(num_classes, in_channels, mean, std, **typed)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) conv weights, BatchNorm weight 1 and bias 0; linear layers keep PyTorch's init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BdguardError(f"{name} must be a positive integer, got {value!r}")
