"""One step of the grid, run to its folder: what every executor (serial, local processes, Ray) calls.

A step runs through the same functions as the commands (`run_train`, `run_repair`, `run_poison`, `run_detect`,
`run_analyze`), so its folder is exactly what its command would write. It ends with cell.json (finished) or
error.txt (failed: one failed step must not cost the rest of a long grid); a killed training step continues from
its last epoch's checkpoint when it runs again, and a repair or analysis starts again (minutes, not hours).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from bdguard.bench.grid import DONE, POISON_STORE, SETTINGS, Step
from bdguard.bench.results import cell_row, detection_row
from bdguard.config import to_dict
from bdguard.errors import BdguardError
from bdguard.io import read_json, write_json, write_text
from bdguard.results import DetectionResult, RunResult
from bdguard.runs.common import MODEL, RESULTS, environment
from bdguard.runs.detect import run_detect
from bdguard.runs.poison import run_poison
from bdguard.runs.repair import run_repair
from bdguard.runs.train import run_train

ERROR = "error.txt"
LOG = "log.txt"  # a step's log lines when it runs in a worker process (local or Ray)


def write_settings(path: Path, config: Any) -> None:
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def finished(step: Step) -> bool:
    if not (step.folder / DONE).exists():
        return False
    return step.analysis is None or (step.folder / "analysis" / "analysis.json").exists()


def prerequisite(step: Step, steps: list[Step]) -> Step | None:
    """The step whose model `step` reads (a repair's or a model-based detection's `none` cell), if any."""
    if step.source is None:
        return None
    return next(s for s in steps if s.kind == "train" and s.folder / MODEL == step.source)


def relative(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def execute(step: Step, out: Path, quiet: bool) -> tuple[bool, str]:
    """Run `step` to its cell.json, or to error.txt when it fails; (finished, the line to log)."""
    began = time.perf_counter()
    (step.folder / ERROR).unlink(missing_ok=True)
    try:
        results = _run_step(step, out, quiet)
    except Exception as exc:
        record_failure(step, f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        return False, f"{step.label}: FAILED ({type(exc).__name__}: {exc}); see {step.folder / ERROR}"
    record: dict[str, Any] = {
        "kind": step.kind,
        "attack": step.attack,
        "defense": step.defense,
        "seed": step.seed,
        "fingerprint": step.fingerprint,
        "commands": step.commands(),
        "seconds": round(time.perf_counter() - began, 2),
        "environment": environment(),
    }
    folder = relative(step.folder, out)
    where = str(step.folder / RESULTS)
    if step.is_cell:
        record["row"] = cell_row(step.attack, step.defense, step.seed, RunResult.from_json(results, where), folder)
    elif step.kind == "detect":
        detection = DetectionResult.from_json(results, where)
        record["row"] = detection_row(step.attack, step.defense, step.seed, detection, folder)
    write_json(step.folder / DONE, record)
    return True, _message(step, results)


def record_failure(step: Step, text: str) -> None:
    step.folder.mkdir(parents=True, exist_ok=True)
    write_text(step.folder / ERROR, text.rstrip("\n") + "\n")


def _run_step(step: Step, out: Path, quiet: bool) -> dict[str, Any]:
    """Run one step (its missing parts) and return its results."""
    store = out / POISON_STORE
    step.folder.mkdir(parents=True, exist_ok=True)
    write_settings(step.folder / SETTINGS, step.config)
    if step.kind == "poison":
        return run_poison(step.config, step.folder, quiet=quiet, poison_store=store)
    if step.kind == "detect":
        if step.source is not None and not step.source.exists():
            raise BdguardError(f"the model it inspects, {step.source}, is missing: its `none` cell did not finish")
        return run_detect(step.config, step.folder, step.source, quiet=quiet, poison_store=store)
    results_file = step.folder / RESULTS
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
        write_settings(folder / SETTINGS, step.analysis)
        run_analyze(step.analysis, step.folder / MODEL, folder, quiet=quiet)
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
