"""The one model interface: images in [0, 1] -> `features` (last conv map, masked) -> `classify` -> logits."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

    has_feature_map = True  # False for an adapted network without a spatial map (a vision transformer)

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        feature_channels: int,
        hidden: int = 0,
        own_head: bool = True,
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
        # what rebuilds it: build_model sets the registered name and the options it was given
        self.architecture = type(self).__name__
        self.options: dict[str, Any] = {}
        self.feature_channels = feature_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("feature_mask", torch.ones(feature_channels))
        if own_head:  # an adapted network brings its own (models/adapted.py)
            self.hidden = (
                nn.Sequential(nn.Linear(feature_channels, hidden), nn.ReLU(), nn.Dropout(0.5))
                if hidden
                else nn.Identity()
            )
            self.fc = nn.Linear(hidden or feature_channels, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv feature map (after its activation) of normalised images."""
        raise NotImplementedError

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images in [0, 1], normalised with the model's own statistics."""
        # uint8 images would silently be normalised on the 0-255 scale; refuse them where the mistake happens
        if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise BdguardError(
                f"model expects float images in [0, 1] of shape (N, {self.in_channels}, H, W), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images in [0, 1] -> (N, feature_channels, h, w), with `feature_mask` applied."""
        f = self._features(self.normalise(x))
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
# options that only choose a model's initial weights (downloaded ones): moot, and never applied, when the weights
# come from a model file
INITIAL_WEIGHT_OPTIONS = frozenset({"weights", "pretrained"})


class ModelRegistry(Registry[ModelBuilder]):
    """bdguard's own architectures by name, plus sources of other libraries' networks named "SOURCE:NAME"
    (`torchvision:resnet18`, `timm:resnet18`): a source turns NAME into a builder, or refuses it in one line."""

    def __init__(self) -> None:
        super().__init__("model")
        self.sources: dict[str, Callable[[str], ModelBuilder]] = {}

    def add_source(self, prefix: str, resolve: Callable[[str], ModelBuilder]) -> None:
        if prefix in self.sources:
            raise ValueError(f"model source {prefix!r} is registered twice")
        self.sources[prefix] = resolve

    def get(self, name: str) -> ModelBuilder:
        prefix, sep, rest = name.partition(":")
        if not sep:
            return super().get(name)
        if prefix not in self.sources:
            known = ", ".join(f"{source}:NAME" for source in sorted(self.sources))
            raise BdguardError(f"unknown model source {prefix!r} in {name!r}; known: {known}")
        if not rest:
            raise BdguardError(f"{name!r} names no model: write {prefix}:NAME")
        return self.sources[prefix](rest)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except BdguardError:
            return False
        return True


MODELS = ModelRegistry()


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
    model = builder(num_classes, in_channels, mean, std, **typed)
    model.architecture, model.options = name, typed
    return model


def sized_model(name: str, options: Mapping[str, Any]) -> BackdoorModel:
    """Architecture `name` built on the meta device (no memory, no data, no download): what it is, not its weights."""
    kept = {key: value for key, value in options.items() if key not in INITIAL_WEIGHT_OPTIONS}
    with torch.device("meta"):
        return build_model(name, 2, 3, (0.0,) * 3, (1.0,) * 3, **kept)


def require_feature_map(model: BackdoorModel, method: str) -> None:
    """Refuse, before any work, a model without a convolutional feature map for a method that reads one."""
    if not model.has_feature_map:
        raise BdguardError(
            f"{method} reads the model's last convolutional feature map, and {model.architecture} has none (a vision "
            "transformer?); use a convolutional network, or a method that needs only the logits"
        )


@contextmanager
def evaluating(net: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a trial pass (BatchNorm would fail on one image), the module's mode restored."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def check_image_size(model: BackdoorModel, image_shape: Sequence[int], data_name: str) -> None:
    """Refuse, before any training, images too small for the network (its pooling would leave nothing of them):
    one pass of one blank image."""
    x = torch.zeros(1, *image_shape, device=model.mean.device)
    try:
        with evaluating(model):
            model(x)
    except RuntimeError as exc:
        size = "x".join(map(str, image_shape[1:]))
        why = str(exc).strip().splitlines()[0]
        raise BdguardError(f"{model.architecture} cannot take {data_name}'s {size} images ({why})") from None


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
