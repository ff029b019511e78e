"""The training settings shared by every method that trains a network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bdguard.config import check_range, check_seed
from bdguard.errors import BdguardError


@dataclass
class TrainConfig:
    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: where lr drops, as fractions of the run
    gamma: float = 0.1  # step schedule: lr factor at each milestone
    warmup: float = 0.0  # onecycle: fraction of the run spent rising to the peak lr (0 means 0.3)
    label_smoothing: float = 0.0
    augment: bool = True
    crop_padding: int = 4
    flip: bool | None = None  # None: flip where the data set allows it
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    amp: bool = True  # bfloat16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, 1)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.eval_batch_size", self.eval_batch_size, 1)
        check_range("train.lr", self.lr, 0.0)
        check_range("train.momentum", self.momentum, 0.0, 1.0)
        check_range("train.weight_decay", self.weight_decay, 0.0)
        check_range("train.gamma", self.gamma, 0.0, 1.0)
        check_range("train.warmup", self.warmup, 0.0, 1.0)
        check_range("train.label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_range("train.crop_padding", self.crop_padding, 0)
        check_range("train.threads", self.threads, 0)
        check_seed("train.seed", self.seed)
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise BdguardError(f"train.milestones are fractions of the run in (0, 1), got {list(self.milestones)}")
