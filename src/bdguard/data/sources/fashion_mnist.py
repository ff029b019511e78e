"""Fashion-MNIST from its four idx files (gzip or not): Debian's package, torchvision's raw folder, or a download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from bdguard.data.sources import DATASETS, FileSource, RawSplits, given_root, search_roots
from bdguard.errors import BdguardError

# torchvision's FashionMNIST.classes, the label order of the idx files
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FILES = {  # array name -> idx file stem, (number of dimensions)
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


def _files_in(folder: Path) -> dict[str, Path] | None:
    """The four idx files in one folder (uncompressed preferred), or None unless all four are there."""
    found = {}
    for key, (stem, _) in FILES.items():
        path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _candidates(folder: Path) -> list[Path]:
    """Folders that may hold the idx files, given a folder to search, best first."""
    return [folder, folder / "raw", folder / "FashionMNIST" / "raw", folder / "fashion-mnist"]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes: magic 0x0000 0x08 <ndim>, then ndim big-endian int32 sizes, then the data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise BdguardError(f"cannot read {path}: {exc}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise BdguardError(f"{path} is not an idx file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(bytearray(data), dtype=np.uint8, offset=header)  # a bytearray keeps the array writable
    if body.size != int(np.prod(shape)):
        raise BdguardError(f"{path} is truncated: the header promises {shape}, the file holds {body.size} bytes")
    return body.reshape(shape)


@DATASETS.register
class FashionMnist(FileSource[dict[str, Path]]):
    name = "fashion-mnist"
    num_classes = 10
    classes = CLASSES
    description = "Fashion-MNIST: 10 classes of 28x28 grayscale clothing, 60000 train / 10000 test"
    flip = True
    native_size = 28
    title = "Fashion-MNIST"
    looked_for = "its idx files"
    hint = "install Debian's dataset-fashion-mnist"

    def _folders(self) -> list[Path]:
        root = given_root(self.config)
        if root is not None:
            return _candidates(root)
        return [DEBIAN_DIR] + [c for folder in search_roots(self.config) for c in _candidates(folder)[2:]]

    def _resolve(self) -> dict[str, Path] | None:
        return next((files for folder in self._folders() if (files := _files_in(folder))), None)

    def _searched(self) -> str:
        return ", ".join(str(folder) for folder in self._folders())  # every folder tried, several per root

    def _where(self, found: dict[str, Path]) -> Path:
        return found["train_images"].parent

    def _key(self, found: dict[str, Path]) -> str:
        stats = [(p.resolve(), p.stat()) for p in found.values()]
        return "|".join(f"{p}:{s.st_size}:{s.st_mtime_ns}" for p, s in stats)

    def _read(self, found: dict[str, Path]) -> RawSplits:
        arrays = {key: read_idx(found[key], ndim) for key, (_, ndim) in FILES.items()}
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.shape[1:] != (28, 28) or len(images) != len(labels):
                raise BdguardError(f"{found[f'{split}_images']}: not Fashion-MNIST ({images.shape} images)")
        return RawSplits(
            np.ascontiguousarray(arrays["train_images"][:, None]),
            arrays["train_labels"].astype(np.int64),
            np.ascontiguousarray(arrays["test_images"][:, None]),
            arrays["test_labels"].astype(np.int64),
            CLASSES,
            f"Fashion-MNIST idx files in {self._where(found)}",
        )

    def _download(self, root: Path) -> dict[str, Path]:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
        files = _files_in(root / "FashionMNIST" / "raw")
        if files is None:
            raise BdguardError(f"torchvision's download left no idx files in {root / 'FashionMNIST' / 'raw'}")
        return files
