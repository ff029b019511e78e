"""fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018; docs/methods/fine-pruning.md): prune the last-layer channels
that are least active on clean data ("dormant" first, by mean activation), stop before clean accuracy falls by more than
a tolerance, then fine-tune on clean data.

Both the stopping point and the fine-tuning use the probe set, never the test set (BackdoorBench's variant picks
the level that maximises test ACC - ASR, which peeks at triggered data). The original zeroes the conv kernel and
bias; here the feature-map mask prunes, which is exact also where BN or a residual sum follows the conv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bdguard.defenses.pruning.core import ChannelPruning, Summaries
from bdguard.defenses.pruning.params import PruneParams, TriggerSource
from bdguard.defenses.registry import DEFENSES


@dataclass
class FinePruningParams(PruneParams):
    defense: ClassVar[str] = "fine-pruning"

    trigger: TriggerSource = "none"  # with a trigger, `auto` would also stop at its probe ASR: not Fine-Pruning
    max_ba_drop: float = 0.04  # the accuracy tolerance (4%, as recalled from the paper)
    max_fraction: float = 0.9  # the original pruned 48 of 60 channels (80%) on its face model
    finetune_epochs: int = 10


@DEFENSES.register
class FinePruning(ChannelPruning):
    name = "fine-pruning"
    description = (
        "Fine-Pruning (Liu et al., RAID 2018): prune dormant last-layer channels until clean probe accuracy drops "
        "by the tolerance, then fine-tune on the probe set"
    )
    Params = FinePruningParams

    def score(self, summaries: Summaries) -> torch.Tensor:
        return -summaries["avg"]["mean_clean"]  # the mean activation on clean images, lowest first

    def order_name(self, triggered: bool) -> str:
        return "clean mean activation, ascending"
