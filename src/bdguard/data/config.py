"""What to load: the one configuration object of the data layer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bdguard.errors import BdguardError

MIN_IMAGE_SIZE = 4
MAX_IMAGE_SIZE = 1024


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # a registered name, or "imagefolder:<path>"
    data_root: str | None = None  # file or folder; None = search the default locations
    download: bool = False  # allow torchvision to download (cifar10, fashion-mnist, gtsrb); never by default
    # Resize to this square size (gtsrb defaults to 32; imagefolder needs it when sizes differ).
    image_size: int | None = None
    cache_dir: str | None = None  # default: $BDGUARD_CACHE, else ~/.cache/bdguard
    # Keep this many training images (a subset drawn with a fixed seed, the same for every run): quick runs on a CPU.
    train_size: int | None = None
    # Leave out these training samples (after poisoning, in load order): a .npy of bool flags over the training set
    # (`bdguard detect`'s flagged.npy) or of sample indices, or a text file of file names (a set read from files,
    # named as in detect's scores.csv). The practitioner's retraining without what was flagged.
    exclude: str | None = None
    # hf:<path> only: the columns that hold the images and the labels; None = found by their features (Image,
    # ClassLabel)
    image_column: str | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise BdguardError(f"dataset must be a non-empty name, got {self.dataset!r}")
        if not isinstance(self.download, bool):
            raise BdguardError(f"download must be true or false, got {self.download!r}")
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE
        ):
            raise BdguardError(
                f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {self.image_size!r}"
            )

        for key in ("image_column", "label_column"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise BdguardError(f"{key} must be a column name, got {value!r}")
        if self.train_size is not None and (
            isinstance(self.train_size, bool) or not isinstance(self.train_size, int) or self.train_size < 1
        ):
            raise BdguardError(f"train_size must be a positive integer, got {self.train_size!r}")

    def cache_path(self) -> Path:
        """The folder that holds decoded data sets (and downloads when no --data-root is given)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("BDGUARD_CACHE")
        if env:
            return Path(env).expanduser()
        return Path.home() / ".cache" / "bdguard"
