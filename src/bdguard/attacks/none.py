"""The absence of an attack: a clean training set and no triggered test set."""

from __future__ import annotations

import torch

from bdguard.attacks.base import Attack
from bdguard.attacks.registry import ATTACKS
from bdguard.data.base import ImageSet, PoisonedSet


@ATTACKS.register
class NoAttack(Attack):
    name = "none"
    has_trigger = False

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()

    def poison(self, train: ImageSet) -> PoisonedSet:
        self._check_shape(train)
        nothing = torch.zeros_like(train.labels, dtype=torch.bool)
        return PoisonedSet(train, nothing, nothing, train.labels, self.manifest(nothing, nothing))
