"""The in-memory form of every data set: one uint8 image tensor and one int64 label tensor per split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bdguard.errors import BdguardError


@dataclass(frozen=True)
class ImageSet:
    """Images as one uint8 tensor (N, C, H, W) and labels as one int64 tensor (N,); for a set read from files, the
    file each image came from (its path below the data folder), carried through subsets and poisoning."""

    images: torch.Tensor
    labels: torch.Tensor
    files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise BdguardError(
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise BdguardError(
                f"labels must be an int64 tensor of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.files is not None and len(self.files) != self.images.shape[0]:
            raise BdguardError(f"{len(self.files)} file names for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.files)

    def subset(self, index: torch.Tensor) -> ImageSet:
        """Rows selected by an index tensor or a boolean mask."""
        files = None
        if self.files is not None:
            rows = torch.as_tensor(index).cpu()
            rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows.flatten()
            files = tuple(self.files[i] for i in rows.tolist())
        return ImageSet(self.images[index], self.labels[index], files)


@dataclass(frozen=True)
class DataBundle:
    """A named data set: train and test splits plus what a model and an augmentation need to know."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # whether a horizontal flip keeps the label (true for objects, false for digits and signs)
    source: str  # human-readable provenance: a path, an archive, a package
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train.image_shape != self.test.image_shape:
            raise BdguardError(
                f"{self.name}: train images are {self.train.image_shape} but test images are {self.test.image_shape}"
            )
        channels = self.train.image_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise BdguardError(f"{self.name}: mean/std must have one value per channel ({channels})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def to(self, device: torch.device | str) -> DataBundle:
        return DataBundle(
            self.name,
            self.train.to(device),
            self.test.to(device),
            self.classes,
            self.mean,
            self.std,
            self.flip,
            self.source,
            self.extra,
        )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale, in chunks to bound memory."""
    n, c = images.shape[:2]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, 4096):
        chunk = images[start : start + 4096].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3)).cpu()
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3)).cpu()
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@dataclass(frozen=True)
class PoisonedSet:
    """A poisoned training set plus its provenance, which only evaluation may read."""

    train: ImageSet  # images with triggers inserted, labels as the attacker set them
    poison_mask: torch.Tensor  # bool (N,): trigger inserted
    cross_mask: torch.Tensor  # bool (N,): noise/cross samples (WaNet, IAD), labels kept
    original_labels: torch.Tensor  # int64 (N,)
    manifest: dict[str, Any]


@dataclass(frozen=True)
class TriggeredSet:
    """Triggered test images with their true classes and the classes the attacker wants."""

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]
