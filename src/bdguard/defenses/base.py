"""The defense interface. A training-time defense turns a (possibly poisoned) training set into a model; a
post-training defense repairs a model that was already trained (pruning, unlearning)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from bdguard.config import NoParams, from_dict, with_preset
from bdguard.data.base import DataBundle, ImageSet, PoisonedSet, TriggeredSet
from bdguard.models.base import BackdoorModel
from bdguard.results import DETECTOR_KEYS, Plots
from bdguard.training.config import TrainConfig
from bdguard.training.metrics import Evaluator
from bdguard.training.runtime import RunClock


@dataclass(frozen=True)
class Figure:
    """A PNG a defense wrote into its run folder, and what it shows (the report's caption)."""

    file: str
    caption: str


SCORES_FILE = "scores.csv"  # a detector's score and flag per training sample (train and detect folders alike)


@dataclass
class DefenseResult:
    """What every defense returns: the model to deploy and the one contract that results.json, the bench's table
    and the report read, so a new defense shows in all three without an edit to them.

    `detector`: the defense's own poisoned-sample detector measured against the ground truth (V&B's split, ABL's
    isolation), with `DETECTOR_KEYS`; `pruned_fraction`: the share of units a pruning defense removed;
    `backdoor_flagged`: a model-level verdict (Neural Cleanse's); `figures`: the PNGs it wrote, captioned;
    `details`: anything else, written into results.json under the defense's name.

    What the report draws for it, without knowing the defense: `scores` and `flagged`, its detector's score (higher =
    more suspicious) and flag per training sample, which the run writes to scores.csv and the report turns into an
    ROC curve; `series`, the keys of its per-epoch metrics.jsonl rows to plot beside BA/ASR/RA, with their labels;
    `rounds_file`, a JSON-lines file it wrote with one row (round, tpr, fpr, auroc) per scoring round."""

    model: torch.nn.Module
    detector: dict[str, Any] | None = None
    pruned_fraction: float | None = None
    backdoor_flagged: bool | None = None
    figures: tuple[Figure, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    series: dict[str, str] = field(default_factory=dict)
    rounds_file: str | None = None

    def __post_init__(self) -> None:
        if self.detector is not None and set(self.detector) != set(DETECTOR_KEYS):
            raise ValueError(f"a detector summary has the keys {DETECTOR_KEYS}, got {sorted(self.detector)}")
        if (self.scores is None) != (self.flagged is None):
            raise ValueError("a defense's per-sample scores come with its flags")

    def result_fields(self) -> dict[str, Any]:
        """The contract's part of the run's RunResult (bdguard.results)."""
        return {
            "detector": self.detector,
            "pruned_fraction": self.pruned_fraction,
            "backdoor_flagged": self.backdoor_flagged,
            "figures": [{"file": f.file, "caption": f.caption} for f in self.figures],
            "plots": Plots(dict(self.series), self.rounds_file, None if self.scores is None else SCORES_FILE),
            "details": self.details,
        }


def detector_entry(metrics: dict[str, Any]) -> dict[str, Any]:
    """The contract's detector entry from `training.metrics.detection_metrics`' output."""
    return {"flagged": metrics["suspicious"], **{key: metrics[key] for key in DETECTOR_KEYS if key != "flagged"}}


@dataclass
class DefenseConfig:
    name: str = "none"
    params: dict[str, Any] = field(default_factory=dict)


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
    clock: RunClock = field(default_factory=RunClock)  # checkpoints keep its time, a resumed run takes it back


class Defense(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    stage: ClassVar[Literal["training", "post-training"]]
    Params: ClassVar[type] = NoParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named sets of settings, chosen by the setting `preset`
    # reads the model's last convolutional feature map (`BackdoorModel.features`): refused up front for a network
    # without one (a vision transformer)
    reads_feature_map: ClassVar[bool] = False

    def __init__(self, config: DefenseConfig) -> None:
        self.config = config
        record = "preset" in {f.name for f in fields(self.Params)}
        settings = with_preset(config.params, self.presets, f"defense {self.name}", record)
        self.params = from_dict(self.Params, settings, prefix=f"{self.name}.")


class TrainingDefense(Defense):
    stage = "training"
    # trains data-parallel under torchrun (bdguard.distributed): every loop shards its batches and only the main
    # rank writes; a defense that does not is refused there, not run N times over
    data_parallel: ClassVar[bool] = False

    @abstractmethod
    def train(self, job: TrainingJob) -> DefenseResult:
        """Train and return the model to deploy with what the defense measured."""


@dataclass
class RepairJob:
    """Everything a post-training defense may use to repair a trained model.

    `probe` is the defender's clean, labelled data (a seeded hold-out of the test set or a user folder); it never
    enters `evaluate`, which reports BA on the test set minus the probe and ASR/RA on the remaining non-target
    images with the real trigger. `oracle` is the attack's own trigger (`Attack.apply`, uint8 -> uint8): it is
    ground truth, so a defense may call it only when the user chose its oracle trigger source (an upper-bound
    analysis); a practical defense must work from the model and the probe alone. `target` is for reports only.
    """

    model: BackdoorModel  # in eval mode on `device`
    bundle: DataBundle  # on `device`; for class names and shapes: its splits are not the defender's data
    probe: ImageSet  # on `device`
    oracle: Callable[[torch.Tensor], torch.Tensor] | None  # None when the attack has no trigger
    target: int | None
    evaluate: Evaluator  # model -> {"ba", "asr", "ra"} on the test set minus the probe
    train: TrainConfig  # fine-tuning settings (batch size, optimiser, amp)
    device: torch.device
    run_dir: Path | None
    quiet: bool
    seed: int


class PostTrainingDefense(Defense):
    stage = "post-training"

    @abstractmethod
    def repair(self, job: RepairJob) -> DefenseResult:
        """Return the repaired model (a `BackdoorModel`) with what the defense measured (the chosen prune level,
        the curve)."""
