"""Another library's classifier (torchvision, timm) behind the one model interface.

The network is kept whole as `net`, so its state-dict keys are its own behind "net." (a user's weights for it load
with that prefix). The adapter cuts it where pooling and the classifier read the last feature map: `features` runs
the part before, `classify` the network's own pooling and head; V&B, pruning, Grad-CAM and the detectors then work
on it unchanged. A network without such a map (a vision transformer) still trains and classifies, through its own
forward; the methods that read the map refuse it (`require_feature_map`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from bdguard.errors import BdguardError
from bdguard.models.base import BackdoorModel, evaluating, require_feature_map

PROBE_SIDE = 64  # the side of the dry-run input that checks where a network was cut
T = TypeVar("T")


class AdaptedModel(BackdoorModel):
    """A foreign network `net`; subclasses say where its feature map is (`_features`) and what reads it
    (`classify`, `head_linear`). With `feature_channels` 0 the network has no map and `forward` is its own."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        net: nn.Module,
        feature_channels: int,
    ) -> None:
        super().__init__(num_classes, in_channels, mean, std, feature_channels=feature_channels, own_head=False)
        self.net = net
        self.has_feature_map = feature_channels > 0

    def head_linear(self) -> nn.Linear:
        """The first linear layer after the pool, the one that reads the feature channels."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        require_feature_map(self, "reading the feature map")
        return super().features(x)

    def head_weight(self) -> torch.Tensor:
        return self.head_linear().weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_feature_map:
            return self.classify(self.features(x))
        return self.net(self.normalise(x))


def first_of(module: nn.Module, kind: type[nn.Module]) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the first `kind` below `module` (itself included), in registration order."""
    return next(((name, m) for name, m in module.named_modules() if isinstance(m, kind)), None)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def adapt_input_channels(net: nn.Module, in_channels: int, label: str) -> None:
    """Give the network's first convolution `in_channels` inputs (a grayscale set on an RGB network). Pretrained
    RGB kernels become their mean over the colours, repeated, so a gray image sees what its RGB copy would."""
    found = first_of(net, nn.Conv2d)
    if found is None:
        raise BdguardError(f"{label} has no convolution to take {in_channels}-channel images")
    name, conv = found
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise BdguardError(f"{label}'s first convolution is grouped; it cannot take {in_channels}-channel images")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if conv.weight.device.type != "meta":
        with torch.no_grad():
            new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    replace_module(net, name, new)


def dry_run(net: nn.Module, run: Callable[[], T]) -> T | None:
    """`run()` with the network in eval mode and no grad, its mode restored; None when the network cannot run it
    (the cut or the input does not fit it)."""
    try:
        with evaluating(net):
            return run()
    except (RuntimeError, ValueError, TypeError, AssertionError):
        return None


def on_meta(module: nn.Module) -> bool:
    """Whether the module is only being sized (built on the meta device, no memory): dry runs say nothing there."""
    return any(p.device.type == "meta" for p in module.parameters())
