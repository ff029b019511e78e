"""CIFAR-10: torchvision's pickled batches, an ImageFolder tree (train/<class>/, test/<class>/), or that tree as
a .tar.xz (the JPEG copy in ../shared/data), read as a stream."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bdguard.data.sources import (
    DATASETS,
    FileSource,
    ImageDecoder,
    RawSplits,
    given_root,
    is_image_name,
    iter_tar_xz,
    path_identity,
    search_roots,
)
from bdguard.data.sources.folders import raw_splits, read_split_dirs
from bdguard.errors import BdguardError

# Alphabetical, which is both ImageFolder's label order and CIFAR-10's own.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES = "cifar-10-batches-py"  # torchvision's folder, inside its root
ARCHIVE = "cifar10-jpeg.tar.xz"
UNPACKED = ("cifar10-jpeg", "cifar10")  # folder names the archive is commonly unpacked to
JPEG_NOTE = "CIFAR-10 (JPEG q75 copy)"


def _found(kind: str, path: Path) -> tuple[str, Path] | None:
    if kind == "torchvision" and (path / BATCHES / "data_batch_1").is_file():
        return kind, path
    if kind == "imagefolder" and (path / "train").is_dir() and (path / "test").is_dir():
        return kind, path
    if kind == "archive" and path.is_file():
        return kind, path
    return None


def _candidates(folder: Path) -> list[tuple[str, Path]]:
    """Where CIFAR-10 may lie inside a folder, best first."""
    return [
        ("torchvision", folder),
        *(("imagefolder", folder / name) for name in UNPACKED),
        ("archive", folder / ARCHIVE),
    ]


@DATASETS.register
class Cifar10(FileSource[tuple[str, Path]]):
    name = "cifar10"
    num_classes = len(CLASSES)
    classes = CLASSES
    description = "CIFAR-10: 10 classes of 32x32 colour photos, 50000 train / 10000 test"
    flip = True
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)
    native_size = 32
    title = "CIFAR-10"
    looked_for = f"{BATCHES}/, {'/, '.join(UNPACKED)}/ with train/ and test/, {ARCHIVE}"

    def _resolve(self) -> tuple[str, Path] | None:
        root = given_root(self.config)
        if root is not None:
            if root.is_file():
                return "archive", root
            # --data-root may also name the batches folder itself, or the unpacked tree itself.
            own = [("torchvision", root.parent)] if root.name == BATCHES else []
            candidates = [*own, ("imagefolder", root), *_candidates(root)]
        else:
            candidates = [c for folder in search_roots(self.config) for c in _candidates(folder)]
        return next((hit for kind, path in candidates if (hit := _found(kind, path))), None)

    def _where(self, found: tuple[str, Path]) -> Path:
        kind, path = found
        return path / BATCHES if kind == "torchvision" else path

    def _key(self, found: tuple[str, Path]) -> str:
        return f"{found[0]}|{path_identity(self._where(found))}"

    def _read(self, found: tuple[str, Path]) -> RawSplits:
        kind, path = found
        if kind == "torchvision":
            return _from_torchvision(path)
        if kind == "imagefolder":
            decoder = ImageDecoder(resize_hint=False)
            classes, train, test = read_split_dirs(path / "train", path / "test", decoder)
            _check_classes(classes, path)
            return _checked(raw_splits(CLASSES, train, test, f"CIFAR-10 ImageFolder {path}"), path)
        return _from_archive(path)

    def _download(self, root: Path) -> tuple[str, Path]:
        from torchvision.datasets import CIFAR10  # imported here: torchvision is slow to import

        # One archive holds both splits; asking for the test split fetches it all but loads only the small batch.
        CIFAR10(str(root), train=False, download=True)
        return "torchvision", root


def _from_torchvision(root: Path) -> RawSplits:
    from torchvision.datasets import CIFAR10  # imported here: torchvision is slow to import

    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise BdguardError(f"cannot read CIFAR-10 from {root}: {exc}") from None
    splits = [
        (np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64))
        for ds in (train, test)
    ]
    return RawSplits(*splits[0], *splits[1], CLASSES, f"CIFAR-10 (torchvision) {root / BATCHES}")


def _from_archive(archive: Path) -> RawSplits:
    # Members are read in archive order but sorted as ImageFolder sorts them (class, then file name), so the
    # archive and its unpacked tree give identical arrays.
    members: dict[str, list[tuple[tuple[int, str], str, bytes]]] = {"train": [], "test": []}
    for member, data in iter_tar_xz(archive):
        if len(member.parts) < 3 or member.parts[-3] not in members or not is_image_name(member):
            continue
        split, cls = member.parts[-3], member.parts[-2]
        if cls not in CLASSES:
            raise BdguardError(f"{archive} is not CIFAR-10: unknown class folder {split}/{cls}/")
        members[split].append(((CLASSES.index(cls), member.name), str(member), data))
    decoder = ImageDecoder(resize_hint=False)
    arrays = []
    for split, items in members.items():
        if not items:
            raise BdguardError(f"{archive} holds no {split}/<class>/ images: not the CIFAR-10 ImageFolder layout")
        items.sort(key=lambda item: item[0])
        images = decoder.stack([decoder(name, data) for _, name, data in items])
        arrays += [images, np.array([label for (label, _), _, _ in items], dtype=np.int64)]
    _check_classes([CLASSES[label] for label in np.unique(arrays[1])], archive)
    return _checked(RawSplits(*arrays, CLASSES, f"{JPEG_NOTE} {archive}"), archive)


def _check_classes(classes: Sequence[str], where: Path) -> None:
    if tuple(classes) != CLASSES:
        raise BdguardError(f"{where} is not CIFAR-10: classes are {', '.join(classes)}, expected {', '.join(CLASSES)}")


def _checked(raw: RawSplits, where: Path) -> RawSplits:
    if raw.train_images.shape[1:] != (3, 32, 32):
        raise BdguardError(f"{where} is not CIFAR-10: images are {raw.train_images.shape[1:]}, expected (3, 32, 32)")
    return raw
