"""What every training loop shares: where tensors meet a network (device, memory format, mixed precision), the
seeded batches of an epoch, the run's clock, and the checkpoint that makes a run resumable.

Plain training (`trainer.py`), V&B and every later training-time defense use these, so a run is reproduced and
resumed the same way whatever trains it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdguard.data.augment import to_float
from bdguard.errors import BdguardError
from bdguard.io import write_jsonl, write_with

CHECKPOINT = "checkpoint.pt"  # a run folder holding this file holds a (possibly unfinished) run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BdguardError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise BdguardError(f"device {name!r}: bdguard trains on cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BdguardError(f"device {name!r} was asked for but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BdguardError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BdguardError(f"device {name!r} was asked for but MPS (Apple's GPU) is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA (no loss scaling needed); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class Runtime:
    """How uint8 batches become network inputs on the training device.

    channels_last applies on every device: on CPU it is measured faster too (benchmarks/RESULTS.md: small-cnn on
    28x28 about 2x, resnet20 on 32x32 about 1.3x); bfloat16 autocast only on CUDA.
    """

    device: torch.device
    amp: bool = True
    channels_last: bool = True
    quiet: bool = False

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float in [0, 1] in the networks' memory format (the models normalise inside)."""
        return self.layout(to_float(images))

    def autocast(self):
        """The context of every training forward pass (and its loss): where precision is decided, once."""
        return autocast(self.device, self.amp)

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float | None = None) -> None:
        """The one optimisation step of every training loop (trainer, Victim, Beneficiary, check model; ABL through
        the trainer): back-propagate `loss` (already scaled to this rank's share of the batch) and step, at `lr`
        when given."""
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def check_finite(loss: float | None, where: str, settings: str) -> None:
    """Stop a run whose loss is no longer a number: its weights are lost, and nothing that looks like a result may
    be written from them. The last checkpoint (written before this epoch) stays as it was."""
    if loss is not None and not math.isfinite(loss):
        raise BdguardError(
            f"training diverged in {where}: the loss is {loss}; nothing of this epoch was kept (the last checkpoint "
            f"is); look at {settings}"
        )


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of one epoch's shuffle and augmentation: a resumed run draws the same numbers."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def batch_indices(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index batches over range(n). A last batch of one sample joins the one before: BatchNorm in training mode
    needs more than one value per channel, and a network whose last map is 1x1 (an ImageNet ResNet on 16-pixel
    images) has only the batch to give them."""
    device = generator.device
    order = torch.randperm(n, generator=generator, device=device) if shuffle else torch.arange(n, device=device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    yield from batches


def cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches over range(n), reshuffled whenever exhausted (a data loader that restarts)."""
    while True:
        yield from batch_indices(n, batch_size, generator)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `batch_indices` gives."""
    return max(1, n // batch_size) if n % batch_size == 1 else -(-n // batch_size)


@dataclass
class RunClock:
    """Wall seconds of a run summed over its invocations: what earlier ones had spent when they wrote their last
    checkpoint (kept in it as "elapsed"), plus this one's time so far. Work an interruption lost is not counted."""

    before: float = 0.0
    began: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.began


@dataclass(frozen=True)
class Checkpoint:
    """A run folder's checkpoint.pt and the per-epoch logs derived from it.

    `logs` maps a JSON-lines file of the folder to the key of the state that holds its rows. The checkpoint is
    written first and the logs after it, each atomically; a resumed run rewrites the logs from the checkpoint, so a
    kill between the two writes never leaves a log that disagrees with the state it resumes from.
    """

    folder: Path
    fingerprint: str  # of the settings; a checkpoint of other settings is refused
    logs: Mapping[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / CHECKPOINT

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict[str, Any], clock: RunClock) -> None:
        state = {**state, "fingerprint": self.fingerprint, "elapsed": clock.elapsed()}
        try:
            write_with(self.path, lambda handle: torch.save(state, handle))
        except RuntimeError as exc:  # torch's zip writer reports a full disk as a RuntimeError
            raise BdguardError(
                f"cannot write {self.path} ({str(exc).splitlines()[0]}): is the disk full? The previous checkpoint "
                "is kept; continue with --resume once there is room"
            ) from None
        self._write_logs(state)

    def load(self, device: torch.device, clock: RunClock) -> dict[str, Any]:
        """Our own checkpoint, read without unpickling arbitrary objects and refused unless made with the same
        settings; the clock takes back the time it records."""
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as exc:  # any failure here means a damaged or foreign file
            raise BdguardError(
                f"cannot resume: {self.path} is not a readable bdguard checkpoint ({type(exc).__name__})"
            ) from None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise BdguardError(f"cannot resume: {self.path} was written with different settings or by another program")
        with self.restoring():
            clock.before = float(state.get("elapsed", 0.0))
            self._write_logs(state)
        return state

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Around the code that puts a loaded state back: a checkpoint of this run's settings but of another layout
        (a missing entry, a renamed parameter, an empty optimiser: a damaged or hand-made file) is refused in one
        line instead of failing half-way through the restore."""
        try:
            yield
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise BdguardError(
                f"cannot resume: {self.path} does not hold this run's state ({type(exc).__name__}: {detail[:200]}); "
                "remove it to start the run again"
            ) from None

    def _write_logs(self, state: dict[str, Any]) -> None:
        for name, key in self.logs.items():
            write_jsonl(self.folder / name, state[key])
