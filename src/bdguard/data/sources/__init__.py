"""The registry of data sets (`DATASETS`), the `DatasetSource` base class and the helpers the sources share.

A source finds its files (`locate`), names them for the cache (`identity`) and decodes them once (`load`) into
numpy arrays; `bdguard.data.loading` caches those arrays and turns them into a `DataBundle`.
Adding a data set = one module here that subclasses `DatasetSource` (or `FileSource`, for files that are searched
for or downloaded by torchvision) and registers it, plus its import below.
"""

from __future__ import annotations

import io
import lzma
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar, Generic, TypeVar

import numpy as np
from PIL import Image

from bdguard.data.config import DataConfig
from bdguard.errors import BdguardError
from bdguard.progress import log
from bdguard.registry import Registry, import_modules

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
MIN_SIDE = 8  # the smallest image side the models take (three 2x2 poolings; scikit-learn's digits are 8x8)
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

Found = TypeVar("Found")  # what a `FileSource` search returns: its own handle on the files


@dataclass
class RawSplits:
    """What a source decodes: uint8 images (N, C, H, W) and int64 labels per split, plus class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str  # human-readable provenance, shown in reports
    train_files: tuple[str, ...] | None = None  # where each training image came from, for sets read from files

    def validate(self, name: str) -> None:
        """Refuse arrays that would break the code downstream, naming the data set."""
        if self.train_files is not None and len(self.train_files) != len(self.train_images):
            raise BdguardError(f"{name}: {len(self.train_files)} file names for {len(self.train_images)} images")
        if len(self.classes) < 2:
            raise BdguardError(f"{name}: a classifier needs at least two classes; found {len(self.classes)}")
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
                raise BdguardError(f"{name}: {split} images must be non-empty uint8 (N, C, H, W), got {images.shape}")
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise BdguardError(f"{name}: {split} labels must be int64 with one label per image")
            if labels.min() < 0 or labels.max() >= len(self.classes):
                raise BdguardError(f"{name}: {split} labels fall outside 0..{len(self.classes) - 1}")
        height, width = self.train_images.shape[2:]
        if min(height, width) < MIN_SIDE:
            raise BdguardError(
                f"{name}: images are {width}x{height}; the models need at least {MIN_SIDE}x{MIN_SIDE} (pass "
                "--image-size N to resize them)"
            )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            train, test = self.train_images.shape[1:], self.test_images.shape[1:]
            raise BdguardError(f"{name}: train images are {train} but test images are {test}")


class DatasetSource(ABC):
    """One data set: where its files are, what identifies them, and how to decode them."""

    name: ClassVar[str]
    description: ClassVar[str]
    flip: ClassVar[bool]  # whether a horizontal flip keeps the label
    mean: ClassVar[tuple[float, ...] | None] = None  # None: computed from the train split
    std: ClassVar[tuple[float, ...] | None] = None
    downloadable: ClassVar[bool] = False  # torchvision can fetch it when the user passes --download
    cacheable: ClassVar[bool] = True  # False for sets that are cheaper to rebuild than to read back
    native_size: ClassVar[int | None] = None  # fixed side length; None when the source resizes to image_size
    num_classes: ClassVar[int | None] = None  # known before any file is read; None when the files decide (imagefolder)
    classes: ClassVar[tuple[str, ...] | None] = None  # the class names, where known before any file is read
    reads_columns: ClassVar[bool] = False  # a table of columns (hf:), where data.image_column/label_column apply
    argument: ClassVar[str] = "<path>"  # what follows "NAME:" for a source that takes an argument (takes_arg)

    def __init__(self, config: DataConfig, arg: str | None = None) -> None:
        if arg is not None and not self.takes_arg():
            raise BdguardError(f"data set {self.name!r} takes no ':<argument>' (got {self.name}:{arg})")
        if not self.reads_columns and (config.image_column or config.label_column):
            raise BdguardError(f"data set {self.name!r} has no columns to choose (data.image_column/label_column)")
        size = config.image_size
        if self.native_size is not None and size is not None and size != self.native_size:
            raise BdguardError(
                f"{self.name} images are {self.native_size}x{self.native_size}; --image-size {size} is not "
                f"supported for it (only gtsrb and imagefolder resize)"
            )
        self.config = config
        self.arg = arg

    @classmethod
    def takes_arg(cls) -> bool:
        return False

    def class_names(self) -> tuple[str, ...] | None:
        """The class names in label order, without decoding anything; None where only the files can say."""
        return self.classes

    @property
    def bundle_name(self) -> str:
        """The name the loaded `DataBundle` carries, enough to load the same data again."""
        return self.name

    @abstractmethod
    def locate(self) -> str | None:
        """Where the offline data would be read from (decoding nothing), or None when it is not here."""

    @abstractmethod
    def identity(self) -> str:
        """A string that changes whenever the decoded arrays would: the cache key."""

    @abstractmethod
    def load(self) -> RawSplits:
        """Decode the data set (the slow part, done once per identity)."""

    def status(self) -> tuple[bool, str]:
        """(available offline, where from), for `bdguard datasets`."""
        where = self.locate()
        if where is not None:
            return True, where
        return False, "download via torchvision (--download)" if self.downloadable else "not found"


class FileSource(DatasetSource, Generic[Found]):
    """A data set read from files that are searched for (or named by --data-root), or fetched by torchvision.

    The search, the download fallback, the cache key of a download and the not-found message are the same for
    every such set; a subclass finds its files (`_resolve`) and says how to show, name, read and fetch them.
    """

    downloadable = True
    title: ClassVar[str]  # the name in messages, e.g. "CIFAR-10"
    looked_for: ClassVar[str]  # what the search looks for, listed when nothing is found
    hint: ClassVar[str] = ""  # another way to get the files, offered before --data-root and --download

    @abstractmethod
    def _resolve(self) -> Found | None:
        """The files, or None when they are not here; raises BdguardError for a bad --data-root."""

    @abstractmethod
    def _where(self, found: Found) -> Path:
        """The path shown for the files."""

    @abstractmethod
    def _key(self, found: Found) -> str:
        """The part of the cache key that names the files found."""

    @abstractmethod
    def _read(self, found: Found) -> RawSplits:
        """Decode the files found."""

    @abstractmethod
    def _download(self, root: Path) -> Found:
        """Fetch the data set into `root` with torchvision and return its files."""

    def _identity_prefix(self) -> str:
        """The start of every cache key; a source whose arrays depend on more than its files adds that here."""
        return self.name

    def _searched(self) -> str:
        """Where the search looked, for the not-found message."""
        if self.config.data_root is not None:
            return f"--data-root {self.config.data_root}"
        return ", ".join(str(folder) for folder in search_roots(self.config))

    def locate(self) -> str | None:
        try:
            found = self._resolve()
        except BdguardError:  # a bad --data-root: `bdguard datasets` shows the set as not available
            return None
        return None if found is None else str(self._where(found))

    def identity(self) -> str:
        found = self._resolve()
        if found is not None:
            return f"{self._identity_prefix()}|{self._key(found)}"
        if not self.config.download:
            raise self._not_found()
        # Nothing to name before the download: the folder it will land in stands for it.
        return f"{self._identity_prefix()}|download|{download_root(self.config).absolute()}"

    def load(self) -> RawSplits:
        found = self._resolve()
        if found is None:
            if not self.config.download:
                raise self._not_found()
            root = download_root(self.config)
            try:
                found = self._download(root)
            except (RuntimeError, OSError, ValueError, EOFError) as exc:  # what torchvision raises when it fails
                raise BdguardError(f"cannot download {self.title} into {root}: {exc}") from None
        return self._read(found)

    def _not_found(self) -> BdguardError:
        advice = "pass --data-root PATH, or --download to fetch it with torchvision"
        if self.hint:
            advice = f"{self.hint}, or {advice}"
        return BdguardError(f"{self.title} not found in {self._searched()} (looked for {self.looked_for}); {advice}")


def search_roots(config: DataConfig) -> list[Path]:
    """The folders searched when no --data-root is given, in order."""
    roots = []
    if os.environ.get("BDGUARD_DATA"):
        roots.append(Path(os.environ["BDGUARD_DATA"]).expanduser())
    roots += [Path("data"), config.cache_path() / "data"]
    return [Path(os.path.abspath(root)) for root in roots]  # abspath also folds the "..", for messages


def download_root(config: DataConfig) -> Path:
    """Where torchvision downloads to: the --data-root folder, else the cache's data folder."""
    return Path(config.data_root).expanduser() if config.data_root else config.cache_path() / "data"


def given_root(config: DataConfig) -> Path | None:
    """The --data-root path, refused early when it does not exist and nothing may be downloaded into it."""
    if config.data_root is None:
        return None
    path = Path(config.data_root).expanduser()
    if not path.exists() and not config.download:
        raise BdguardError(f"--data-root {config.data_root} does not exist")
    return path


def path_identity(path: Path) -> str:
    """Resolved path, size and mtime; for a folder the file count, total size and newest mtime below it."""
    path = path.resolve()
    try:
        if not path.is_dir():
            stat = path.stat()
            return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        count, total, newest = 0, 0, path.stat().st_mtime_ns
        seen: set[str] = set()
        # links are followed, as the folder readers follow them (a class folder may be a link); each real folder
        # is counted once, so a link loop ends
        for folder, dirs, files in os.walk(path, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs.clear()
                continue
            seen.add(real)
            newest = max(newest, os.stat(folder).st_mtime_ns)
            for file in files:
                try:
                    stat = os.stat(os.path.join(folder, file))
                except FileNotFoundError:  # a dangling link, which the decoders skip as well
                    continue
                count, total, newest = count + 1, total + stat.st_size, max(newest, stat.st_mtime_ns)
        return f"{path}|{count} files|{total}|{newest}"
    except OSError as exc:
        raise BdguardError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from None


def is_image_name(path: PurePosixPath | Path) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which carry the image's name but no image.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in path.parts)


def iter_tar_xz(archive: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(member path, content) of every regular file in a .tar.xz, streamed: nothing is extracted to disk. Members
    whose path is absolute or climbs out with '..' are no part of a data set's layout: skipped, counted, reported."""
    skipped: list[str] = []
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    skipped.append(member.name)
                    continue
                if member.isfile():
                    file = tar.extractfile(member)
                    if file is not None:
                        yield path, file.read()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        raise BdguardError(f"{archive} is not a readable .tar.xz archive ({exc})") from None
    if skipped:
        log(f"warning: {archive}: skipped {len(skipped)} member(s) with an absolute or '..' path, e.g. {skipped[0]}")


WIDE_GRAY = frozenset({"I;16", "I;16B", "I;16L", "I"})  # grayscale of more than 8 bits a pixel


def _rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. Pillow's own conversion clips 16-bit grayscale at 255 (a 16-bit PNG turns almost
    white); such images are scaled to 0..255 instead."""
    if image.mode not in WIDE_GRAY:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    if image.mode != "I" or values.max(initial=0) > 255:  # "I" also holds 8-bit images widened by Pillow
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")


class ImageDecoder:
    """Decodes images one at a time into (H, W, 3) uint8 arrays, all of one size, then stacks them.

    With `size`, every image is resized to size x size (Pillow's bilinear filter, which antialiases when shrinking);
    without it, every image must have the first one's size. `stack` keeps one channel when every image was
    grayscale and `allow_gray` is set.
    """

    def __init__(self, size: int | None = None, *, allow_gray: bool = False, resize_hint: bool = True) -> None:
        self.size = size
        self.allow_gray = allow_gray
        self.resize_hint = resize_hint
        self.all_gray = True
        self.first: tuple[str, tuple[int, int]] | None = None

    def __call__(self, name: str, data: bytes | Path) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                self.all_gray = self.all_gray and image.mode in GRAY_MODES
                if self.size is None:
                    self._check_size(name, image.size)
                    return np.asarray(_rgb(image))
                rgb = _rgb(image)
                if rgb.size != (self.size, self.size):
                    rgb = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR)
                return np.asarray(rgb)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise BdguardError(f"cannot read image {name}: {exc}") from None

    def _check_size(self, name: str, size: tuple[int, int]) -> None:
        if self.first is None:
            self.first = (name, size)
        elif size != self.first[1]:
            hint = "; pass --image-size N to resize them all to NxN" if self.resize_hint else ""
            (w0, h0), (w, h) = self.first[1], size
            raise BdguardError(f"images differ in size: {self.first[0]} is {w0}x{h0} but {name} is {w}x{h}{hint}")

    def stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        images = np.stack(arrays)
        if self.allow_gray and self.all_gray:
            images = images[..., :1]  # a grayscale image converted to RGB has three equal channels
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


DATASETS: Registry[type[DatasetSource]] = Registry("data set")

# Importing the modules registers their sources; they need the names above, hence the import at the end.
import_modules(__name__, __path__)
