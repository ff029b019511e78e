"""The run behind `bdguard repair`: repair a trained model with a post-training defense and measure it.

The defender's data is the probe set: a seeded share of the clean test set (default 500 images) or a folder of
clean images. Held-out probe images never enter BA/ASR: BA is measured on the test set minus the probe, ASR and
RA on the remaining test images not of the target class, stamped with the real trigger.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdguard.attacks import AttackConfig
from bdguard.config import RootConfig, check_range, check_seed, to_dict
from bdguard.data import DataBundle, DataConfig, ImageSet
from bdguard.data.sources import ImageDecoder
from bdguard.data.sources.folders import read_labelled_dir
from bdguard.defenses import DefenseConfig, PostTrainingDefense, RepairJob, build_defense
from bdguard.errors import BdguardError
from bdguard.io import write_json
from bdguard.models import BackdoorModel, ModelMeta, load_model, save_model
from bdguard.models.base import require_feature_map
from bdguard.progress import log
from bdguard.results import RunResult, Scores
from bdguard.runs.common import (
    MODEL,
    RESULTS,
    check_before_loading,
    environment,
    recorded_attack,
    set_up,
    use_device,
)
from bdguard.runs.folder import claim, run_folder
from bdguard.training import Evaluator, TrainConfig

TEST_HOLDOUT = "test-holdout"
TRAIN_SPLIT = "train-split"  # the data set's training split is the defender's clean data (bdguard.api's probe set)
DEFAULT_DEFENSE = "linf-prune"


@dataclass
class ProbeConfig:
    size: int = 500
    # or TRAIN_SPLIT, or a folder of class sub-folders (imagefolder layout) of clean images
    source: str = TEST_HOLDOUT
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("probe.size", self.size, 1)
        check_seed("probe.seed", self.seed)


@dataclass
class RepairConfig(RootConfig):
    """One repair run. `train` gives the device, threads, evaluation batch and any fine-tuning's settings."""

    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig | None = None  # None: the attack recorded in the model file
    defense: DefenseConfig = field(default_factory=lambda: DefenseConfig(name=DEFAULT_DEFENSE))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepairConfig:
        # a defense section without a name (only --set options) means the default defense, not DefenseConfig's
        section = data.get("defense", {})
        if isinstance(section, dict):
            data = {**data, "defense": {"name": DEFAULT_DEFENSE, **section}}
        return super().from_dict(data)


def split_probe(test: ImageSet, config: ProbeConfig) -> tuple[ImageSet, ImageSet]:
    """(probe, evaluation set): `config.size` test images drawn with `config.seed`, and the others."""
    if config.size >= len(test):
        raise BdguardError(
            f"probe.size {config.size} leaves no test images to evaluate on (the test set has {len(test)}); "
            "choose a smaller probe or a probe folder"
        )
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(config.seed)).to(test.device)
    held = torch.zeros(len(test), dtype=torch.bool, device=test.device)
    held[order[: config.size]] = True
    return test.subset(held), test.subset(~held)


def read_probe_folder(config: ProbeConfig, bundle: DataBundle) -> ImageSet:
    """Up to `config.size` clean images (a seeded choice) from a folder of class sub-folders named like the
    data set's classes, resized to the data set's image size."""
    folder = Path(config.source).expanduser()
    if not folder.is_dir():
        raise BdguardError(
            f"probe.source must be {TEST_HOLDOUT!r}, {TRAIN_SPLIT!r} or a folder of class sub-folders; got {folder}"
        )
    channels, height, width = bundle.image_shape
    decoder = ImageDecoder(height if height == width else None, allow_gray=channels == 1)
    images, labels, _ = read_labelled_dir(folder, list(bundle.classes), decoder)
    probe = ImageSet(torch.from_numpy(images), torch.from_numpy(labels))
    if probe.image_shape != bundle.image_shape:
        raise BdguardError(f"probe images in {folder} are {probe.image_shape}; the model takes {bundle.image_shape}")
    return seeded_share(probe, config).to(bundle.test.device)


def take_probe(bundle: DataBundle, config: ProbeConfig) -> tuple[ImageSet, ImageSet]:
    """(probe, evaluation set): a held-out share of the test set and the rest, or a probe folder and the whole
    test set."""
    if config.source == TEST_HOLDOUT:
        return split_probe(bundle.test, config)
    if config.source == TRAIN_SPLIT:
        return seeded_share(bundle.train, config), bundle.test
    return read_probe_folder(config, bundle), bundle.test


def seeded_share(images: ImageSet, config: ProbeConfig) -> ImageSet:
    """Up to `config.size` of `images`, a seeded choice."""
    if len(images) <= config.size:
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    return images.subset(order[: config.size].to(images.device))


def run_repair(config: RepairConfig, model_path: str | Path, out: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Repair the model at `model_path` with the post-training defense of `config.defense` and write to `out`:
    model.safetensors (its mask and the repair recorded in the sidecar), config.json, results.json (train's keys
    plus `pruned_fraction`, `before` and the probe's description) and whatever the defense writes (pruning.json,
    curve.jsonl, curve.png, norms.png for the pruning defenses)."""
    out, model_path = Path(out), Path(model_path)
    claim(out, "repair", to_dict(config), model_path)
    if (out / MODEL).resolve() == model_path.resolve():
        raise BdguardError(f"--out {out} would overwrite the model being repaired; choose another folder")
    defense = build_defense(config.defense)
    if not isinstance(defense, PostTrainingDefense):
        raise BdguardError(f"defense {defense.name} trains a model: use `bdguard train --defense {defense.name}`")
    device = use_device(config.train)
    model, meta = load_model(model_path, device)
    if defense.reads_feature_map:
        require_feature_map(model, f"defense {defense.name}")
    attack_config = config.attack or recorded_attack(meta)
    check_before_loading(config.data, attack_config)
    with run_folder(out, "repair", to_dict(config), model_path):
        return _repair(config, defense, model, meta, model_path, attack_config, device, out, quiet)


def _repair(
    config: RepairConfig,
    defense: PostTrainingDefense,
    model: BackdoorModel,
    meta: ModelMeta,
    model_path: Path,
    attack_config: AttackConfig,
    device: torch.device,
    out: Path,
    quiet: bool,
) -> dict[str, Any]:
    began = time.perf_counter()
    run = set_up(config.data, attack_config, device, quiet, models=((meta, model_path),))
    bundle, attack = run.bundle, run.attack
    probe, evaluation = take_probe(bundle, config.probe)
    triggered = run.triggered(evaluation)
    evaluator = Evaluator(evaluation, triggered, config.train.eval_batch_size, config.train.amp)
    log(f"probe: {len(probe)} clean images ({config.probe.source}); evaluation: {len(evaluation)} test images")
    before = evaluator(model)

    job = RepairJob(
        model=model,
        bundle=bundle,
        probe=probe,
        oracle=attack.apply if attack.has_trigger else None,
        target=attack_config.target if attack.has_trigger else None,
        evaluate=evaluator,
        train=config.train,
        device=device,
        run_dir=out,
        quiet=quiet,
        seed=config.train.seed,
    )
    result = defense.repair(job)
    model = result.model.to(memory_format=torch.contiguous_format).eval()
    masked = (model.feature_mask == 0).nonzero().squeeze(1).tolist()
    # a defense that prunes nothing (Neural Cleanse's unlearning) reports no fraction: its mask's, 0
    if result.pruned_fraction is None:
        result.pruned_fraction = len(masked) / model.feature_channels
    pruned_fraction = result.pruned_fraction
    probe_info = {"source": config.probe.source, "size": len(probe), "seed": config.probe.seed}
    repair = {
        "source_model": str(model_path),
        "feature_channels": model.feature_channels,
        "masked_channels": masked,  # also in the weights file, as the feature_mask buffer
        "pruned_fraction": pruned_fraction,
        "probe": probe_info,
    }
    extra_meta = {**meta.extra, "defense": to_dict(config.defense), "trained_with": meta.extra.get("defense")}
    save_model(model, out / MODEL, dataclasses.replace(meta, extra={**extra_meta, "repair": repair}))

    record = RunResult(
        command="repair",
        scores=Scores(**evaluator(model)),
        dataset=bundle.name,
        attack=attack_config.name,
        defense=config.defense.name,
        model=meta.architecture,
        epochs=(meta.extra.get("train") or {}).get("epochs"),
        seconds=round(time.perf_counter() - began, 2),
        environment=environment(),
        target=attack_config.target if attack.has_trigger else None,  # poisoned, train_size: not the defender's
        before=Scores(**before),
        probe=probe_info,
        eval_size=len(evaluation),
        model_path=str(model_path),
        **result.result_fields(),
    )
    results = record.to_json()
    write_json(out / RESULTS, results)
    return results
