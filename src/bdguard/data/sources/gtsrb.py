"""GTSRB: torchvision's folder layout (root/gtsrb/GTSRB/...), or that layout as a .tar.xz read as a stream.

Every image is resized to 32x32 (or --image-size) when decoded. Labels are the ClassId: the training folder name
(000NN) and the test CSV's ClassId column, exactly what torchvision.datasets.GTSRB yields.
"""

from __future__ import annotations

import csv
import io
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
from bdguard.errors import BdguardError

CLASSES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)  # fmt: skip
DEFAULT_SIZE = 32
ARCHIVE = "gtsrb.tar.xz"
TEST_CSV = "GT-final_test.csv"


def _found(kind: str, path: Path) -> tuple[str, Path] | None:
    if kind == "torchvision" and (path / "gtsrb" / "GTSRB" / "Training").is_dir():
        return kind, path
    if kind == "archive" and path.is_file():
        return kind, path
    return None


def _candidates(folder: Path) -> list[tuple[str, Path]]:
    """Where GTSRB may lie inside a folder (a torchvision root, or the archive), best first."""
    return [("torchvision", folder), ("archive", folder / ARCHIVE)]


@DATASETS.register
class Gtsrb(FileSource[tuple[str, Path]]):
    name = "gtsrb"
    num_classes = len(CLASSES)
    classes = CLASSES
    description = "GTSRB: 43 classes of German traffic signs, 39209 train / 12630 test, resized to 32x32"
    flip = False  # mirrored signs change meaning (turn left / turn right)
    title = "GTSRB"
    looked_for = f"gtsrb/GTSRB/ and {ARCHIVE}"

    @property
    def size(self) -> int:
        return self.config.image_size or DEFAULT_SIZE

    def _resolve(self) -> tuple[str, Path] | None:
        root = given_root(self.config)
        if root is not None:
            if root.is_file():
                return "archive", root
            # --data-root may also name the gtsrb/ folder inside torchvision's root.
            own = [("torchvision", root.parent)] if (root / "GTSRB").is_dir() else []
            candidates = [*own, *_candidates(root)]
        else:
            candidates = [c for folder in search_roots(self.config) for c in _candidates(folder)]
        return next((hit for kind, path in candidates if (hit := _found(kind, path))), None)

    def _identity_prefix(self) -> str:
        return f"{self.name}|size={self.size}"  # the images are resized when decoded

    def _where(self, found: tuple[str, Path]) -> Path:
        kind, path = found
        return path / "gtsrb" if kind == "torchvision" else path

    def _key(self, found: tuple[str, Path]) -> str:
        return f"{found[0]}|{path_identity(self._where(found))}"

    def _read(self, found: tuple[str, Path]) -> RawSplits:
        kind, path = found
        decoder = ImageDecoder(self.size)
        return _from_archive(path, decoder) if kind == "archive" else _from_folder(path, decoder)

    def _download(self, root: Path) -> tuple[str, Path]:
        from torchvision.datasets import GTSRB  # imported here: torchvision is slow to import

        for split in ("train", "test"):
            GTSRB(str(root), split=split, download=True)
        return "torchvision", root


def _class_id(folder: str, where: str) -> int:
    if not folder.isdigit() or int(folder) >= len(CLASSES):
        raise BdguardError(f"{where}: training folder {folder!r} is not a GTSRB class id (00000..00042)")
    return int(folder)


def _from_folder(root: Path, decoder: ImageDecoder) -> RawSplits:
    base = root / "gtsrb"
    train = []
    for class_dir in sorted(p for p in (base / "GTSRB" / "Training").iterdir() if p.is_dir()):
        label = _class_id(class_dir.name, str(base))
        train += [((label, f.name), decoder(str(f), f)) for f in sorted(class_dir.glob("*.ppm"))]
    try:
        csv_text = (base / TEST_CSV).read_text()
    except OSError as exc:
        raise BdguardError(f"cannot read the GTSRB test labels {base / TEST_CSV}: {exc.strerror or exc}") from None
    images = base / "GTSRB" / "Final_Test" / "Images"
    test = [(name, label, decoder(str(images / name), images / name)) for name, label in _test_rows(csv_text, base)]
    return _assemble(train, test, decoder, f"GTSRB (torchvision layout) {base}")


def _from_archive(archive: Path, decoder: ImageDecoder) -> RawSplits:
    # The test labels live in a CSV that may come after the images, so test images wait, decoded, by file name.
    train, test_images, csv_text = [], {}, None
    for member, data in iter_tar_xz(archive):
        parts = member.parts
        if member.name == TEST_CSV:
            csv_text = data.decode("utf-8", errors="replace")
        elif not is_image_name(member) or len(parts) < 3:
            continue
        elif parts[-3] == "Training":
            train.append(((_class_id(parts[-2], str(archive)), parts[-1]), decoder(str(member), data)))
        elif parts[-3:-1] == ("Final_Test", "Images"):
            test_images[parts[-1]] = decoder(str(member), data)
    if csv_text is None:
        raise BdguardError(f"{archive} is not the GTSRB layout: it has no {TEST_CSV} (the test labels)")
    test = []
    for name, label in _test_rows(csv_text, archive):
        if name not in test_images:
            raise BdguardError(f"{archive}: {TEST_CSV} lists {name}, which the archive does not hold")
        test.append((name, label, test_images[name]))
    return _assemble(train, test, decoder, f"GTSRB {archive}")


def _test_rows(csv_text: str, where: Path) -> list[tuple[str, int]]:
    try:
        rows = [
            (row["Filename"], int(row["ClassId"]))
            for row in csv.DictReader(io.StringIO(csv_text), delimiter=";", skipinitialspace=True)
        ]
    except (KeyError, ValueError, TypeError, csv.Error) as exc:
        raise BdguardError(f"{where}: {TEST_CSV} is not GTSRB's test label file ({exc!r})") from None
    if any(not 0 <= label < len(CLASSES) for _, label in rows):
        raise BdguardError(f"{where}: {TEST_CSV} has a ClassId outside 0..{len(CLASSES) - 1}")
    return rows


def _assemble(
    train: list[tuple[tuple[int, str], np.ndarray]],
    test: list[tuple[str, int, np.ndarray]],
    decoder: ImageDecoder,
    source: str,
) -> RawSplits:
    if not train or not test:
        raise BdguardError(f"{source}: no {'training' if not train else 'test'} images found")
    train.sort(key=lambda item: item[0])  # torchvision's order: class folder, then file name
    return RawSplits(
        decoder.stack([image for _, image in train]),
        np.array([label for (label, _), _ in train], dtype=np.int64),
        decoder.stack([image for _, _, image in test]),
        np.array([label for _, label, _ in test], dtype=np.int64),
        CLASSES,
        source,
    )
