"""What the post-training defenses share: fine-tuning on the probe set (pruning's optional step, Neural Cleanse's
unlearning) and the trigger success rate a defender can measure without labels."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from bdguard.defenses.base import RepairJob
from bdguard.training.metrics import accuracy
from bdguard.training.runtime import steps_per_epoch
from bdguard.training.trainer import Trainer, fit, make_augment


def fine_tune(job: RepairJob, epochs: int, lr: float, seed: int) -> list[dict[str, Any]]:
    """Train `job.model` on the labelled probe set with the run's train settings at `lr`; the feature mask is a
    buffer, so pruned channels stay zero. The per-epoch test metrics are logged, never used to choose."""
    config = dataclasses.replace(job.train, epochs=epochs, lr=lr, seed=seed)
    steps = steps_per_epoch(len(job.probe), config.batch_size)
    trainer = Trainer(job.model, config, job.device, make_augment(config, job.bundle.flip), steps)
    history = fit(trainer, job.probe, job.evaluate, quiet=job.quiet)
    job.model.eval()
    return history


def trigger_success(clean: torch.Tensor, stamped: torch.Tensor, target: int) -> float:
    """Probe ASR from predictions: the share of images not predicted as `target` when clean that are when
    stamped. No labels needed; NaN when every clean image is already predicted as the target."""
    eligible = clean != target
    return accuracy(stamped[eligible], torch.full_like(stamped[eligible], target))
