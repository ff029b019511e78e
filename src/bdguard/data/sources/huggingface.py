"""hf:<path>: a Hugging Face `datasets` data set as users keep it: a folder written by `save_to_disk` (one data set
or a DatasetDict), or a folder of its parquet files (train-*.parquet / test-*.parquet, or one set of files).
The image and label columns are found by their features (`Image`, `ClassLabel`) or named with
--set data.image_column=... / data.label_column=...; a set with no test split is split 80/20 here (stratified, seed
0). With --download, a name that is not a folder is fetched from the hub. `datasets` is the extra bdguard[hf]."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bdguard.data.sources import DATASETS, DatasetSource, ImageDecoder, RawSplits, download_root, path_identity
from bdguard.data.sources.folders import split_rows
from bdguard.errors import BdguardError

SPLITS = ("train", "test")


def _datasets() -> ModuleType:
    try:
        import datasets
    except ImportError:
        raise BdguardError("hf: data sets need the datasets library: pip install 'bdguard[hf]'") from None
    datasets.disable_progress_bars()  # bdguard shows its own
    return datasets


@DATASETS.register
class HuggingFaceSource(DatasetSource):
    name = "hf"
    description = "hf:<path>: a Hugging Face data set saved with save_to_disk, or a folder of its parquet files"
    flip = True
    reads_columns = True

    @classmethod
    def takes_arg(cls) -> bool:
        return True

    @property
    def bundle_name(self) -> str:
        return f"hf:{self._where()}"

    def _where(self) -> str:
        """The folder, absolute; or, for a hub name fetched with --download, the name."""
        if not self.arg:
            raise BdguardError("hf needs a folder: hf:<path>")
        folder = Path(self.arg).expanduser().absolute()
        if folder.is_dir():
            return str(folder)
        if self.config.download:
            return self.arg
        raise BdguardError(
            f"hf: {self.arg} is not a folder (save the data set with save_to_disk, or pass --download to fetch "
            f"{self.arg!r} from the Hugging Face hub)"
        )

    def locate(self) -> str | None:
        try:
            return self._where()
        except BdguardError:
            return None

    def identity(self) -> str:
        where = self._where()
        files = path_identity(Path(where)) if Path(where).is_dir() else f"hub|{download_root(self.config).absolute()}"
        columns = f"{self.config.image_column}|{self.config.label_column}"
        return f"hf|size={self.config.image_size}|columns={columns}|{files}"

    def class_names(self) -> tuple[str, ...] | None:
        splits = self._splits()
        return _columns(splits[0], self.config.image_column, self.config.label_column, self._where())[2]

    def load(self) -> RawSplits:
        where = self._where()
        splits = self._splits()
        image_column, label_column, classes = _columns(
            splits[0], self.config.image_column, self.config.label_column, where
        )
        decoder = ImageDecoder(self.config.image_size, allow_gray=True)
        read = [_read(split, image_column, label_column, classes, decoder, where) for split in splits]
        if len(read) == 1:
            (images, labels, files), how = read[0], "split 80/20 (seed 0)"
            advice = "give every class more images, or save train and test splits"
            train, test = split_rows(labels, f"hf:{where}", advice)
            images = decoder.stack(images)
            train_files = None if files is None else tuple(files[i] for i in train)
            return RawSplits(
                images[train], labels[train], images[test], labels[test], classes, f"HF {where}, {how}", train_files
            )
        (train_images, train_labels, files), (test_images, test_labels, _) = read
        train_files = None if files is None else tuple(files)
        # both splits are decoded before stacking: whether to keep one channel depends on every image
        return RawSplits(
            decoder.stack(train_images),
            train_labels,
            decoder.stack(test_images),
            test_labels,
            classes,
            f"HF {where}, its train and test splits",
            train_files,
        )

    def status(self) -> tuple[bool, str]:
        return True, "any folder you name: hf:<path>"

    def _splits(self) -> list[Any]:
        """[train, test], or [everything] when the data set has no test split."""
        datasets = _datasets()
        where = self._where()
        folder = Path(where)
        try:
            if not folder.is_dir():
                found = datasets.load_dataset(where, cache_dir=str(download_root(self.config) / "hf"))
            elif (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
                found = datasets.load_from_disk(str(folder))
            else:
                found = _parquet(datasets, folder, self.config.cache_path() / "hf")
        except (OSError, ValueError, TypeError, KeyError) as exc:  # what datasets raises on a folder it cannot read
            raise BdguardError(f"hf: cannot read {where}: {exc}") from None
        if isinstance(found, datasets.Dataset):
            return [found]
        names = list(found)
        if set(SPLITS) <= set(names):
            return [found[split] for split in SPLITS]
        if names == ["train"]:
            return [found["train"]]
        raise BdguardError(f"hf: {where} has the splits {names}; bdguard reads 'train' and 'test', or one split")


def _parquet(datasets: ModuleType, folder: Path, cache: Path) -> Any:
    """A folder of parquet files: train*/test* files become those splits, otherwise the files are one set."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise BdguardError(f"hf: {folder} holds neither a save_to_disk data set nor parquet files")
    by_split = {split: [str(f) for f in files if f.name.startswith(split)] for split in SPLITS}
    if all(by_split.values()):
        return datasets.DatasetDict(
            {split: datasets.Dataset.from_parquet(paths, cache_dir=str(cache)) for split, paths in by_split.items()}
        )
    return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache))


def _columns(
    split: Any, image_column: str | None, label_column: str | None, where: str
) -> tuple[str, str, tuple[str, ...]]:
    """(image column, label column, class names): named, or found by their features."""
    datasets = _datasets()
    features = split.features
    for key, named in (("image_column", image_column), ("label_column", label_column)):
        if named is not None and named not in features:
            raise BdguardError(f"hf:{where} has no column {named!r} (data.{key}); its columns: {', '.join(features)}")
    image_column = image_column or _only(features, datasets.Image, "image_column", where)
    if not isinstance(features[image_column], datasets.Image):
        raise BdguardError(f"hf:{where}: column {image_column!r} holds {features[image_column]}, not images")
    label_column = label_column or _only(features, datasets.ClassLabel, "label_column", where)
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        return image_column, label_column, tuple(label.names)
    if not isinstance(label, datasets.Value) or not (label.dtype.startswith("int") or label.dtype == "string"):
        raise BdguardError(f"hf:{where}: column {label_column!r} holds {label}, not class labels")
    values = sorted(set(split[label_column]))
    if label.dtype == "string":
        return image_column, label_column, tuple(values)
    if values[0] < 0:
        raise BdguardError(f"hf:{where}: column {label_column!r} holds negative labels")
    return image_column, label_column, tuple(str(i) for i in range(values[-1] + 1))


def _only(features: Any, kind: type, setting: str, where: str) -> str:
    """The one column whose feature is a `kind` (Image, ClassLabel)."""
    found = [name for name, value in features.items() if isinstance(value, kind)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise BdguardError(
            f"hf:{where} has no {kind.__name__} column (columns: {', '.join(features)}); name it with "
            f"--set data.{setting}=NAME"
        )
    shown = ", ".join(found)
    raise BdguardError(
        f"hf:{where} has several {kind.__name__} columns ({shown}); choose with --set data.{setting}=NAME"
    )


def _read(
    split: Any, image_column: str, label_column: str, classes: tuple[str, ...], decoder: ImageDecoder, where: str
) -> tuple[list[np.ndarray], np.ndarray, list[str] | None]:
    """One split's decoded images (not stacked yet), labels and, where every image has one, its file path."""
    datasets = _datasets()
    raw = split.cast_column(image_column, datasets.Image(decode=False))
    images, paths = [], []
    for row, cell in enumerate(raw[image_column]):
        if cell is None:
            raise BdguardError(f"hf:{where}: row {row} has no image")
        data = cell.get("bytes") or (Path(cell["path"]) if cell.get("path") else None)
        if data is None:
            raise BdguardError(f"hf:{where}: row {row} has neither image bytes nor a path")
        images.append(decoder(cell.get("path") or f"row {row}", data))
        paths.append(cell.get("path"))
    values = raw[label_column]
    if any(value is None for value in values):
        raise BdguardError(f"hf:{where}: some rows have no label in column {label_column!r}")
    if values and isinstance(values[0], str):
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise BdguardError(f"hf:{where}: labels {unknown[:3]} of the test split are not training classes")
        values = [index[v] for v in values]
    labels = np.asarray(values, dtype=np.int64)
    files = paths if all(paths) and len(set(paths)) == len(paths) else None
    return images, labels, files
