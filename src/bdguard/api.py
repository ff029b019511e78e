"""bdguard from Python, on a caller's own data and model: `detect`, `train` and `repair`.

    from bdguard import api
    found = api.detect(my_dataset, detector="vab", epochs=10)      # which samples look poisoned
    trained = api.train(my_dataset, "torchvision:resnet18", defense="vab", test_dataset=my_test_set)
    repaired = api.repair(trained.model, my_clean_images, defense="linf-prune")

A dataset is any map-style torch Dataset of (image, label) pairs, images as PIL images, uint8 or [0, 1] float
tensors (C, H, W), or uint8 arrays (H, W[, C]), all of one size; its `classes` attribute names the classes where it
has one. It is converted once into the uint8 tensors every command works on, and the run is the command's own
(`bdguard.runs`), so a run folder, its results.json and its figures are what the CLI writes. `config` is the
command's config object (RunConfig, DetectConfig, RepairConfig) or a nested dict of the same settings as a --config
file; it is validated the same way, and a bad value raises `BdguardError` with the message the CLI prints.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from bdguard.config import RootConfig, merge, to_dict
from bdguard.data import DataConfig, load_dataset
from bdguard.data.sources import RawSplits
from bdguard.data.sources.folders import split_rows
from bdguard.data.sources.memory import held
from bdguard.defenses import DEFENSES
from bdguard.detectors import DETECTORS
from bdguard.errors import BdguardError
from bdguard.models import BackdoorModel, load_model, save_model
from bdguard.results import DetectionResult, RunResult
from bdguard.runs.common import MODEL
from bdguard.runs.detect import DetectConfig, detect_to_folder
from bdguard.runs.repair import TEST_HOLDOUT, TRAIN_SPLIT, RepairConfig, run_repair
from bdguard.runs.train import RunConfig, run_train
from bdguard.training.factory import model_meta
from bdguard.training.metrics import detection_metrics

__all__ = ["Detected", "Repaired", "Trained", "detect", "repair", "train"]

Config = TypeVar("Config", bound=RootConfig)


@dataclass(frozen=True)
class Detected:
    """A detector's verdict on every sample of the dataset given, in its order."""

    scores: np.ndarray  # float (N,): higher = more suspicious
    flagged: np.ndarray  # bool (N,): flagged by the detector's own threshold
    result: DetectionResult  # what results.json holds; `result.metrics` with an attack bdguard planted
    metrics: dict[str, Any] | None  # AUROC, TPR, FPR, ... against the `poisoned` flags given, else None
    folder: Path | None  # the run folder, when `out` was given

    @property
    def auroc(self) -> float | None:
        metrics = self.metrics or self.result.metrics
        return None if metrics is None else metrics["auroc"]


@dataclass(frozen=True)
class Trained:
    """The model to deploy, on the CPU in eval mode, and what the run measured."""

    model: BackdoorModel
    result: RunResult
    folder: Path | None


Repaired = Trained  # a repaired model and what the repair measured (results.json's `before` holds the model's)


def detect(
    dataset: Any,
    detector: str | None = None,
    *,
    model: BackdoorModel | None = None,
    poisoned: Any = None,
    test_dataset: Any = None,
    epochs: int | None = None,
    config: DetectConfig | Mapping[str, Any] | None = None,
    flip: bool = False,
    out: str | Path | None = None,
    quiet: bool = True,
) -> Detected:
    """Score every sample of `dataset` with `detector` (see `bdguard detectors`; default: the one `config` names, else
    "vab").

    `model`: a model trained on the dataset, for the detectors that inspect one (spectral, activation-clustering,
    strip); without it they train the undefended model `config.train` describes. `poisoned`: bool flags of the
    samples known to be poisoned, to measure the detector (AUROC, TPR, FPR). `test_dataset`: clean held-out images
    of the same classes; STRIP draws its threshold from them and needs them. `flip`: whether a horizontal flip keeps
    a label (the augmentation of any training the detector does).
    """
    settings, detector = _settings(DetectConfig, config, ("detector", detector, "vab"), {}, epochs)
    if test_dataset is None and DETECTORS.get(detector).reads_held_out:  # an unknown name fails here, too
        raise BdguardError(f"detector {detector} draws its threshold from clean held-out images: pass test_dataset")
    train = _arrays(dataset, "dataset")
    test = train if test_dataset is None else _arrays(test_dataset, "test_dataset")
    truth = None if poisoned is None else _flags(poisoned, len(train[1]))
    raw = _raw(train, test, _classes(dataset, train[1], test[1]))
    with _folder(out) as folder, held(raw, flip) as name:
        settings = merge(settings, {"data": {"dataset": name}})
        model_path = None if model is None else _model_file(model, name, folder / "given")
        results, detection = detect_to_folder(DetectConfig.from_dict(settings), folder / "run", model_path, quiet)
    metrics = None
    if truth is not None:
        metrics = detection_metrics(detection.scores, detection.flagged, torch.from_numpy(truth))
    return Detected(
        scores=detection.scores.float().cpu().numpy(),
        flagged=detection.flagged.bool().cpu().numpy(),
        result=DetectionResult.from_json(results),
        metrics=metrics,
        folder=None if out is None else folder / "run",
    )


def train(
    dataset: Any,
    model: str | BackdoorModel = "small-cnn",
    *,
    defense: str | None = None,
    test_dataset: Any = None,
    epochs: int | None = None,
    config: RunConfig | Mapping[str, Any] | None = None,
    flip: bool = False,
    out: str | Path | None = None,
    quiet: bool = True,
) -> Trained:
    """Train a model on `dataset` with `defense` (see `bdguard defenses`; "none" for undefended training; default:
    the one `config` names, else "vab").

    `model`: an architecture name (`bdguard models`: "resnet18", "torchvision:resnet18", "timm:resnet18", ...) or a
    model built for this data (`bdguard.models.build_model`), whose weights every network of the defense starts
    from. `test_dataset`: clean held-out images for BA (and ASR, with an attack in `config`); without it a seeded,
    stratified 20 % of `dataset` is held out and the model trains on the rest.
    """
    if isinstance(model, BackdoorModel):
        given = {"train": {"model": model.architecture, "model_kwargs": dict(model.options)}}
    elif isinstance(model, str):
        given = {"train": {"model": model}}
    else:
        raise BdguardError(f"model must be an architecture name or a BackdoorModel, got {type(model).__name__}")
    settings, defense = _settings(RunConfig, config, ("defense", defense, "vab"), given, epochs)
    DEFENSES.get(defense)  # an unknown name fails before the data is read
    images, labels = _arrays(dataset, "dataset")
    if test_dataset is None:
        train_rows, test_rows = split_rows(labels, "dataset", "pass test_dataset")
        train_part, test_part = (images[train_rows], labels[train_rows]), (images[test_rows], labels[test_rows])
    else:
        train_part, test_part = (images, labels), _arrays(test_dataset, "test_dataset")
    raw = _raw(train_part, test_part, _classes(dataset, labels, test_part[1]))
    initial = model if isinstance(model, BackdoorModel) else None
    with _folder(out) as folder, held(raw, flip) as name:
        settings = merge(settings, {"data": {"dataset": name}})
        results = run_train(RunConfig.from_dict(settings), folder, quiet=quiet, initial=initial)
        trained, _ = load_model(folder / MODEL)
    return Trained(trained, RunResult.from_json(results), None if out is None else folder)


def repair(
    model: BackdoorModel,
    probe_dataset: Any,
    *,
    defense: str | None = None,
    test_dataset: Any = None,
    config: RepairConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    quiet: bool = True,
) -> Repaired:
    """Repair a trained `model` with a post-training `defense` (see `bdguard defenses`; default: the one `config`
    names, else "linf-prune"), from `probe_dataset`: the defender's few clean, labelled images. `test_dataset`:
    clean images to measure BA on (and ASR, with an attack in `config`); without it a seeded share of
    `probe_dataset` (probe.size images) is the probe and the rest measures. The model given is not changed."""
    if not isinstance(model, BackdoorModel):
        raise BdguardError(f"model must be a BackdoorModel, got {type(model).__name__}")
    source = TEST_HOLDOUT if test_dataset is None else TRAIN_SPLIT
    choice = ("defense", defense, "linf-prune")
    settings, defense = _settings(RepairConfig, config, choice, {"probe": {"source": source}}, None)
    DEFENSES.get(defense)  # an unknown name fails before the data is read
    probe = _arrays(probe_dataset, "probe_dataset")
    test = probe if test_dataset is None else _arrays(test_dataset, "test_dataset")
    if test_dataset is None:  # the probe and the images that measure share the one set given
        size = settings.get("probe", {}).get("size", 500)
        settings = merge(settings, {"probe": {"size": min(int(size), len(probe[1]) // 2)}})
    raw = _raw(probe, test, _classes(probe_dataset, probe[1], test[1]))
    with _folder(out) as folder, held(raw, flip=False) as name:
        settings = merge(settings, {"data": {"dataset": name}})
        model_path = _model_file(model, name, folder / "given")
        results = run_repair(RepairConfig.from_dict(settings), model_path, folder / "run", quiet)
        repaired, _ = load_model(folder / "run" / MODEL)
    return Trained(repaired, RunResult.from_json(results), None if out is None else folder / "run")


def _settings(
    kind: type[Config],
    config: Config | Mapping[str, Any] | None,
    choice: tuple[str, str | None, str],
    given: dict[str, Any],
    epochs: int | None,
) -> tuple[dict[str, Any], str]:
    """(the nested settings, the name chosen): `config` (an object or a dict) with the arguments named in the call on
    top, checked now, as the CLI checks its flags (BdguardError with its message). `choice` is (section, the name the
    call gave or None, the default): a name given replaces the config's, and with it the options of what that named;
    without either, the default."""
    if config is None:
        tree: dict[str, Any] = {}
    elif isinstance(config, kind):
        tree = to_dict(config)
    elif isinstance(config, Mapping):
        tree = dict(config)
    else:
        raise BdguardError(f"config must be a {kind.__name__} or a dict of its settings, got {type(config).__name__}")
    section, name, default = choice
    chosen = tree.get(section) if isinstance(tree.get(section), Mapping) else {}
    if name is not None and chosen.get("name", name) != name:
        chosen = {}
    name = name or chosen.get("name") or default
    tree = {**merge(tree, given), section: {**chosen, "name": name}}
    if epochs is not None:
        tree = merge(tree, {"train": {"epochs": epochs}})
    kind.from_dict(merge(tree, {"data": {"dataset": "memory:check"}}))
    return tree, name


def _arrays(dataset: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, C, H, W), int64 labels (N,)) of a map-style dataset of (image, label) pairs."""
    try:
        size = len(dataset)
    except TypeError:
        kind = type(dataset).__name__
        raise BdguardError(f"{what} must be a map-style dataset (with len() and [i]), got {kind}") from None
    if size == 0:
        raise BdguardError(f"{what} is empty")
    images, labels = [], []
    for i in range(size):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise BdguardError(f"{what}[{i}] is not an (image, label) pair")
        images.append(_image(item[0], f"{what}[{i}]"))
        labels.append(_label(item[1], f"{what}[{i}]"))
        if images[-1].shape != images[0].shape:
            raise BdguardError(
                f"{what}[{i}] is {images[-1].shape} but {what}[0] is {images[0].shape} (C, H, W): every image must "
                "have one size (resize them in the dataset's transform)"
            )
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _image(image: Any, where: str) -> np.ndarray:
    """One image as uint8 (C, H, W)."""
    if isinstance(image, Image.Image):
        array = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise BdguardError(f"{where}: an image tensor must be (C, H, W), got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.cpu().numpy()
        if not image.is_floating_point() or not bool(((image >= 0) & (image <= 1)).all()):
            raise BdguardError(f"{where}: a float image tensor must hold values in [0, 1] (before normalising)")
        return (image.cpu().float() * 255).round().to(torch.uint8).numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    raise BdguardError(
        f"{where}: images must be PIL images, tensors (C, H, W) or uint8 arrays (H, W[, C]); got {type(image).__name__}"
    )


def _label(label: Any, where: str) -> int:
    value = label.item() if isinstance(label, torch.Tensor | np.ndarray | np.generic) and label.ndim == 0 else label
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise BdguardError(f"{where}: a label must be a class index (an integer >= 0), got {label!r}")
    return int(value)


def _classes(dataset: Any, *labels: np.ndarray) -> tuple[str, ...]:
    """The dataset's `classes` where it has them (torchvision's sets do), else the indices as names."""
    count = max(int(part.max()) for part in labels) + 1
    named = getattr(dataset, "classes", None)
    if isinstance(named, list | tuple) and all(isinstance(c, str) for c in named):
        if len(named) < count:
            raise BdguardError(f"the dataset names {len(named)} classes but has label {count - 1}")
        return tuple(named)
    return tuple(str(i) for i in range(max(count, 2)))


def _raw(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: tuple[str, ...]):
    raw = RawSplits(train[0], train[1], test[0], test[1], classes, "Python dataset (bdguard.api)")
    raw.validate("dataset")
    return raw


def _flags(values: Any, size: int) -> np.ndarray:
    flags = np.asarray(values)
    if flags.dtype != np.bool_ or flags.shape != (size,):
        raise BdguardError(f"poisoned must be bool flags, one per sample ({size}), got {flags.dtype} {flags.shape}")
    return flags


def _model_file(model: BackdoorModel, dataset: str, folder: Path) -> Path:
    """The caller's model as a model file of the held data set `dataset`, for the commands that read one."""
    path = folder / MODEL
    save_model(model, path, model_meta(model, load_dataset(DataConfig(dataset=dataset)), {}))
    return path


@contextmanager
def _folder(out: str | Path | None) -> Iterator[Path]:
    """`out`, or a temporary folder removed afterwards."""
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="bdguard-") as folder:
        yield Path(folder)
