"""The detector interface: score every sample of a training set (higher = more suspicious) and flag some of them
by the detector's own threshold. Detectors see the data as the defender gets it; ground truth, where bdguard
poisoned the set, is read only by the run that reports against it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from bdguard.config import NoParams, from_dict
from bdguard.data.base import DataBundle, ImageSet
from bdguard.models.base import BackdoorModel
from bdguard.training.config import TrainConfig


@dataclass
class DetectorConfig:
    name: str = "vab"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DetectionJob:
    """Everything a detector may use. `model()` is the model trained on `data` that model-based detectors inspect:
    the one given with --model, or the undefended model, trained (once, resumably) on first call."""

    data: ImageSet  # the training set to score, on `device`, labels as given
    bundle: DataBundle  # class names and shapes; its test split is clean held-out data (STRIP's threshold)
    train: TrainConfig  # how a detector trains a network of its own; batch sizes and amp
    device: torch.device
    model: Callable[[], BackdoorModel]
    run_dir: Path | None
    quiet: bool
    seed: int


@dataclass
class Detection:
    scores: torch.Tensor  # float (N,): higher = more suspicious
    flagged: torch.Tensor  # bool (N,): the detector's own threshold
    threshold: str  # the rule that flagged, in words (with its value)
    extra: dict[str, Any] = field(default_factory=dict)  # what else the detector measured (per-label figures, ...)


class Detector(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    uses_model: ClassVar[bool]  # inspects `job.model()` (else it trains what it needs itself)
    reads_feature_map: ClassVar[bool] = False  # reads the model's feature map (refused for a network without one)
    reads_held_out: ClassVar[bool] = False  # draws its threshold from the clean test split (`job.bundle.test`)
    Params: ClassVar[type] = NoParams

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.params = from_dict(self.Params, config.params, prefix=f"{self.name}.")

    @abstractmethod
    def detect(self, job: DetectionJob) -> Detection:
        """Score every sample of `job.data`."""
