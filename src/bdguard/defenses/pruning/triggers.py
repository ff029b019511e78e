"""The trigger that scores channels (docs/methods/linf-pruning.md 5): Neural Cleanse's reverse-engineered one, the
attack's real one (oracle analysis only), or none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bdguard.defenses.base import RepairJob
from bdguard.defenses.neural_cleanse import NcParams, reverse_engineer
from bdguard.defenses.pruning.params import PruneParams, TriggerSource
from bdguard.errors import BdguardError
from bdguard.training.metrics import predict


@dataclass(frozen=True)
class ScoringTrigger:
    source: TriggerSource
    apply: Callable[[torch.Tensor], torch.Tensor] | None  # uint8 -> uint8; None for source "none"
    target: int | None  # the label the trigger sends images to, as the defender knows it
    report: dict[str, Any] = field(default_factory=dict)  # Neural Cleanse's figures, for pruning.json


def scoring_trigger(job: RepairJob, params: PruneParams) -> ScoringTrigger:
    """Resolve `params.trigger`. Only the oracle source touches `job.oracle`, the attack's real trigger."""
    if params.trigger == "none":
        return ScoringTrigger("none", None, None)
    if params.trigger == "oracle":
        if job.oracle is None:
            raise BdguardError("trigger=oracle needs an attack with a trigger; this run's attack has none")
        # the target is what the real trigger makes the model predict most, so no ground-truth label is read
        stamped = predict(job.model, job.oracle(job.probe.images), job.train.eval_batch_size, job.train.amp)
        target = int(torch.bincount(stamped, minlength=job.model.num_classes).argmax())
        return ScoringTrigger("oracle", job.oracle, target)
    nc = NcParams(steps=params.nc_steps, labels=params.nc_labels, seed=params.seed)
    found = reverse_engineer(job.model, job.probe.images, nc, job.quiet)
    return ScoringTrigger("reverse", found.apply, found.target, {"neural_cleanse": found.to_json()})
