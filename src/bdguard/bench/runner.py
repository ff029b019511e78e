"""The run behind `bdguard bench`: every step of the grid in turn, finished ones skipped, one progress display.

Cells run in this process through the same functions as the commands (`run_train`, `run_repair`, `run_poison`,
`run_analyze`), so a cell's folder is exactly what its command would write. A killed bench resumes where it
stopped: finished steps (cell.json present) are skipped, a training cell continues from its last epoch's
checkpoint, and a repair or analysis starts again (they take minutes, not hours). A step that fails is recorded
(error.txt in its folder, a `failed` row) and the grid goes on; re-running retries it.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from bdguard.attacks import build_attack
from bdguard.bench.config import BenchConfig
from bdguard.bench.grid import DONE, POISON_STORE, SETTINGS, Step, cell_order, plan
from bdguard.bench.results import (
    COLUMNS,
    DETECTION_COLUMNS,
    cell_row,
    detection_row,
    failed_row,
    summarise,
    write_csv,
)
from bdguard.config import to_dict
from bdguard.data import load_dataset
from bdguard.errors import BdguardError
from bdguard.io import read_json, write_json, write_text
from bdguard.progress import grid_progress, log
from bdguard.runs.common import environment
from bdguard.runs.detect import run_detect
from bdguard.runs.poison import run_poison
from bdguard.runs.repair import TEST_HOLDOUT, run_repair
from bdguard.runs.train import run_train
from bdguard.training.runtime import CHECKPOINT

ERROR = "error.txt"


def _write_settings(path: Path, config: Any) -> None:
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _finished(step: Step) -> bool:
    if not (step.folder / DONE).exists():
        return False
    return step.analysis is None or (step.folder / "analysis" / "analysis.json").exists()


def check_folders(steps: list[Step]) -> None:
    """Refuse a DIR whose finished steps were made with other settings than the grid's same steps now."""
    for step in steps:
        done = step.folder / DONE
        if done.exists():
            try:
                recorded = read_json(done).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                recorded = None
            if recorded != step.fingerprint:
                raise BdguardError(
                    f"{step.folder} holds {step.label} made with other settings than this suite's; "
                    "choose another --out, or delete that folder to redo it"
                )


def preflight(config: BenchConfig) -> None:
    """Load the data set once and build every attack on it, so a missing data set, a target that is no class or a
    trigger that does not fit the images fails before the first run."""
    bundle = load_dataset(config.data)
    for attack in config.attacks:
        build_attack(config.attack_config(attack, config.seeds[0]), bundle.num_classes, bundle.image_shape)
    if config.probe.source == TEST_HOLDOUT and config.probe.size >= len(bundle.test):
        size, test = config.probe.size, len(bundle.test)
        raise BdguardError(f"probe.size {size} leaves no test images to evaluate on ({bundle.name} has {test})")


def _run_step(step: Step, out: Path, quiet: bool) -> dict[str, Any]:
    """Run one step (its missing parts) and return its results."""
    store = out / POISON_STORE
    step.folder.mkdir(parents=True, exist_ok=True)
    _write_settings(step.folder / SETTINGS, step.config)
    if step.kind == "poison":
        return run_poison(step.config, step.folder, quiet=quiet, poison_store=store)
    if step.kind == "detect":
        if step.source is not None and not step.source.exists():
            raise BdguardError(f"the model it inspects, {step.source}, is missing: its `none` cell did not finish")
        return run_detect(step.config, step.folder, step.source, quiet=quiet, poison_store=store)
    results_file = step.folder / "results.json"
    if results_file.exists():  # the run finished before an interruption; only what follows it is missing
        results = read_json(results_file)
    elif step.kind == "train":
        results = run_train(step.config, step.folder, resume=True, quiet=quiet, poison_store=store)
    else:
        if not step.source.exists():
            raise BdguardError(f"the model it repairs, {step.source}, is missing: its `none` cell did not finish")
        results = run_repair(step.config, step.source, step.folder, quiet=quiet)
    if step.analysis is not None:
        from bdguard.runs.analyze import run_analyze  # imported here: it draws with matplotlib

        folder = step.folder / "analysis"
        folder.mkdir(parents=True, exist_ok=True)
        _write_settings(folder / SETTINGS, step.analysis)
        run_analyze(step.analysis, step.folder / "model.safetensors", folder, quiet=quiet)
    return results


def _message(step: Step, results: dict[str, Any]) -> str:
    if step.kind == "poison":
        return f"{step.label}: {results['poisoned']} poisoned samples"
    if step.kind == "detect":
        auroc = (results["metrics"] or {}).get("auroc")
        return f"{step.label}: AUROC {'-' if auroc is None else f'{auroc:.3f}'}, flagged {results['flagged']}"
    parts = [f"BA {results['ba']:.3f}"]
    if results.get("asr") is not None:
        parts.append(f"ASR {results['asr']:.3f}")
    return f"{step.label}: {'  '.join(parts)}"


def _relative(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def collect(config: BenchConfig, steps: list[Step], out: Path, kind: str = "cell") -> list[dict]:
    """The rows of the cells (or, with kind="detect", the detections) finished or failed so far, in the grid's
    order."""
    rows = []
    for step in steps:
        if not (step.is_cell if kind == "cell" else step.kind == "detect"):
            continue
        folder = _relative(step.folder, out)
        if (step.folder / DONE).exists():
            rows.append(read_json(step.folder / DONE)["row"])
        elif (step.folder / ERROR).exists():
            error = (step.folder / ERROR).read_text().strip().splitlines()[0]
            columns, name = (COLUMNS, "defense") if kind == "cell" else (DETECTION_COLUMNS, "detector")
            rows.append(failed_row(columns, folder, error, attack=step.attack, seed=step.seed, **{name: step.defense}))
    if kind != "cell":
        return rows  # the grid's own order: by attack, seed, then detector as listed
    order = cell_order(config)
    return sorted(rows, key=lambda row: order[(row["attack"], row["defense"], row["seed"])])


def write_results(config: BenchConfig, steps: list[Step], out: Path) -> dict[str, Any]:
    """results.csv, summary.csv and results.json from the cells' folders (rewritten whole after every cell)."""
    rows = collect(config, steps, out)
    detections = collect(config, steps, out, kind="detect")
    summary = summarise(rows)
    write_csv(out / "results.csv", rows, COLUMNS)
    if config.detectors:
        write_csv(out / "detections.csv", detections, DETECTION_COLUMNS)
    write_csv(out / "summary.csv", summary, summary[0].keys() if summary else ("attack", "defense", "seeds"))
    data = {
        "suite": config.name,
        "description": config.description,
        "cells": rows,
        "summary": summary,
        "detections": detections,
        "config": to_dict(config),
        "environment": environment(),
    }
    write_json(out / "results.json", data)
    return data


def run_bench(config: BenchConfig, out: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Run every step of the grid of `config` not finished yet in `out`, and write out/results.csv,
    out/summary.csv and out/results.json; returns what results.json holds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BdguardError(f"--out {out} exists and is not a folder")
    if (out / CHECKPOINT).exists() or (out / "model.safetensors").exists():
        raise BdguardError(f"{out} holds a training run: choose another --out for bench")
    steps = plan(config, out)
    check_folders(steps)
    preflight(config)
    out.mkdir(parents=True, exist_ok=True)
    _write_settings(out / "suite.yaml", config)
    write_json(
        out / "bench.json",
        {
            "suite": config.name,
            "steps": [{"label": s.label, "folder": _relative(s.folder, out), "commands": s.commands()} for s in steps],
            "rerun": f"bdguard bench --suite {out / 'suite.yaml'} --out {out}",
            "environment": environment(),
        },
    )
    finished = sum(_finished(step) for step in steps)
    if finished:
        log(f"bench {config.name}: {finished} of {len(steps)} steps already finished in {out}")
    with grid_progress(f"bench {config.name}", len(steps), finished, quiet) as grid:
        for step in steps:
            if _finished(step):
                continue
            began = time.perf_counter()
            (step.folder / ERROR).unlink(missing_ok=True)
            try:
                results = _run_step(step, out, quiet)
            except Exception as exc:  # one failed cell must not cost the rest of a long grid
                step.folder.mkdir(parents=True, exist_ok=True)
                write_text(step.folder / ERROR, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
                grid.finished(f"{step.label}: FAILED ({type(exc).__name__}: {exc}); see {step.folder / ERROR}")
                write_results(config, steps, out)
                continue
            seconds = time.perf_counter() - began
            record: dict[str, Any] = {
                "kind": step.kind,
                "attack": step.attack,
                "defense": step.defense,
                "seed": step.seed,
                "fingerprint": step.fingerprint,
                "commands": step.commands(),
                "seconds": round(seconds, 2),
                "environment": environment(),
            }
            if step.is_cell:
                folder = _relative(step.folder, out)
                record["row"] = cell_row(step.attack, step.defense, step.seed, results, folder)
            elif step.kind == "detect":
                folder = _relative(step.folder, out)
                record["row"] = detection_row(step.attack, step.defense, step.seed, results, folder)
            write_json(step.folder / DONE, record)
            grid.finished(_message(step, results))
            write_results(config, steps, out)
    return write_results(config, steps, out)
