"""torchvision:NAME: any classification network of `torchvision.models` (resnet18, mobilenet_v3_small, ...).

The cut: the network's children up to its global average pool (`nn.AdaptiveAvgPool2d(1)`) make the feature map;
the pool and the children after it are its head. A network whose pool is not such a child (DenseNet pools in its
forward) or whose children do not run in order (GoogLeNet's auxiliary heads) fails the dry run that checks the cut
and is kept whole, without a feature map, like a vision transformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from types import ModuleType

import torch
from torch import nn

from bdguard.errors import BdguardError
from bdguard.models.adapted import (
    PROBE_SIDE,
    AdaptedModel,
    adapt_input_channels,
    dry_run,
    first_of,
    on_meta,
    replace_module,
)
from bdguard.models.base import MODELS, ModelBuilder


class TorchvisionModel(AdaptedModel):
    """A torchvision classifier cut at its global pool."""

    def __init__(
        self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], net: nn.Module
    ) -> None:
        cut = _cut(net)
        if cut is not None and not on_meta(net) and not _cut_holds(net, cut, in_channels):
            cut = None
        super().__init__(num_classes, in_channels, mean, std, net, 0 if cut is None else cut.channels)
        self.cut = cut

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.cut.features(self.net, x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.cut.classify(self.net, features)

    def head_linear(self) -> nn.Linear:
        return self.cut.head_linear(self.net)


@dataclass(frozen=True)
class Cut:
    """Where a network is cut: its children before the global pool (the feature map), those after it (the head),
    and whether the head reads the pooled map flattened, as the network's own forward flattens it (ConvNeXt's head
    starts with a LayerNorm2d on the (N, C, 1, 1) map instead)."""

    body: tuple[str, ...]
    head: tuple[str, ...]
    flatten: bool
    channels: int

    def features(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in self.body:
            x = getattr(net, name)(x)
        return x

    def classify(self, net: nn.Module, features: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(features, 1)
        if self.flatten:
            x = torch.flatten(x, 1)
        for name in self.head:
            x = getattr(net, name)(x)
        return x

    def head_linear(self, net: nn.Module) -> nn.Linear:
        linear = _first_linear([getattr(net, name) for name in self.head])
        assert linear is not None  # a cut is made only where a linear layer reads the pool
        return linear


def _first_linear(modules: Sequence[nn.Module]) -> nn.Linear | None:
    found = (first_of(module, nn.Linear) for module in modules)
    return next((linear for _, linear in filter(None, found)), None)


def _cut(net: nn.Module) -> Cut | None:
    """The cut at the first child that is a global average pool, or None when there is none (or no linear layer
    reads it)."""
    children = list(net.named_children())
    for i, (_, child) in enumerate(children):
        if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
            head = [module for _, module in children[i + 1 :]]
            linear = _first_linear(head)
            if linear is None:
                return None
            leaves = [m for h in head for m in h.modules() if not list(m.children())]
            names = tuple(name for name, _ in children)
            flatten = isinstance(leaves[0], nn.Linear | nn.Dropout)
            return Cut(names[:i], names[i + 1 :], flatten, linear.in_features)
    return None


def _cut_holds(net: nn.Module, cut: Cut, in_channels: int) -> bool:
    """Whether the cut network computes what the whole one does, on one random image (in eval mode, no grad)."""
    x = torch.rand(1, in_channels, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0))
    outputs = dry_run(net, lambda: (net(x), cut.classify(net, cut.features(net, x))))
    if outputs is None:
        return False
    whole, parts = outputs
    return whole.shape == parts.shape and torch.allclose(whole, parts, atol=1e-4, rtol=1e-4)


def _models() -> ModuleType:
    """torchvision.models, imported when a torchvision network is asked for: it takes a second (it loads
    torch._dynamo), which every bdguard command would otherwise pay at start."""
    import torchvision.models

    return torchvision.models


def torchvision_names() -> list[str]:
    models = _models()
    return models.list_models(module=models)


def torchvision_builder(name: str) -> ModelBuilder:
    """The builder of torchvision classifier `name`."""
    names = torchvision_names()
    if name not in names:
        close = get_close_matches(name, names, n=1)
        hint = f" (did you mean 'torchvision:{close[0]}'?)" if close else ""
        raise BdguardError(f"torchvision has no classification model {name!r}{hint}; `bdguard models` lists them")
    label = f"torchvision:{name}"

    def build(
        num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], weights: str | None = None
    ) -> TorchvisionModel:
        net = _network(name, num_classes, weights, label)
        adapt_input_channels(net, in_channels, label)
        return TorchvisionModel(num_classes, in_channels, mean, std, net)

    build.__doc__ = f"torchvision's {name}; option weights: a weights name of torchvision (downloaded once)"
    return build


def _network(name: str, num_classes: int, weights: str | None, label: str) -> nn.Module:
    if weights is None:
        try:
            return _models().get_model(name, weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as exc:
            raise BdguardError(f"{label}: {exc}") from None
    known = list(_models().get_model_weights(name).__members__)
    if weights not in known:
        raise BdguardError(f"{label} has no weights {weights!r}; its weights: {', '.join(known)}")
    try:
        net = _models().get_model(name, weights=weights)
    except (OSError, RuntimeError) as exc:  # the download (torch.hub, into $TORCH_HOME) failed
        raise BdguardError(f"{label}: cannot fetch weights {weights!r}: {exc}") from None
    # the pretrained head answers ImageNet's classes: a new last layer answers the data set's
    found = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise BdguardError(f"{label} has no linear classifier to give {num_classes} outputs")
    last_name, last = found[-1]
    if last.out_features != num_classes:
        replace_module(net, last_name, nn.Linear(last.in_features, num_classes, device=last.weight.device))
    return net


MODELS.add_source("torchvision", torchvision_builder)
