"""ABL, Anti-Backdoor Learning (Li et al., NeurIPS 2021; docs/methods/abl.md): a network trained with local gradient
ascent (LGA) cannot push a batch's loss below gamma, so the samples it still fits far below gamma, those learned
fastest, are mostly poison. The lowest-loss share is isolated; the network trains on the rest and then unlearns the
isolated share by gradient ascent.

Three stages share the run's epoch budget, in this order on one network: isolation (LGA on the whole training set,
the run's lr held constant, no augmentation), training (the rest, the run's lr schedule and augmentation) and
unlearning (gradient ascent on the isolated samples at `unlearning_lr`). All three train through the one `Trainer`.

Run folder: checkpoint.pt after every epoch of every stage, metrics.jsonl (one row per epoch, with its stage), and at
the end isolation.npy (bool (N,): the isolated samples) and losses.npy (float32 (N,): each sample's loss under the
isolation model, the detector's score; low = suspicious).

The isolation itself (`IsolationParams`, `lga_loss`, `isolation_config`, `train_isolation_model`, `sample_losses`,
`isolate`) takes a network, an ImageSet and a TrainConfig, never a TrainingJob: `bdguard detect --detector abl`
uses the same functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bdguard.config import check_range
from bdguard.data.augment import Augment
from bdguard.data.base import ImageSet
from bdguard.defenses.base import DefenseResult, TrainingDefense, TrainingJob, detector_entry
from bdguard.defenses.registry import DEFENSES
from bdguard.defenses.vab.victim import victim_logits
from bdguard.errors import BdguardError
from bdguard.io import write_array
from bdguard.progress import log, number
from bdguard.training.config import TrainConfig
from bdguard.training.metrics import detection_metrics
from bdguard.training.runtime import Checkpoint, RunClock, Runtime, steps_per_epoch
from bdguard.training.trainer import Trainer, fit, make_augment

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

STAGES = ("isolation", "training", "unlearning")


def _check_open(name: str, value: float, low: float, high: float) -> None:
    if not low < value < high:
        raise BdguardError(f"{name} must be in ({low:g}, {high:g}), got {value}")


# -- the isolation: shared with the detector -------------------------------------------------------------------


@dataclass
class IsolationParams:
    """What the ABL defense and the ABL detector share. The isolation stage lasts `isolation_epochs` epochs, or,
    when that is None, `isolation_share` of the run's epochs (the paper: T_te = 20 of T = 100), at least one."""

    prefix: ClassVar[str] = "abl."  # how error messages name the settings

    isolation_share: float = 0.2
    isolation_epochs: int | None = None
    isolation_ratio: float = 0.01  # the share of the training set isolated: the lowest losses
    gamma: float = 0.5  # the LGA floor on the batch's mean cross-entropy

    def __post_init__(self) -> None:
        name = self.prefix
        _check_open(f"{name}isolation_share", self.isolation_share, 0.0, 1.0)
        if self.isolation_epochs is not None:
            check_range(f"{name}isolation_epochs", self.isolation_epochs, 1)
        _check_open(f"{name}isolation_ratio", self.isolation_ratio, 0.0, 1.0)
        if not self.gamma > 0.0:
            raise BdguardError(f"{name}gamma must be > 0, got {self.gamma}")

    def isolation_epochs_of(self, budget: int) -> int:
        """The isolation stage's epochs within a run of `budget` epochs."""
        if self.isolation_epochs is not None:
            return self.isolation_epochs
        return max(1, round(self.isolation_share * budget))


def lga_loss(gamma: float) -> Loss:
    """LGA on a batch: sign(CE - gamma) * CE of the batch's mean cross-entropy, as the authors' code computes it:
    descent while the loss is above gamma, ascent below, so it hovers at gamma. (The authors' default form,
    flooding, |CE - gamma| + gamma, has the same gradient; only the logged value differs, by 2 gamma below it.)"""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        return torch.sign(ce - gamma) * ce

    return loss


def ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: the negative mean cross-entropy."""
    return -F.cross_entropy(logits, labels)


def isolation_config(train: TrainConfig, params: IsolationParams) -> TrainConfig:
    """The isolation model's training as the authors run it: the run's optimiser and lr, held constant, without
    augmentation, for the isolation stage's share of `train.epochs`."""
    epochs = params.isolation_epochs_of(train.epochs)
    return dataclasses.replace(train, epochs=epochs, schedule="constant", augment=False)


def isolation_trainer(
    model: torch.nn.Module, size: int, train: TrainConfig, gamma: float, augment: Augment | None, device: torch.device
) -> Trainer:
    """A Trainer with the LGA loss for a training set of `size` samples."""
    return Trainer(model, train, device, augment, steps_per_epoch(size, train.batch_size), loss=lga_loss(gamma))


def train_isolation_model(
    model: torch.nn.Module,
    data: ImageSet,
    train: TrainConfig,
    gamma: float,
    augment: Augment | None = None,
    device: torch.device | None = None,
    quiet: bool = False,
    run_dir: Path | None = None,
    *,
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    fingerprint: str = "",
    resume: bool = False,
    clock: RunClock | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place with LGA on `data` for `train.epochs` epochs (`isolation_config` gives the authors'
    settings); with `run_dir`, a checkpoint after every epoch and `resume` as in `fit`. Returns fit's rows."""
    device = data.device if device is None else device
    trainer = isolation_trainer(model, len(data), train, gamma, augment, device)
    return fit(
        trainer,
        data,
        evaluate or (lambda _: {}),
        run_dir,
        fingerprint=fingerprint,
        resume=resume,
        quiet=quiet,
        clock=clock,
    )


def sample_losses(
    model: torch.nn.Module, data: ImageSet, batch_size: int = 512, runtime: Runtime | None = None
) -> torch.Tensor:
    """(N,) float: every sample's cross-entropy under `model` in eval mode, without augmentation; by default in
    float32 (bfloat16 logits would tie many of the smallest losses, the ones isolated)."""
    runtime = Runtime(data.device, amp=False) if runtime is None else runtime
    logits = victim_logits(model, data.images, batch_size, runtime)
    return F.cross_entropy(logits, data.labels.to(logits.device), reduction="none")


def isolate(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """bool (N,): the floor(ratio * N) samples of lowest loss (at least one; ties by index)."""
    _check_open("isolation ratio", ratio, 0.0, 1.0)
    count = max(1, math.floor(losses.numel() * ratio + 1e-9))  # + 1e-9: 0.07 * 100 is 7.000000000000001 or 6.99..
    mask = torch.zeros(losses.numel(), dtype=torch.bool, device=losses.device)
    mask[torch.argsort(losses, stable=True)[:count]] = True
    return mask


# -- the defense -------------------------------------------------------------------------------------------------


@dataclass
class AblParams(IsolationParams):
    """The defense's settings beyond the isolation. Unlearning lasts `unlearning_epochs` epochs (passes over the
    isolated samples), or `unlearning_share` of the run's epochs when that is None (at least one unless the share
    is 0); training takes the rest, at least one epoch."""

    unlearning_share: float = 0.2
    unlearning_epochs: int | None = None
    unlearning_lr: float = 5e-4  # constant

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.prefix
        check_range(f"{name}unlearning_share", self.unlearning_share, 0.0)
        if not self.unlearning_share < 1.0:
            raise BdguardError(f"{name}unlearning_share must be in [0, 1), got {self.unlearning_share}")
        if self.unlearning_epochs is not None:
            check_range(f"{name}unlearning_epochs", self.unlearning_epochs, 0)
        if not self.unlearning_lr > 0.0:
            raise BdguardError(f"{name}unlearning_lr must be > 0, got {self.unlearning_lr}")


@dataclass(frozen=True)
class AblSchedule:
    """Epochs per stage; they sum to the run's `train.epochs`."""

    isolation: int
    training: int
    unlearning: int

    def epochs(self, stage: str) -> int:
        return getattr(self, stage)

    def before(self, stage: str) -> int:
        """Epochs of the run spent before `stage` starts."""
        return sum(self.epochs(s) for s in STAGES[: STAGES.index(stage)])


def make_abl_schedule(epochs: int, params: AblParams) -> AblSchedule:
    isolation = params.isolation_epochs_of(epochs)
    if params.unlearning_epochs is not None:
        unlearning = params.unlearning_epochs
    else:
        unlearning = max(1, round(params.unlearning_share * epochs)) if params.unlearning_share > 0 else 0
    training = epochs - isolation - unlearning
    if training < 1:
        raise BdguardError(
            f"abl: train.epochs = {epochs} leaves no training epoch after {isolation} isolation and {unlearning} "
            f"unlearning epochs; give at least {isolation + unlearning + 1} epochs, or lower "
            f"{params.prefix}isolation_share / {params.prefix}unlearning_share"
        )
    return AblSchedule(isolation, training, unlearning)


@DEFENSES.register
class AblDefense(TrainingDefense):
    name = "abl"
    description = (
        "ABL (Li et al., NeurIPS 2021): LGA training isolates the lowest-loss share of the training set, the model "
        "trains on the rest and unlearns the isolated share by gradient ascent, within the run's epochs"
    )
    Params = AblParams

    def train(self, job: TrainingJob) -> DefenseResult:
        return _AblRun(job, self.params).run()


class _AblRun:
    """One ABL run: the network, the isolation so far, and the metrics rows."""

    def __init__(self, job: TrainingJob, params: AblParams) -> None:
        self.job, self.params = job, params
        self.data = job.poisoned.train
        self.schedule = make_abl_schedule(job.train.epochs, params)
        self.model = job.new_model()
        self.stage = STAGES[0]
        self.epoch = 0  # the last finished epoch of `stage`
        self.losses: torch.Tensor | None = None  # (N,) under the isolation model
        self.isolated: torch.Tensor | None = None  # bool (N,)
        self.history: list[dict[str, Any]] = []
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.checkpoint = (
            Checkpoint(job.run_dir, job.fingerprint, {"metrics.jsonl": "history"}) if job.run_dir is not None else None
        )

    def _config(self, stage: str) -> TrainConfig:
        train, epochs = self.job.train, self.schedule.epochs(stage)
        if stage == "isolation":
            return isolation_config(train, self.params)
        if stage == "training":
            return dataclasses.replace(train, epochs=epochs)
        # the authors' unlearning: a constant small lr, no augmentation
        return dataclasses.replace(
            train, epochs=epochs, lr=self.params.unlearning_lr, schedule="constant", augment=False
        )

    def _trainer(self, stage: str, data: ImageSet) -> Trainer:
        config = self._config(stage)
        augment = make_augment(config, self.job.bundle.flip)
        if stage == "isolation":
            return isolation_trainer(self.model, len(data), config, self.params.gamma, augment, self.job.device)
        loss = ascent_loss if stage == "unlearning" else None
        steps = steps_per_epoch(len(data), config.batch_size)
        return Trainer(self.model, config, self.job.device, augment, steps, loss=loss)

    def _data(self, stage: str) -> ImageSet:
        if stage == "isolation":
            return self.data
        if self.isolated is None:
            self._isolate()
        return self.data.subset(self.isolated if stage == "unlearning" else ~self.isolated)

    def run(self) -> DefenseResult:
        state = None
        if self.job.resume and self.checkpoint is not None and self.checkpoint.exists():
            state = self.checkpoint.load(self.job.device, self.job.clock)
            with self.checkpoint.restoring():
                self.stage, self.epoch = STAGES[STAGES.index(state["stage"])], int(state["epoch"])
                self.losses, self.isolated = state["losses"], state["isolated"]
                self.history, self.seconds = list(state["history"]), dict(state["seconds"])
            log(f"ABL: resuming after {self.stage} epoch {self.epoch} from {self.checkpoint.path}")
        for stage in STAGES[STAGES.index(self.stage) :]:
            if self.schedule.epochs(stage) == 0:
                continue
            data = self._data(stage)
            trainer = self._trainer(stage, data)
            if state is not None and stage == state["stage"]:
                with self.checkpoint.restoring():
                    trainer.load_state_dict(state["trainer"])
            else:
                self.stage, self.epoch = stage, 0
            for epoch in range(self.epoch + 1, self.schedule.epochs(stage) + 1):
                self._epoch(trainer, data, epoch)
        return self._finish()

    def _epoch(self, trainer: Trainer, data: ImageSet, epoch: int) -> None:
        stage, schedule = self.stage, self.schedule
        began = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": schedule.before(stage) + epoch,
            "stage": stage,
            "stage_epoch": epoch,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "samples": len(data),
        }
        row.update(trainer.train_epoch(data, epoch, self.job.quiet))
        row["train_seconds"] = time.perf_counter() - began
        self.seconds[stage] += row["train_seconds"]
        row.update(self.job.evaluate(self.model))
        row["seconds"] = time.perf_counter() - began
        self.history.append(row)
        self.epoch = epoch
        log(_epoch_summary(row, schedule))
        if self.checkpoint is not None:
            state = {
                "stage": stage,
                "epoch": epoch,
                "trainer": trainer.state_dict(),
                "losses": self.losses,
                "isolated": self.isolated,
                "history": self.history,
                "seconds": self.seconds,
            }
            self.checkpoint.save(state, self.job.clock)

    def _isolate(self) -> None:
        """Score every sample with the isolation model and isolate the lowest losses; report against the truth."""
        train = self.job.train
        runtime = Runtime(self.job.device, amp=False, channels_last=train.channels_last)
        self.losses = sample_losses(self.model, self.data, train.eval_batch_size, runtime)
        self.isolated = isolate(self.losses, self.params.isolation_ratio)
        log(_detector_summary(self._detector()))

    def _detector(self) -> dict[str, Any]:
        """The isolation measured against the ground truth: for reports only."""
        poisoned = self.job.poisoned
        return detector_entry(detection_metrics(-self.losses, self.isolated, poisoned.poison_mask, poisoned.cross_mask))

    def _finish(self) -> DefenseResult:
        run_dir = self.job.run_dir
        if run_dir is not None:
            write_array(run_dir / "isolation.npy", self.isolated)
            write_array(run_dir / "losses.npy", self.losses.float())
        schedule = self.schedule
        details = {
            "schedule": {stage: schedule.epochs(stage) for stage in STAGES},
            "seconds_by_stage": {key: round(value, 2) for key, value in self.seconds.items()},
        }
        # low loss under the isolation model = suspicious
        return DefenseResult(self.model, self._detector(), details=details, scores=-self.losses, flagged=self.isolated)


def _detector_summary(detector: dict[str, Any]) -> str:
    parts = [f"ABL isolation: {detector['flagged']} samples"]
    for key in ("tpr", "fpr", "precision", "auroc"):
        parts.append(f"{key.upper() if key != 'precision' else key} {number(detector[key])}")
    return "  ".join(parts)


def _epoch_summary(row: dict[str, Any], schedule: AblSchedule) -> str:
    stage = row["stage"]
    parts = [
        f"epoch {row['epoch']}/{schedule.isolation + schedule.training + schedule.unlearning}",
        f"[{stage} {row['stage_epoch']}/{schedule.epochs(stage)}]",
        f"loss {row['loss']:.4f}",
        f"train acc {row['train_acc']:.3f}",
    ]
    for key in ("ba", "asr", "ra"):
        if row.get(key) is not None:
            parts.append(f"{key.upper()} {row[key]:.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
