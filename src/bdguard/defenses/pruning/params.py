"""Settings shared by the channel-pruning defenses (docs/methods/linf-pruning.md 6): which trigger scores the channels,
how many channels to prune, and the optional fine-tuning afterwards. Each defense subclasses them with its defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from bdguard.config import check_range
from bdguard.errors import BdguardError

TriggerSource = Literal["reverse", "oracle", "none"]
Budget = Literal["auto", "fraction", "count"]


@dataclass
class PruneParams:
    """How a pruning defense picks k*, the number of last-layer channels it masks.

    budget "fraction": k* = round(fraction x K); "count": k* = count; "auto": the smallest k <= max_fraction x K
    at which the probe ASR of the scoring trigger is <= asr_target, stopping early (and keeping the previous k)
    once clean probe accuracy has dropped by more than max_ba_drop. Without a trigger (trigger "none"), auto prunes
    until that accuracy drop (Fine-Pruning's rule). Only the probe set is read: never the test set.

    trigger "reverse": Neural Cleanse on the probe images (nc_steps, nc_labels); "oracle": the attack's real
    trigger (an upper bound for analysis, never a defense); "none": clean probe images only.
    """

    defense: ClassVar[str] = "prune"  # the name in error messages

    trigger: TriggerSource = "reverse"
    budget: Budget = "auto"
    fraction: float | None = None
    count: int | None = None
    asr_target: float = 0.10
    max_fraction: float = 0.5
    max_ba_drop: float = 0.05
    finetune_epochs: int = 0  # on the labelled probe set, mask frozen; lr finetune_lr, the rest from `train`
    finetune_lr: float = 0.01
    seed: int = 0  # Neural Cleanse's start, random orders, fine-tuning's shuffle
    nc_steps: int = 300  # Neural Cleanse optimisation steps per label (1000 in the NC code, for GPUs)
    nc_labels: Literal["all", "topk"] = "all"  # labels Neural Cleanse reverse-engineers

    def __post_init__(self) -> None:
        name = self.defense
        if self.budget == "fraction":
            if self.fraction is None:
                raise BdguardError(f"{name}.budget fraction needs {name}.fraction (a share of the channels in [0, 1])")
            check_range(f"{name}.fraction", self.fraction, 0.0, 1.0)
        if self.budget == "count":
            if self.count is None:
                raise BdguardError(f"{name}.budget count needs {name}.count (a number of channels)")
            check_range(f"{name}.count", self.count, 0)
        check_range(f"{name}.asr_target", self.asr_target, 0.0, 1.0)
        check_range(f"{name}.max_fraction", self.max_fraction, 0.0, 1.0)
        check_range(f"{name}.max_ba_drop", self.max_ba_drop, 0.0, 1.0)
        check_range(f"{name}.finetune_epochs", self.finetune_epochs, 0)
        check_range(f"{name}.finetune_lr", self.finetune_lr, 0.0)
        check_range(f"{name}.nc_steps", self.nc_steps, 1)
