"""The run behind `bdguard detect`: score every training sample with a poisoned-sample detector.

The set is the one `bdguard train` would train on: the data set, poisoned first when an attack is given (then the
poison mask is ground truth and the detection is measured against it), or as it is (a user's own `imagefolder:`
set: ranking, flags and gallery, no metrics). Detectors that inspect a trained model take `model_path`, or train
the undefended model on the set in DIR/model/ (a `bdguard train` run folder, resumable), once.

Files: scores.csv (index, label, score, flagged, file for a set read from files, and poisoned where known),
flagged.npy (bool (N,), load order), score_hist.png, most_suspicious.png, config.json, results.json (the detector,
its threshold, counts, seconds, and AUROC, AUPRC, TPR, FPR, precision where ground truth exists).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdguard.attacks import AttackConfig
from bdguard.config import RootConfig, check_range, to_dict
from bdguard.data import DataBundle, DataConfig
from bdguard.defenses import DefenseConfig
from bdguard.defenses.base import SCORES_FILE
from bdguard.detectors import Detection, DetectionJob, DetectorConfig, build_detector
from bdguard.errors import BdguardError
from bdguard.io import write_array, write_json
from bdguard.models import BackdoorModel, load_model
from bdguard.models.base import check_model_options, require_feature_map, sized_model
from bdguard.results import DetectionResult
from bdguard.runs.common import (
    MODEL,
    RESULTS,
    check_before_loading,
    check_model_data,
    environment,
    set_up,
    use_device,
    write_scores,
)
from bdguard.runs.folder import run_folder
from bdguard.runs.train import RunConfig, run_train
from bdguard.training import TrainConfig
from bdguard.training.metrics import detection_metrics

MODEL_DIR = "model"  # DIR/model/: the undefended training run, when a detector needs a model and none is given


@dataclass
class DetectConfig(RootConfig):
    """One detection. `attack` poisons the set first (none: the set as given); `train` is how a model is trained
    when the detector needs one and no model file is given, and gives the device, threads and batch sizes."""

    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gallery: int = 32  # images in most_suspicious.png

    def __post_init__(self) -> None:
        check_range("gallery", self.gallery, 1, 256)


def _model_source(
    config: DetectConfig,
    model_path: Path | None,
    out: Path,
    device: torch.device,
    quiet: bool,
    bundle: DataBundle,
    poison_store: str | Path | None,
) -> Callable[[], BackdoorModel]:
    """model() for the job: the given model file (checked against the data), or the undefended model trained on
    the set in out/model/ on first call (resumed if an earlier detect was interrupted)."""
    cached: list[BackdoorModel] = []

    def model() -> BackdoorModel:
        if not cached:
            if model_path is not None:
                loaded, meta = load_model(model_path, device)
                check_model_data(meta, bundle, model_path)
            else:
                undefended = DefenseConfig("none")
                run = RunConfig(data=config.data, attack=config.attack, defense=undefended, train=config.train)
                run_train(run, out / MODEL_DIR, resume=True, quiet=quiet, poison_store=poison_store)
                loaded, _ = load_model(out / MODEL_DIR / MODEL, device)
            cached.append(loaded.eval())
        return cached[0]

    return model


def run_detect(
    config: DetectConfig,
    out: str | Path,
    model_path: str | Path | None = None,
    quiet: bool = False,
    poison_store: str | Path | None = None,
) -> dict[str, Any]:
    """Score the training set of `config` with its detector and write the detection folder `out`. `poison_store`
    as in `run_train`: the bench's detections read the very set its cells trained on."""
    return detect_to_folder(config, out, model_path, quiet, poison_store)[0]


def detect_to_folder(
    config: DetectConfig,
    out: str | Path,
    model_path: str | Path | None = None,
    quiet: bool = False,
    poison_store: str | Path | None = None,
) -> tuple[dict[str, Any], Detection]:
    """`run_detect`, which also returns the detection itself (bdguard.api hands its scores over)."""
    out = Path(out)
    model_path = None if model_path is None else Path(model_path)
    detector = build_detector(config.detector)  # an unknown name or a bad setting fails before the data loads
    if model_path is not None and not detector.uses_model:
        raise BdguardError(f"detector {detector.name} trains what it needs itself and reads no --model")
    if model_path is not None and not model_path.is_file():
        raise BdguardError(f"--model {model_path} is not a file")
    check_before_loading(config.data, config.attack)
    check_model_options(config.train.model, config.train.model_kwargs)  # what it trains, if it trains
    if detector.reads_feature_map and model_path is None:
        require_feature_map(sized_model(config.train.model, config.train.model_kwargs), f"detector {detector.name}")
    with run_folder(out, "detect", to_dict(config), model_path):
        device = use_device(config.train)
        began = time.perf_counter()
        run = set_up(config.data, config.attack, device, quiet, poison=True, poison_store=poison_store)
        bundle, attack, poisoned = run.bundle, run.attack, run.poisoned
        model = _model_source(config, model_path, out, device, quiet, bundle, poison_store)
        if model_path is not None:
            loaded = model()  # refuses a model of another data set before minutes of scoring (and keeps it)
            if detector.reads_feature_map:
                require_feature_map(loaded, f"detector {detector.name}")
        job = DetectionJob(
            data=poisoned.train,
            bundle=bundle,
            train=config.train,
            device=device,
            model=model,
            run_dir=out,
            quiet=quiet,
            seed=config.train.seed,
        )
        detection = detector.detect(job)
        _check(detection, len(poisoned.train), detector.name)
        truth = poisoned.poison_mask if attack.has_trigger and bool(poisoned.poison_mask.any()) else None
        cross = poisoned.cross_mask if truth is not None else None
        record = DetectionResult(
            detector=detector.name,
            dataset=bundle.name,
            attack=config.attack.name,
            samples=len(poisoned.train),
            poisoned=None if truth is None else int(truth.sum()),
            threshold=detection.threshold,
            flagged=int(detection.flagged.sum()),
            metrics=None if truth is None else detection_metrics(detection.scores, detection.flagged, truth, cross),
            model=None if not detector.uses_model else str(model_path or out / MODEL_DIR / MODEL),
            seconds=round(time.perf_counter() - began, 2),
            environment=environment(),
            extra=detection.extra,
        )
        results = record.to_json()
        _write_outputs(out, config, detection, poisoned.train, bundle.classes, truth)
        write_json(out / RESULTS, results)  # last: a results.json means the folder is complete
    return results, detection


def _check(detection: Detection, size: int, name: str) -> None:
    """A detector's output is one finite score and one flag per sample; anything else is a bug to stop on."""
    if detection.scores.shape != (size,) or detection.flagged.shape != (size,):
        raise RuntimeError(f"detector {name} returned {tuple(detection.scores.shape)} scores for {size} samples")
    if not bool(torch.isfinite(detection.scores).all()):
        raise BdguardError(f"detector {name} produced non-finite scores (a diverged model?)")


def _write_outputs(out: Path, config: DetectConfig, detection: Detection, data, classes, truth) -> None:
    # imported here: matplotlib is slow to import and only the end of a run draws
    from bdguard.detectors.report import plot_most_suspicious, plot_score_hist

    scores, flagged = detection.scores.float().cpu(), detection.flagged.bool().cpu()
    labels = data.labels.cpu()
    write_scores(out / SCORES_FILE, scores, flagged, data, truth)
    write_array(out / "flagged.npy", flagged)
    truth_cpu = None if truth is None else truth.cpu()
    plot_score_hist(out / "score_hist.png", scores, flagged, truth_cpu)
    count = min(config.gallery, scores.numel())
    plot_most_suspicious(
        out / "most_suspicious.png", data.images.cpu(), labels, scores, classes, count, truth_cpu, data.files
    )
