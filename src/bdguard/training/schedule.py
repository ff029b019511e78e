"""Optimisers and learning-rate schedules, stepped once per iteration so any budget scales them."""

from __future__ import annotations

import math

import torch

from bdguard.training.config import TrainConfig


def lr_factor(config: TrainConfig, progress: float) -> float:
    """The multiplier of the base lr after `progress` (0..1) of the run."""
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.gamma ** sum(progress >= m for m in config.milestones)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    # onecycle: linear rise from 1/25 of the peak, then cosine decay to 1/10^4 of the peak
    warm = config.warmup or 0.3
    if progress < warm:
        return 0.04 + 0.96 * progress / warm
    rest = min((progress - warm) / (1.0 - warm), 1.0)
    return 1e-4 + (1.0 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * rest))


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step / total))
