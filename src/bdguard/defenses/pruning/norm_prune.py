"""linf-prune (Xu et al., arXiv 2002.12162): prune the last-layer channels whose peak activation a trigger raises
most; l2-prune and l1-prune are the paper's norm ablation, the same code with another norm
(docs/methods/linf-pruning.md 7).

Scores, per channel over the probe images (docs/methods/linf-pruning.md 3): diff = mean triggered norm - mean clean norm
(default), trig = mean triggered norm (the literal reading of the paper's summary), rel = diff / clean mean, z = diff /
clean std. With trigger "none" there is no shift to measure and the order is the clean mean, ascending ("dormant"
first): with norm 1 that is Fine-Pruning's ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from bdguard.defenses.pruning.core import ChannelPruning, Summaries
from bdguard.defenses.pruning.params import PruneParams
from bdguard.defenses.registry import DEFENSES

Norm = Literal["inf", "2", "1"]


@dataclass
class LinfPruneParams(PruneParams):
    defense: ClassVar[str] = "linf-prune"

    layer: Literal["features"] = "features"  # the last conv feature map (`model.features`), the only one for now
    norm: Norm = "inf"
    score: Literal["diff", "trig", "rel", "z"] = "diff"


@dataclass
class L2PruneParams(LinfPruneParams):
    defense: ClassVar[str] = "l2-prune"

    norm: Norm = "2"


@dataclass
class L1PruneParams(LinfPruneParams):
    defense: ClassVar[str] = "l1-prune"

    norm: Norm = "1"


@DEFENSES.register
class LinfPrune(ChannelPruning):
    name = "linf-prune"
    description = (
        "prune the last-layer channels whose l-inf activation a (reverse-engineered) trigger shifts most "
        "(Xu et al., arXiv 2002.12162)"
    )
    Params = LinfPruneParams

    def score(self, summaries: Summaries) -> torch.Tensor:
        summary = summaries[self.params.norm]
        if "diff" not in summary:  # no trigger: quiet channels first
            return -summary["mean_clean"]
        return summary["mean_trig"] if self.params.score == "trig" else summary[self.params.score]

    def order_name(self, triggered: bool) -> str:
        norm = f"l{self.params.norm}"
        return f"{norm} {self.params.score}, descending" if triggered else f"clean {norm} mean, ascending"


@DEFENSES.register
class L2Prune(LinfPrune):
    name = "l2-prune"
    description = "linf-prune's ablation with the l2 norm of each channel's activation map"
    Params = L2PruneParams


@DEFENSES.register
class L1Prune(LinfPrune):
    name = "l1-prune"
    description = "linf-prune's ablation with the l1 norm (the mean activation of Fine-Pruning and Neural Cleanse)"
    Params = L1PruneParams
