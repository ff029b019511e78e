"""The one training loop: shuffled batches from a device tensor, batched augmentation, per-epoch
evaluation, a checkpoint after every epoch and an exact resume from it."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bdguard.data.augment import Augment, to_float
from bdguard.data.base import ImageSet
from bdguard.errors import BdguardError
from bdguard.io import write_jsonl, write_with
from bdguard.progress import log, progress_bar
from bdguard.training.config import TrainConfig
from bdguard.training.metrics import autocast
from bdguard.training.schedule import make_optimizer, make_scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BdguardError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BdguardError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of one epoch's shuffle and augmentation: a resumed run draws the same numbers."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def batch_indices(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    device = generator.device
    order = torch.randperm(n, generator=generator, device=device) if shuffle else torch.arange(n, device=device)
    yield from order.split(batch_size)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def make_augment(config: TrainConfig, dataset_flip: bool) -> Augment | None:
    """The standard crop (+ flip where the data set allows it, unless overridden), or None when off."""
    if not config.augment:
        return None
    return Augment(config.crop_padding, dataset_flip if config.flip is None else config.flip)


@dataclass
class RunClock:
    """Wall seconds of a run summed over its invocations: what earlier ones had spent when they wrote their last
    checkpoint (kept in it as "elapsed"), plus this one's time so far. Work an interruption lost is not counted."""

    before: float = 0.0
    began: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.began


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    write_with(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path, device: torch.device, fingerprint: str) -> dict[str, Any]:
    """Our own checkpoint, read without unpickling arbitrary objects, refused unless made with the same settings."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # any failure here means a damaged or foreign file
        raise BdguardError(
            f"cannot resume: {path} is not a readable bdguard checkpoint ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise BdguardError(f"cannot resume: {path} was written with different settings or by another program")
    return state


@dataclass
class Trainer:
    """Plain supervised training of one model; owns its optimiser and lr schedule."""

    model: torch.nn.Module
    config: TrainConfig
    device: torch.device
    augment: Augment | None
    steps: int  # iterations per epoch, for the schedule
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)

    def __post_init__(self) -> None:
        if self.device.type == "cuda" and self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model.parameters(), self.config)
        self.scheduler = make_scheduler(self.optimizer, self.config, self.steps)

    def inputs(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 batch -> (augmented) float batch in the model's memory format."""
        if self.augment is not None and generator is not None:
            images = self.augment(images, generator)
        x = to_float(images)
        if self.device.type == "cuda" and self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_epoch(self, data: ImageSet, epoch: int, quiet: bool = False) -> dict[str, float]:
        self.model.train()
        generator = epoch_generator(self.config.seed, epoch, self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        with progress_bar(f"epoch {epoch}/{self.config.epochs}", self.steps, quiet) as bar:
            for step, idx in enumerate(batch_indices(len(data), self.config.batch_size, generator)):
                x = self.inputs(data.images[idx], generator)
                y = data.labels[idx]
                with autocast(self.device, self.config.amp):
                    logits = self.model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.argmax(1) == y).sum()
                if step % 20 == 0:  # reading the loss syncs the device: not every step
                    seen = min((step + 1) * self.config.batch_size, len(data))
                    bar.update(1, loss=float(loss_sum) / seen)
                else:
                    bar.update(1)
        return {"loss": float(loss_sum) / len(data), "train_acc": float(correct) / len(data)}

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
    checkpoint = run_dir / "checkpoint.pt" if run_dir is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, trainer.device, fingerprint)
        trainer.load_state_dict(state["trainer"])
        history = list(state["history"])
        start = int(state["epoch"]) + 1
        clock.before = float(state.get("elapsed", 0.0))
        log(f"resuming after epoch {start - 1} from {checkpoint}")
    for epoch in range(start, config.epochs + 1):
        began = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": trainer.optimizer.param_groups[0]["lr"]}
        row.update(trainer.train_epoch(data, epoch, quiet))
        row["train_seconds"] = time.perf_counter() - began
        row.update(evaluate(trainer.model))
        row["seconds"] = time.perf_counter() - began
        history.append(row)
        log(_summary(row, config.epochs))
        if checkpoint is not None:
            state = {
                "trainer": trainer.state_dict(),
                "epoch": epoch,
                "history": history,
                "fingerprint": fingerprint,
                "elapsed": clock.elapsed(),
            }
            save_checkpoint(checkpoint, state)
            write_jsonl(run_dir / "metrics.jsonl", history)
    return history


def _summary(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"train acc {row['train_acc']:.3f}"]
    for key in ("ba", "asr", "ra"):
        if row.get(key) is not None:
            parts.append(f"{key.upper()} {row[key]:.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
