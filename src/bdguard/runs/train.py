"""The runs behind `bdguard train` and `bdguard evaluate`: one config object in, one results.json out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdguard import distributed
from bdguard.attacks import AttackConfig
from bdguard.config import RootConfig, to_dict
from bdguard.data import DataConfig
from bdguard.defenses import DefenseConfig, TrainingDefense, TrainingJob, build_defense
from bdguard.defenses.base import SCORES_FILE
from bdguard.errors import BdguardError
from bdguard.io import write_array, write_json
from bdguard.models import BackdoorModel, load_model, save_model
from bdguard.models.base import check_model_options, require_feature_map, sized_model
from bdguard.results import RunResult, Scores
from bdguard.runs.common import (
    MODEL,
    RESULTS,
    check_before_loading,
    environment,
    fingerprint,
    recorded_attack,
    set_up,
    use_device,
    write_scores,
)
from bdguard.runs.folder import claim, run_folder
from bdguard.training import TrainConfig, evaluate, resolve_device
from bdguard.training.factory import model_meta, new_model
from bdguard.training.runtime import RunClock


@dataclass
class RunConfig(RootConfig):
    """One training run: the data, the attack that poisons it, the defense that trains on it."""

    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run_train(
    config: RunConfig,
    out: str | Path,
    resume: bool = False,
    quiet: bool = False,
    poison_store: str | Path | None = None,
    initial: BackdoorModel | None = None,
) -> dict[str, Any]:
    """Poison (if an attack is set), train with the chosen defense, evaluate, and write the run folder.
    `poison_store`: a folder of stored poisoned sets (`attacks/store.py`) to read the poisoned set from, or to
    add it to; runs on the same set then poison once. `initial`: a model built in Python (bdguard.api), whose
    copies the defense trains instead of a fresh `config.train.model` (which must name its architecture)."""
    out = Path(out)
    claim(out, "train", to_dict(config), resume=resume)
    defense = build_defense(config.defense)
    if not isinstance(defense, TrainingDefense):
        raise BdguardError(f"defense {defense.name} acts on a trained model: use `bdguard repair`, not `train`")
    if distributed.launched() and not defense.data_parallel:
        raise BdguardError(f"defense {defense.name} does not train data-parallel: run it without torchrun")
    # unknown names fail before the data set loads
    check_before_loading(config.data, config.attack)
    check_model_options(config.train.model, config.train.model_kwargs)
    if defense.reads_feature_map:
        require_feature_map(sized_model(config.train.model, config.train.model_kwargs), f"defense {defense.name}")
    device = use_device(config.train)  # under torchrun: joins the other ranks, which must all get here
    if not distributed.is_main():
        return _train(config, defense, device, out, resume, quiet, poison_store, initial)
    with run_folder(out, "train", to_dict(config), resume=resume):  # before minutes of decoding and training
        return _train(config, defense, device, out, resume, quiet, poison_store, initial)


def _train(
    config: RunConfig,
    defense: TrainingDefense,
    device: torch.device,
    out: Path,
    resume: bool,
    quiet: bool,
    poison_store: str | Path | None,
    initial: BackdoorModel | None,
) -> dict[str, Any]:
    clock = RunClock()
    with distributed.main_first():  # the others read the data and the poisoned set the main rank cached
        run = set_up(config.data, config.attack, device, quiet, poison=True, poison_store=poison_store)
    bundle, attack, poisoned, triggered = run.bundle, run.attack, run.poisoned, run.triggered(run.bundle.test)
    if distributed.is_main():  # the one rank that writes
        write_json(out / "attack.json", poisoned.manifest)
        write_array(out / "poison_mask.npy", poisoned.poison_mask)

    def evaluate_model(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, bundle.test, triggered, config.train.eval_batch_size, config.train.amp)

    job = TrainingJob(
        bundle=bundle,
        poisoned=poisoned,
        triggered=triggered,
        train=config.train,
        device=device,
        new_model=lambda: new_model(bundle, config.train, device, initial),
        evaluate=evaluate_model,
        run_dir=out,
        fingerprint=fingerprint(config),
        resume=resume,
        quiet=quiet,
        clock=clock,
    )
    result = defense.train(job)
    if not distributed.is_main():
        return {}  # the main rank evaluates, saves and reports the model all ranks trained
    model = result.model
    extra_meta = {"attack": to_dict(config.attack), "defense": to_dict(config.defense), "train": to_dict(config.train)}
    meta = model_meta(model, bundle, extra_meta)
    save_model(model.to(memory_format=torch.contiguous_format), out / MODEL, meta)
    if result.scores is not None:  # the defense's own detector, in the form `bdguard detect` writes
        write_scores(out / SCORES_FILE, result.scores, result.flagged, poisoned.train)
    record = RunResult(
        command="train",
        scores=Scores(**evaluate_model(model)),
        dataset=bundle.name,
        attack=config.attack.name,
        defense=config.defense.name,
        model=config.train.model,
        epochs=config.train.epochs,
        seconds=round(clock.elapsed(), 2),  # summed over resumed invocations
        environment=environment(),
        poisoned=poisoned.manifest["poisoned"],
        train_size=len(poisoned.train),
        target=config.attack.target if attack.has_trigger else None,
        **result.result_fields(),
    )
    results = record.to_json()
    write_json(out / RESULTS, results)
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
    settings = {"data": to_dict(data), "attack": None if attack is None else to_dict(attack)}
    if out is None:
        return _evaluate(model_path, data, attack, device, batch_size)
    with run_folder(out, "evaluate", settings, model=model_path) as folder:
        results = _evaluate(model_path, data, attack, device, batch_size)
        write_json(folder / RESULTS, results)
    return results


def _evaluate(
    model_path: str | Path, data: DataConfig, attack: AttackConfig | None, device: str, batch_size: int
) -> dict[str, Any]:
    torch_device = resolve_device(device)
    model, meta = load_model(model_path, torch_device)
    attack = attack or recorded_attack(meta)
    began = time.perf_counter()
    run = set_up(data, attack, torch_device, quiet=False, models=((meta, model_path),))
    bundle, triggered = run.bundle, run.triggered(run.bundle.test)
    record = RunResult(
        command="evaluate",
        scores=Scores(**evaluate(model, bundle.test, triggered, batch_size)),
        dataset=bundle.name,
        attack=attack.name,
        defense=(meta.extra.get("defense") or {}).get("name", "unknown"),
        model=meta.architecture,
        epochs=(meta.extra.get("train") or {}).get("epochs"),
        seconds=round(time.perf_counter() - began, 2),
        environment=environment(),
        model_path=str(model_path),
    )
    return record.to_json()
