"""random-prune: the sanity baseline, last-layer channels pruned in a seeded random order
(docs/methods/linf-pruning.md 7).

It shares the budget rules of the other pruning defenses; by default it prunes a fixed 10% with no trigger, so
it costs nothing but the curve. Compare it with another defense at that defense's k* (`budget=count`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bdguard.defenses.pruning.core import ChannelPruning, Summaries
from bdguard.defenses.pruning.params import Budget, PruneParams, TriggerSource
from bdguard.defenses.registry import DEFENSES


@dataclass
class RandomPruneParams(PruneParams):
    defense: ClassVar[str] = "random-prune"

    trigger: TriggerSource = "none"
    budget: Budget = "fraction"
    fraction: float | None = 0.1


@DEFENSES.register
class RandomPrune(ChannelPruning):
    name = "random-prune"
    description = "sanity baseline: prune last-layer channels in a seeded random order"
    Params = RandomPruneParams

    def score(self, summaries: Summaries) -> torch.Tensor:
        channels = summaries["inf"]["mean_clean"].numel()
        return torch.rand(channels, generator=torch.Generator().manual_seed(self.params.seed))

    def order_name(self, triggered: bool) -> str:
        return f"random (seed {self.params.seed})"
