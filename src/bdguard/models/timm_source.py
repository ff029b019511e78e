"""timm:NAME: any network of `timm.create_model` (timm is the optional extra bdguard[timm]).

timm itself splits every network into `forward_features` (the last feature map, for a CNN) and `forward_head` (its
pooling and classifier): the adapter cuts there. A network whose features are tokens, not a map (a vision
transformer), is kept whole without a feature map.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import get_close_matches
from types import ModuleType

import torch
from torch import nn

from bdguard.errors import BdguardError
from bdguard.models.adapted import PROBE_SIDE, AdaptedModel, dry_run
from bdguard.models.base import MODELS, ModelBuilder


class TimmModel(AdaptedModel):
    """A timm network cut between `forward_features` and `forward_head`."""

    def __init__(
        self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], net: nn.Module
    ) -> None:
        channels = int(net.num_features)
        super().__init__(num_classes, in_channels, mean, std, net, channels if _has_map(net, in_channels) else 0)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features)

    def head_linear(self) -> nn.Linear:
        head = self.net.get_classifier()
        if not isinstance(head, nn.Linear) or head.in_features != self.feature_channels:
            raise BdguardError(f"{self.architecture}'s classifier does not read the feature channels directly")
        return head


def _has_map(net: nn.Module, in_channels: int) -> bool:
    """Whether `forward_features` gives an (N, num_features, h, w) map, found by a dry run (shapes only on the meta
    device). Networks of a fixed input size (vision transformers) are run at theirs."""
    config = getattr(net, "pretrained_cfg", None) or {}
    side = config.get("input_size", (3, 224, 224))[-1] if config.get("fixed_input_size") else PROBE_SIDE
    x = torch.zeros(1, in_channels, side, side, device=next(net.parameters()).device)
    out = dry_run(net, lambda: net.forward_features(x))
    return out is not None and out.dim() == 4 and out.shape[1] == net.num_features


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise BdguardError("timm models need timm: pip install 'bdguard[timm]'") from None
    return timm


def timm_builder(name: str) -> ModelBuilder:
    """The builder of timm network `name`."""
    timm = _timm()
    if not timm.is_model(name):
        close = get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean 'timm:{close[0]}'?)" if close else ""
        raise BdguardError(f"timm has no model {name!r}{hint}")

    def build(
        num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], pretrained: bool = False
    ) -> TimmModel:
        try:
            net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)
        except (OSError, RuntimeError) as exc:  # a download of pretrained weights that failed
            raise BdguardError(f"timm:{name}: {exc}") from None
        return TimmModel(num_classes, in_channels, mean, std, net)

    build.__doc__ = f"timm's {name}; option pretrained: true downloads timm's weights once"
    return build


MODELS.add_source("timm", timm_builder)
