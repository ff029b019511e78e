"""Reading folders of class sub-folders (torchvision's ImageFolder layout): one labelled folder, a train/ and test/
pair, or one folder split 80/20 here. The `imagefolder:` data set, the CIFAR-10 JPEG copy and a probe folder read
their images through these."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdguard.data.sources import ImageDecoder, RawSplits, is_image_name
from bdguard.errors import BdguardError

TEST_FRACTION = 0.2
SPLIT_SEED = 0

# images (N, C, H, W) uint8, labels (N,) int64, and where each image came from: its path below the folder read
Split = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


def class_dirs(folder: Path) -> list[Path]:
    """The class sub-folders of `folder`, sorted by name (ImageFolder's label order)."""
    try:
        dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise BdguardError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
    if not dirs:
        raise BdguardError(f"{folder} is not a folder of class sub-folders (it has no sub-folders)")
    return dirs


def image_files(class_dir: Path) -> list[Path]:
    """The images below one class folder, at any depth, sorted as torchvision's ImageFolder sorts them."""
    files = sorted(p for p in class_dir.rglob("*") if is_image_name(p.relative_to(class_dir)) and p.is_file())
    if not files:
        raise BdguardError(f"class folder {class_dir} holds no images")
    return files


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for class_dir in class_dirs(folder):
        if class_dir.name not in classes:
            raise BdguardError(f"class folder {class_dir} has no counterpart among the training classes")
        found = image_files(class_dir)
        files += found
        labels += [classes.index(class_dir.name)] * len(found)
    return files, np.array(labels, dtype=np.int64)


def _decode(files: list[Path], decoder: ImageDecoder) -> list[np.ndarray]:
    return [decoder(str(file), file) for file in files]


def _names(files: list[Path], folder: Path) -> tuple[str, ...]:
    return tuple(file.relative_to(folder).as_posix() for file in files)


def raw_splits(classes: tuple[str, ...], train: Split, test: Split, source: str) -> RawSplits:
    """A folder source's splits; the training images keep their file names (detect names its rows by them)."""
    return RawSplits(train[0], train[1], test[0], test[1], classes, source, train_files=train[2])


def read_labelled_dir(folder: Path, classes: list[str], decoder: ImageDecoder) -> Split:
    """Every image of a folder of class sub-folders, labelled by its sub-folder's index in `classes` (a given
    class list, e.g. a model's); a sub-folder may hold any subset of the classes."""
    files, labels = _scan(folder, classes)
    return decoder.stack(_decode(files, decoder)), labels, _names(files, folder)


def read_split_dirs(train_dir: Path, test_dir: Path, decoder: ImageDecoder) -> tuple[list[str], Split, Split]:
    """Class names and the two splits of a tree that has train/<class>/ and test/<class>/."""
    classes = [d.name for d in class_dirs(train_dir)]
    train_files, train_labels = _scan(train_dir, classes)
    test_files, test_labels = _scan(test_dir, classes)
    # Both splits are decoded before stacking: whether to keep one channel depends on every image.
    train_images, test_images = _decode(train_files, decoder), _decode(test_files, decoder)
    train = (decoder.stack(train_images), train_labels, _names(train_files, train_dir.parent))
    return classes, train, (decoder.stack(test_images), test_labels, _names(test_files, test_dir.parent))


def read_single_dir(folder: Path, decoder: ImageDecoder) -> tuple[list[str], Split, Split]:
    """Class names and a stratified, seeded 80/20 split of a folder of class sub-folders."""
    classes = [d.name for d in class_dirs(folder)]
    files, labels = _scan(folder, classes)
    images = decoder.stack(_decode(files, decoder))
    advice = "give every class more images, or provide train/ and test/ folders"
    train, test = split_rows(labels, str(folder), advice)
    names = _names(files, folder)
    return (
        classes,
        (images[train], labels[train], tuple(names[i] for i in train)),
        (images[test], labels[test], tuple(names[i] for i in test)),
    )


def split_rows(labels: np.ndarray, where: str, advice: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a stratified 80/20 split, seeded, each in the original order; `advice` says what
    to do when some class is too small to split."""
    from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

    try:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
        )
    except ValueError as exc:
        classes = len(np.unique(labels))
        raise BdguardError(
            f"{where}: cannot split {len(labels)} images of {classes} classes 80/20 by class ({exc}); {advice}"
        ) from None
    return np.sort(train), np.sort(test)
