"""The defense interface. A training-time defense turns a (possibly poisoned) training set into a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from bdguard.attacks.base import PoisonedSet, TriggeredSet
from bdguard.config import from_dict
from bdguard.data.base import DataBundle
from bdguard.training.config import TrainConfig


@dataclass
class DefenseConfig:
    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoParams:
    pass


@dataclass
class TrainingJob:
    """Everything a training-time defense may use. `poisoned.poison_mask` is ground truth: for reports only."""

    bundle: DataBundle  # on `device`; its train split is the clean original, never trained on
    poisoned: PoisonedSet  # the training set the defender is given
    triggered: TriggeredSet | None  # the attack's test-time set, for ASR/RA reporting
    train: TrainConfig
    device: torch.device
    new_model: Callable[[], torch.nn.Module]
    evaluate: Callable[[torch.nn.Module], dict[str, Any]]
    run_dir: Path | None
    fingerprint: str
    resume: bool
    quiet: bool


class Defense(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    stage: ClassVar[Literal["training", "post-training"]]
    Params: ClassVar[type] = NoParams

    def __init__(self, config: DefenseConfig) -> None:
        self.config = config
        self.params = from_dict(self.Params, config.params, prefix=f"{self.name}.")


class TrainingDefense(Defense):
    stage = "training"

    @abstractmethod
    def train(self, job: TrainingJob) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Train and return the model to deploy plus extra results (detector figures, stage timings)."""
