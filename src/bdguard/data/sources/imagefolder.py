"""imagefolder:<path>: any folder of class sub-folders, with its own train/ and test/ or split 80/20 here."""

from __future__ import annotations

from pathlib import Path

from bdguard.data.sources import DATASETS, DatasetSource, ImageDecoder, RawSplits, path_identity
from bdguard.data.sources.folders import class_dirs, raw_splits, read_single_dir, read_split_dirs
from bdguard.errors import BdguardError


@DATASETS.register
class ImageFolderSource(DatasetSource):
    name = "imagefolder"
    description = "imagefolder:<path>: any folder of class sub-folders (own train/ and test/, or split 80/20)"
    flip = True

    @classmethod
    def takes_arg(cls) -> bool:
        return True

    @property
    def bundle_name(self) -> str:
        return f"imagefolder:{self._folder()}"

    def _folder(self) -> Path:
        if not self.arg:
            raise BdguardError("imagefolder needs a folder: imagefolder:<path>")
        folder = Path(self.arg).expanduser().absolute()
        if not folder.exists():
            raise BdguardError(f"imagefolder: {self.arg} does not exist")
        if not folder.is_dir():
            raise BdguardError(f"imagefolder: {self.arg} is not a folder")
        return folder

    def locate(self) -> str | None:
        try:
            return str(self._folder())
        except BdguardError:
            return None

    def identity(self) -> str:
        return f"imagefolder|size={self.config.image_size}|{path_identity(self._folder())}"

    def class_names(self) -> tuple[str, ...] | None:
        folder = self._folder()
        root = folder / "train" if (folder / "train").is_dir() and (folder / "test").is_dir() else folder
        return tuple(d.name for d in class_dirs(root))

    def load(self) -> RawSplits:
        folder = self._folder()
        decoder = ImageDecoder(self.config.image_size, allow_gray=True)
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            classes, train, test = read_split_dirs(folder / "train", folder / "test", decoder)
            how = "its train/ and test/"
        else:
            classes, train, test = read_single_dir(folder, decoder)
            how = "split 80/20 (seed 0)"
        return raw_splits(tuple(classes), train, test, f"ImageFolder {folder}, {how}")

    def status(self) -> tuple[bool, str]:
        return True, "any folder you name: imagefolder:<path>"
