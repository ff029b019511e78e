"""The run behind `bdguard bench`: the grid of a suite planned, checked against what its folder already holds,
its unfinished steps run by an executor (`executors.py`), and the tables rewritten after every step.

A killed bench resumes where it stopped: finished steps (cell.json present) are skipped and the others run again
(`execute.py` says how far each one resumes). A step that fails is recorded (error.txt in its folder, a `failed`
row) and the grid goes on; re-running retries it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bdguard.attacks import build_attack
from bdguard.bench.config import BenchConfig
from bdguard.bench.execute import ERROR, finished, relative, write_settings
from bdguard.bench.executors import ExecutorConfig, run_steps
from bdguard.bench.grid import DONE, Step, cell_order, plan
from bdguard.bench.results import COLUMNS, DETECTION_COLUMNS, failed_row, summarise_seeds, write_csv
from bdguard.config import to_dict
from bdguard.data import load_dataset
from bdguard.errors import BdguardError
from bdguard.io import read_json, run_lock, write_json
from bdguard.progress import grid_progress, log
from bdguard.runs.common import MODEL, environment
from bdguard.runs.repair import TEST_HOLDOUT
from bdguard.training.runtime import CHECKPOINT


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


def collect_rows(config: BenchConfig, steps: list[Step], out: Path, kind: str = "cell") -> list[dict]:
    """The rows of the cells (or, with kind="detect", the detections) finished or failed so far, in the grid's
    order."""
    rows = []
    for step in steps:
        if not (step.is_cell if kind == "cell" else step.kind == "detect"):
            continue
        folder = relative(step.folder, out)
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
    rows = collect_rows(config, steps, out)
    detections = collect_rows(config, steps, out, kind="detect")
    summary = summarise_seeds(rows)
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


def run_bench(
    config: BenchConfig, out: str | Path, quiet: bool = False, executor: ExecutorConfig | None = None
) -> dict[str, Any]:
    """Run every step of the grid of `config` not finished yet in `out`, and write out/results.csv,
    out/summary.csv and out/results.json; returns what results.json holds. `executor` says where the steps run
    (default: one after another in this process); the folders and tables are the same whichever runs them."""
    executor = executor or ExecutorConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BdguardError(f"--out {out} exists and is not a folder")
    if (out / CHECKPOINT).exists() or (out / MODEL).exists():
        raise BdguardError(f"{out} holds a training run: choose another --out for bench")
    if executor.kind == "ray":
        out = out.resolve()  # the workers may start elsewhere; the folder must be one they all see
    steps = plan(config, out)
    check_folders(steps)
    preflight(config)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):  # one bench per folder: no step runs twice at once
        write_settings(out / "suite.yaml", config)
        listing = [{"label": s.label, "folder": relative(s.folder, out), "commands": s.commands()} for s in steps]
        write_json(
            out / "bench.json",
            {
                "suite": config.name,
                "steps": listing,
                "rerun": f"bdguard bench --suite {out / 'suite.yaml'} --out {out}",
                "environment": environment(),
            },
        )
        done = sum(finished(step) for step in steps)
        if done:
            log(f"bench {config.name}: {done} of {len(steps)} steps already finished in {out}")
        with grid_progress(f"bench {config.name}", len(steps), done, quiet) as grid:

            def step_done(message: str) -> None:
                grid.finished(message)
                write_results(config, steps, out)

            run_steps(executor, steps, out, quiet, step_done)
        return write_results(config, steps, out)
