"""Runs as the CLI and the Python API both use them: one config object in, one results.json out."""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdguard import __version__
from bdguard.attacks import Attack, AttackConfig, AttackContext, PoisonedSet, TriggeredSet, build_attack, check_attack
from bdguard.attacks.store import load_poisoned, poison_key, store_poisoned
from bdguard.config import check_range, from_dict, to_dict
from bdguard.data import DataBundle, DataConfig, load_dataset
from bdguard.data.loading import known_class_count
from bdguard.defenses import DefenseConfig, TrainingDefense, TrainingJob, build_defense
from bdguard.errors import BdguardError
from bdguard.io import check_writable, run_lock, write_json, write_with
from bdguard.models import MODELS, ModelMeta, load_model, save_model
from bdguard.progress import log
from bdguard.training import TrainConfig, evaluate, resolve_device
from bdguard.training.factory import model_meta, new_model
from bdguard.training.runtime import CHECKPOINT, RunClock


@dataclass
class RunConfig:
    """One training run: the data, the attack that poisons it, the defense that trains on it."""

    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return from_dict(cls, data)


def environment() -> dict[str, Any]:
    """What produced a result: versions, machine, command line."""
    return {
        "bdguard": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads",
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": shlex.join(["bdguard", *sys.argv[1:]]),
    }


def fingerprint(config: RunConfig) -> str:
    """A hash of everything that shapes the result; the device and thread count may change on resume."""
    data = to_dict(config)
    for key in ("device", "threads"):
        data["train"].pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(config: DataConfig, device: torch.device) -> DataBundle:
    bundle = load_dataset(config)
    sizes = f"{len(bundle.train)} train / {len(bundle.test)} test images {bundle.image_shape}"
    log(f"{bundle.name}: {sizes} from {bundle.source}")
    return bundle.to(device)


def check_before_loading(data: DataConfig, attack: AttackConfig) -> None:
    """What can be refused before minutes of decoding: the attack and its options, and its target where the data
    set's registry entry knows the class count."""
    check_attack(attack)
    classes = known_class_count(data)
    if classes is not None and attack.target >= classes:
        raise BdguardError(f"attack target {attack.target} is not a class ({data.dataset} has {classes})")


def refuse_run_folder(out: Path, command: str, models_too: bool = True) -> None:
    """A run's folder belongs to its run: another command's files there (results.json above all) would replace the
    run's. Refuses a training run's folder, and with `models_too` any folder holding a model."""
    if out.exists() and not out.is_dir():
        raise BdguardError(f"--out {out} exists and is not a folder")
    if (out / CHECKPOINT).exists() or (models_too and (out / "model.safetensors").exists()):
        kind = "a training run" if (out / CHECKPOINT).exists() else "a model"
        raise BdguardError(f"{out} holds {kind}: choose another --out for {command}")


def _poisoned_data(
    config: RunConfig, device: torch.device, quiet: bool, poison_store: str | Path | None = None
) -> tuple[DataBundle, Attack, PoisonedSet, TriggeredSet | None]:
    """Load the data, prepare the attack on it, poison the training set (or read it from `poison_store`, a folder of
    stored poisoned sets) and trigger the test set."""
    store = None if poison_store is None else Path(poison_store)
    bundle = prepare_data(config.data, device)
    attack = build_attack(config.attack, bundle.num_classes, bundle.image_shape)
    attack.prepare(bundle, AttackContext(device, config.data.cache_path(), quiet))
    if store is None:
        poisoned = attack.poison(bundle.train)
    else:
        key = poison_key(bundle.name, bundle.train, config.attack)
        poisoned = load_poisoned(store / key, key, bundle.train)
        if poisoned is None:
            poisoned = attack.poison(bundle.train)
            store_poisoned(store / key, key, poisoned)
        else:
            log(f"poisoned set read from {store / key}")
    triggered = attack.test_set(bundle.test) if attack.has_trigger else None
    return bundle, attack, poisoned, triggered


def _write_mask(path: Path, mask: torch.Tensor) -> None:
    array = mask.cpu().numpy()
    write_with(path, lambda handle: np.save(handle, array, allow_pickle=False))


def run_train(
    config: RunConfig,
    out: str | Path,
    resume: bool = False,
    quiet: bool = False,
    poison_store: str | Path | None = None,
) -> dict[str, Any]:
    """Poison (if an attack is set), train with the chosen defense, evaluate, and write the run folder.
    `poison_store`: a folder of stored poisoned sets (`attacks/store.py`) to read the poisoned set from, or to
    add it to; runs on the same set then poison once."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BdguardError(f"--out {out} exists and is not a folder")
    defense = build_defense(config.defense)
    if not isinstance(defense, TrainingDefense):
        raise BdguardError(f"defense {defense.name} acts on a trained model: use `bdguard prune`, not `train`")
    # unknown names fail before the data set loads
    check_before_loading(config.data, config.attack)
    MODELS.get(config.train.model)
    check_writable(out)  # before minutes of decoding and training, not after
    with run_lock(out):
        if not resume and (out / CHECKPOINT).exists():
            raise BdguardError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        return _train(config, defense, out, resume, quiet, poison_store)


def _train(
    config: RunConfig,
    defense: TrainingDefense,
    out: Path,
    resume: bool,
    quiet: bool,
    poison_store: str | Path | None,
) -> dict[str, Any]:
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    clock = RunClock()
    bundle, attack, poisoned, triggered = _poisoned_data(config, device, quiet, poison_store)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config": to_dict(config), "environment": environment()})
    write_json(out / "attack.json", poisoned.manifest)
    _write_mask(out / "poison_mask.npy", poisoned.poison_mask)

    def evaluate_model(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, bundle.test, triggered, config.train.eval_batch_size, config.train.amp)

    job = TrainingJob(
        bundle=bundle,
        poisoned=poisoned,
        triggered=triggered,
        train=config.train,
        device=device,
        new_model=lambda: new_model(bundle, config.train, device),
        evaluate=evaluate_model,
        run_dir=out,
        fingerprint=fingerprint(config),
        resume=resume,
        quiet=quiet,
        clock=clock,
    )
    model, extra = defense.train(job)
    extra_meta = {"attack": to_dict(config.attack), "defense": to_dict(config.defense), "train": to_dict(config.train)}
    meta = model_meta(bundle, config.train, extra_meta)
    save_model(model.to(memory_format=torch.contiguous_format), out / "model.safetensors", meta)
    results = {
        **evaluate_model(model),
        "dataset": bundle.name,
        "attack": config.attack.name,
        "defense": config.defense.name,
        "model": config.train.model,
        "epochs": config.train.epochs,
        "seconds": round(clock.elapsed(), 2),  # summed over resumed invocations
        "poisoned": poisoned.manifest["poisoned"],
        "train_size": len(poisoned.train),
        "target": config.attack.target if attack.has_trigger else None,
        **extra,
        "environment": environment(),
    }
    write_json(out / "results.json", results)
    return results


GALLERY_ROWS = 6  # poisoned samples shown in gallery.png


def run_poison(
    config: RunConfig,
    out: str | Path,
    quiet: bool = False,
    rows: int = GALLERY_ROWS,
    poison_store: str | Path | None = None,
) -> dict[str, Any]:
    """Poison the training set without training and write the run's poisoning record to `out`:

    - manifest.json: the attack's manifest (attack, target, mode, rate, rate_meaning, clean_label, seed, params,
      counts `poisoned`, `cross`, `total`), then the target's class name, the data set, its image shape and class
      names, `poisoned_per_class`/`cross_per_class` (counts by original class, indexed like `classes`), the
      config and environment, and last the sample lists: `poisoned_indices` with the `poisoned_original_labels`
      and `poisoned_labels` (as the attacker set them) of those samples, and `cross_indices`;
    - poison_mask.npy, cross_mask.npy: bool (N,) over the training set in load order (no pickles), so flagged
      samples can be dropped;
    - gallery.png: `rows` seeded poisoned samples (plus cross ones) beside their clean versions.
    An earlier poison folder is overwritten; a training run's folder is refused, since its poison_mask.npy belongs
    to its model. Only what `attack.prepare` needs is trained. `poison_store` as in `run_train`.
    """
    out = Path(out)
    refuse_run_folder(out, "poison")
    check_range("gallery rows", rows, 1)
    check_before_loading(config.data, config.attack)
    check_writable(out)
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    bundle, attack, poisoned, triggered = _poisoned_data(config, device, quiet, poison_store)
    # Imported here: matplotlib is slow to import and only this command draws.
    from bdguard.reporting.gallery import poison_gallery, write_figure

    poison_mask, cross_mask = poisoned.poison_mask.cpu(), poisoned.cross_mask.cpu()
    original, labels = poisoned.original_labels.cpu(), poisoned.train.labels.cpu()
    poison_index = poison_mask.nonzero().squeeze(1)
    named_target = attack.has_trigger and config.attack.mode == "all2one"
    manifest = {
        **poisoned.manifest,
        "target_class": bundle.classes[config.attack.target] if named_target else None,
        "dataset": bundle.name,
        "dataset_source": bundle.source,
        "image_shape": list(bundle.image_shape),
        "classes": list(bundle.classes),
        "poisoned_per_class": torch.bincount(original[poison_mask], minlength=bundle.num_classes).tolist(),
        "cross_per_class": torch.bincount(original[cross_mask], minlength=bundle.num_classes).tolist(),
        "files": {
            "poison_mask.npy": "bool (N,) over the training set in load order: trigger inserted",
            "cross_mask.npy": "bool (N,) over the training set in load order: noise/cross sample, label kept",
            "gallery.png": "clean vs poisoned examples, amplified difference, triggered test images",
        },
        "config": {"data": to_dict(config.data), "attack": to_dict(config.attack)},
        "environment": environment(),
        "poisoned_indices": poison_index.tolist(),
        "poisoned_original_labels": original[poison_index].tolist(),
        "poisoned_labels": labels[poison_index].tolist(),
        "cross_indices": cross_mask.nonzero().squeeze(1).tolist(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_mask(out / "poison_mask.npy", poison_mask)
    _write_mask(out / "cross_mask.npy", cross_mask)
    figure = poison_gallery(bundle.train, poisoned, triggered, bundle.classes, rows, seed=config.attack.seed)
    write_figure(figure, out / "gallery.png")
    # last, so a manifest.json on disk means the folder is complete
    write_json(out / "manifest.json", manifest)
    return manifest


def recorded_attack(meta: ModelMeta) -> AttackConfig:
    """The attack a model file says it was trained under (no attack when it says nothing)."""
    recorded = meta.extra.get("attack")
    return from_dict(AttackConfig, recorded) if recorded else AttackConfig()


def check_model_data(meta: ModelMeta, bundle: DataBundle, model_path: str | Path) -> None:
    if list(bundle.image_shape) != list(meta.input_shape) or bundle.num_classes != meta.num_classes:
        raise BdguardError(
            f"model {model_path} expects {meta.num_classes} classes of {tuple(meta.input_shape)} images, "
            f"but {bundle.name} has {bundle.num_classes} classes of {bundle.image_shape} images"
        )


def run_evaluate(
    model_path: str | Path,
    data: DataConfig,
    attack: AttackConfig | None,
    out: str | Path | None,
    device: str = "auto",
    batch_size: int = 512,
) -> dict[str, Any]:
    """BA/ASR/RA of a saved model; the attack defaults to the one recorded in the model file."""
    if out is not None:
        refuse_run_folder(Path(out), "evaluate")
        check_writable(out)
    torch_device = resolve_device(device)
    model, meta = load_model(model_path, torch_device)
    attack = attack or recorded_attack(meta)
    began = time.perf_counter()
    bundle = prepare_data(data, torch_device)
    check_model_data(meta, bundle, model_path)
    attack_obj = build_attack(attack, bundle.num_classes, bundle.image_shape)
    attack_obj.prepare(bundle, AttackContext(torch_device, data.cache_path()))
    triggered: TriggeredSet | None = attack_obj.test_set(bundle.test) if attack_obj.has_trigger else None
    results = {
        **evaluate(model, bundle.test, triggered, batch_size),
        "dataset": bundle.name,
        "attack": attack.name,
        "defense": (meta.extra.get("defense") or {}).get("name", "unknown"),
        "model": meta.architecture,
        "epochs": (meta.extra.get("train") or {}).get("epochs"),
        "seconds": round(time.perf_counter() - began, 2),
        "model_path": str(model_path),
        "environment": environment(),
    }
    if out is not None:
        write_json(Path(out) / "results.json", results)
    return results
