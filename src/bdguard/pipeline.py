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
from bdguard.attacks import ATTACKS, AttackConfig, AttackContext, TriggeredSet, build_attack
from bdguard.config import from_dict, to_dict
from bdguard.data import DataBundle, DataConfig, load_dataset
from bdguard.defenses import DefenseConfig, TrainingDefense, TrainingJob, build_defense
from bdguard.errors import BdguardError
from bdguard.io import write_json, write_with
from bdguard.models import MODELS, load_model, save_model
from bdguard.progress import log
from bdguard.training import TrainConfig, evaluate, resolve_device
from bdguard.training.factory import model_meta, new_model


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


def _check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BdguardError(f"--out {out} exists and is not a folder")
    if not resume and (out / "checkpoint.pt").exists():
        raise BdguardError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")


def run_train(config: RunConfig, out: str | Path, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Poison (if an attack is set), train with the chosen defense, evaluate, and write the run folder."""
    out = Path(out)
    _check_out_dir(out, resume)
    defense = build_defense(config.defense)
    if not isinstance(defense, TrainingDefense):
        raise BdguardError(f"defense {defense.name} acts on a trained model: use `bdguard prune`, not `train`")
    # unknown names fail before the data set loads
    ATTACKS.get(config.attack.name)
    MODELS.get(config.train.model)
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    began = time.perf_counter()
    bundle = prepare_data(config.data, device)
    attack = build_attack(config.attack, bundle.num_classes, bundle.image_shape)
    attack.prepare(bundle, AttackContext(device, config.data.cache_path(), quiet))
    poisoned = attack.poison(bundle.train)
    triggered = attack.test_set(bundle.test) if attack.has_trigger else None
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config": to_dict(config), "environment": environment()})
    write_json(out / "attack.json", poisoned.manifest)
    mask = poisoned.poison_mask.cpu().numpy()
    write_with(out / "poison_mask.npy", lambda handle: np.save(handle, mask, allow_pickle=False))

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
        "seconds": round(time.perf_counter() - began, 2),
        "poisoned": poisoned.manifest["poisoned"],
        "train_size": len(poisoned.train),
        "target": config.attack.target if attack.has_trigger else None,
        **extra,
        "environment": environment(),
    }
    write_json(out / "results.json", results)
    return results


def run_evaluate(
    model_path: str | Path,
    data: DataConfig,
    attack: AttackConfig | None,
    out: str | Path | None,
    device: str = "auto",
    batch_size: int = 512,
) -> dict[str, Any]:
    """BA/ASR/RA of a saved model; the attack defaults to the one recorded in the model file."""
    torch_device = resolve_device(device)
    model, meta = load_model(model_path, torch_device)
    if attack is None:
        recorded = meta.extra.get("attack")
        attack = from_dict(AttackConfig, recorded) if recorded else AttackConfig()
    began = time.perf_counter()
    bundle = prepare_data(data, torch_device)
    if list(bundle.image_shape) != list(meta.input_shape) or bundle.num_classes != meta.num_classes:
        raise BdguardError(
            f"model {model_path} expects {meta.num_classes} classes of {tuple(meta.input_shape)} images, "
            f"but {bundle.name} has {bundle.num_classes} classes of {bundle.image_shape} images"
        )
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
