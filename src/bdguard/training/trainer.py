"""The one training loop: shuffled batches from a device tensor, batched augmentation, per-epoch
evaluation, a checkpoint after every epoch and an exact resume from it; data-parallel under torchrun
(`bdguard.distributed`), where each rank trains on its share of every batch and only the main rank writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bdguard import distributed
from bdguard.data.augment import Augment
from bdguard.data.base import ImageSet
from bdguard.progress import log, progress_bar
from bdguard.training.config import TrainConfig
from bdguard.training.runtime import Checkpoint, RunClock, Runtime, batch_indices, check_finite, epoch_generator
from bdguard.training.schedule import make_optimizer, make_scheduler


def make_augment(config: TrainConfig, dataset_flip: bool) -> Augment | None:
    """The standard crop (+ flip where the data set allows it, unless overridden), or None when off."""
    if not config.augment:
        return None
    return Augment(config.crop_padding, dataset_flip if config.flip is None else config.flip)


@dataclass
class Trainer:
    """Plain supervised training of one model; owns its optimiser and lr schedule."""

    model: torch.nn.Module
    config: TrainConfig
    device: torch.device
    augment: Augment | None
    steps: int  # iterations per epoch, for the schedule
    # (logits, labels) -> the batch's loss; None: cross-entropy with the config's label smoothing
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    runtime: Runtime = field(init=False)
    network: torch.nn.Module = field(init=False)  # what trains: `model`, in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)

    def __post_init__(self) -> None:
        self.runtime = Runtime(self.device, self.config.amp, self.config.channels_last)
        self.runtime.prepare(self.model)
        self.network = distributed.wrap(self.model, self.device)
        self.optimizer = make_optimizer(self.model.parameters(), self.config)
        self.scheduler = make_scheduler(self.optimizer, self.config, self.steps)

    def train_epoch(self, data: ImageSet, epoch: int, quiet: bool = False) -> dict[str, float]:
        self.model.train()
        generator = epoch_generator(self.config.seed, epoch, self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        with progress_bar(f"epoch {epoch}/{self.config.epochs}", self.steps, quiet) as bar:
            for step, idx in enumerate(batch_indices(len(data), self.config.batch_size, generator)):
                images = data.images[idx]
                if self.augment is not None:  # the whole batch on every rank: their generators stay in step
                    images = self.augment(images, generator)
                part, factor = distributed.split(idx.numel())
                x, y = self.runtime.inputs(images[part]), data.labels[idx][part]
                with self.runtime.autocast():
                    logits = self.network(x)
                    if self.loss is None:
                        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
                    else:
                        loss = self.loss(logits, y)
                self.runtime.step(self.optimizer, loss * factor)
                self.scheduler.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.argmax(1) == y).sum()
                seen += y.shape[0]
                if step % 20 == 0:  # reading the loss syncs the device: not every step
                    bar.update(1, loss=float(loss_sum) / seen)
                else:
                    bar.update(1)
        totals = distributed.all_sum(torch.stack([loss_sum, correct.to(loss_sum.dtype)]))
        loss = float(totals[0]) / len(data)
        check_finite(loss, f"epoch {epoch}", f"the learning rate (train.lr = {self.config.lr:g})")
        return {"loss": loss, "train_acc": float(totals[1]) / len(data)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def fit(
    trainer: Trainer,
    data: ImageSet,
    evaluate: Callable[[torch.nn.Module], dict[str, Any]],
    run_dir: Path | None = None,
    *,
    fingerprint: str = "",
    resume: bool = False,
    quiet: bool = False,
    clock: RunClock | None = None,
) -> list[dict[str, Any]]:
    """Train for `config.epochs`, evaluating after each epoch; returns one metrics row per epoch.

    With `run_dir`, every epoch leaves `checkpoint.pt` and `metrics.jsonl` consistent with each other, and
    `resume=True` continues from the checkpoint to the same weights as an uninterrupted run (and `clock` from the
    time the checkpoint records).
    """
    clock = clock or RunClock()
    config = trainer.config
    history: list[dict[str, Any]] = []
    start = 1
    checkpoint = Checkpoint(run_dir, fingerprint, {"metrics.jsonl": "history"}) if run_dir is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        state = checkpoint.load(trainer.device, clock)
        with checkpoint.restoring():
            trainer.load_state_dict(state["trainer"])
            history = list(state["history"])
            start = int(state["epoch"]) + 1
        log(f"resuming after epoch {start - 1} from {checkpoint.path}")
    for epoch in range(start, config.epochs + 1):
        began = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": trainer.optimizer.param_groups[0]["lr"]}
        row.update(trainer.train_epoch(data, epoch, quiet))
        row["train_seconds"] = time.perf_counter() - began
        if distributed.is_main():  # the one rank that reports; the others go on to the next epoch
            row.update(evaluate(trainer.model))
        row["seconds"] = time.perf_counter() - began
        history.append(row)
        log(_summary(row, config.epochs))
        if checkpoint is not None and distributed.is_main():
            checkpoint.save({"trainer": trainer.state_dict(), "epoch": epoch, "history": history}, clock)
    return history


def _summary(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"train acc {row['train_acc']:.3f}"]
    for key in ("ba", "asr", "ra"):
        if row.get(key) is not None:
            parts.append(f"{key.upper()} {row[key]:.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
