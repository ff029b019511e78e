"""The Victim and the split it gives (docs/methods/vab.md 1 and "The label rule"): what the V&B defense and the `vab`
detector share, its warm-up included, so that the detector flags what the defense's first split flags.

A Victim epoch trains on the given samples (all of them first, then its own flags); a scoring round re-scores every
training sample (prediction entropy, smoothed over rounds, min-max normalised) and flags those at or below the
round's tau; the guarded split keeps, with `split_rule=labels`, only the flags inside the labels the check model
finds attacked (labels.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from bdguard import distributed
from bdguard.data.base import DataBundle, ImageSet
from bdguard.defenses.vab.config import VictimParams
from bdguard.defenses.vab.labels import LabelGuard
from bdguard.defenses.vab.schedule import threshold
from bdguard.defenses.vab.victim import EntropyDetector, entropy_scores, entropy_split, victim_epoch, victim_logits
from bdguard.training.config import TrainConfig
from bdguard.training.factory import new_model
from bdguard.training.runtime import Runtime, check_finite, epoch_generator


def victim_train_config(train: TrainConfig, params: VictimParams, samples: int) -> TrainConfig:
    """How the Victim is built and trained on a set of `samples`, recorded in its model file (seed + 1: never the
    Beneficiary's init)."""
    architecture = params.victim_architecture(train.model)
    return dataclasses.replace(
        train,
        model=architecture,
        model_kwargs=dict(train.model_kwargs) if architecture == train.model else {},
        seed=train.seed + 1,
        optimizer="adam",
        lr=params.victim_lr,
        weight_decay=params.victim_weight_decay,
        batch_size=params.victim_batch(samples),
        schedule="constant",
        augment=False,
    )


class Splitter:
    """The Victim network and optimiser, its entropy history, its last logits and flags, and the label rule."""

    def __init__(
        self, bundle: DataBundle, data: ImageSet, train: TrainConfig, params: VictimParams, runtime: Runtime
    ) -> None:
        self.bundle, self.data, self.train, self.params, self.runtime = bundle, data, train, params, runtime
        device = runtime.device
        self.config = victim_train_config(train, params, len(data))
        self.model = runtime.prepare(new_model(bundle, self.config, device))
        self.network = distributed.wrap(self.model, device)  # what trains (DDP under torchrun)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=params.victim_lr, weight_decay=params.victim_weight_decay
        )
        self.detector = EntropyDetector(params.ema)
        self.guard = LabelGuard(params.label_rule(), bundle.num_classes, bundle.classes)
        self.logits = torch.zeros(len(data), bundle.num_classes, device=device)  # the last round's
        self.flagged = torch.zeros(len(data), dtype=torch.bool, device=device)  # the last round's entropy split
        self.epochs = 0

    def train_epoch(self, index: torch.Tensor, label: str) -> float | None:
        """One Victim epoch on the samples `index`; its mean loss (None for no samples)."""
        generator = epoch_generator(self.config.seed, self.epochs, self.runtime.device)
        batch = self.config.batch_size
        loss = victim_epoch(self.network, self.optimizer, self.data, index, batch, generator, self.runtime, label)
        self.epochs += 1
        check_finite(loss, label, f"the Victim's learning rate (vab.victim_lr = {self.params.victim_lr:g})")
        return loss

    def train_on_flags(self, label: str) -> float | None:
        return self.train_epoch(self.flagged.nonzero().flatten(), label)

    def score(self) -> float:
        """A scoring round: every training sample re-scored, the history smoothed, the flags renewed; the tau."""
        self.logits = victim_logits(self.model, self.data.images, self.train.eval_batch_size, self.runtime)
        normalised = self.detector.update(entropy_scores(self.logits))
        tau = threshold(self.detector.rounds, self.params)
        self.flagged = entropy_split(normalised, tau)
        return tau

    def guarded(self) -> torch.Tensor:
        """The suspicious mask after the label rule (the flags as they are before its check model is trained)."""
        return self.guard.split(self.flagged, self.data.labels, self.detector.history)

    def warm_up(self, scored: Callable[[float], None]) -> None:
        """One Victim epoch on all data, `warm_up` - 1 epochs on its own flags, each epoch followed by a scoring round
        (`scored(tau)` after each); with `split_rule=labels`, then the check model on the last round's credible
        side."""
        self.train_epoch(torch.arange(len(self.data), device=self.runtime.device), "victim warm-up (all data)")
        for _ in range(self.params.warm_up - 1):
            scored(self.score())
            self.train_on_flags(f"victim warm-up round {self.detector.rounds}")
        scored(self.score())
        if self.params.split_rule == "labels":
            epochs = self.params.check_epochs
            self.guard.train_check(self.bundle, self.data, self.flagged, self.train, epochs, self.runtime)

    def state_dict(self) -> dict[str, Any]:
        return {
            "victim": self.model.state_dict(),
            "victim_optimizer": self.optimizer.state_dict(),
            "detector": self.detector.state_dict(),
            "logits": self.logits,
            "flagged": self.flagged,
            "guard": self.guard.state_dict(),
            "victim_epochs": self.epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["victim"])
        self.optimizer.load_state_dict(state["victim_optimizer"])
        self.detector.load_state_dict(state["detector"])
        self.logits, self.flagged = state["logits"], state["flagged"]
        self.guard.load_state_dict(state["guard"])
        self.epochs = int(state["victim_epochs"])
