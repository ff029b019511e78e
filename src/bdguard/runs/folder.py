"""A run folder belongs to one command of one kind, one process writes it at a time, and a refused command changes
nothing in it (docs/design.md, "Files and trust").

Every command that writes a folder enters it through `run_folder`: the checks below run before anything is
written (and again once the lock is held), then the folder's lock is taken for the whole command. The folder's
`config.json` records the command and the settings; a later command into it must be the same
command with the same settings (a retry, or `train --resume`), or it is refused with the settings that differ.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bdguard.errors import BdguardError
from bdguard.io import LOCK, check_writable, run_lock, write_json
from bdguard.runs.common import MODEL, RESULTS, environment
from bdguard.training.runtime import CHECKPOINT

CONFIG = "config.json"
NAMES = {  # what a folder of each command holds, in messages
    "train": "a training run",
    "evaluate": "an evaluation",
    "poison": "a poisoned set",
    "repair": "a repair",
    "analyze": "an analysis",
    "detect": "a detection",
    "bench": "a bench",
}
VOLATILE = ("device", "threads")  # train settings a resumed or retried run may change


def _record(path: Path) -> dict[str, Any]:
    """A JSON object file of the folder; {} for anything else (missing, not a regular file, damaged)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_kind(out: Path) -> str | None:
    """The command whose folder `out` is (config.json's `command`), or, for a folder of an earlier version of
    bdguard, the command its files show; None for a folder bdguard has not written."""
    config = _record(out / CONFIG)
    if isinstance(config.get("command"), str):
        return config["command"]
    results = _record(out / RESULTS)
    for key, kind in (("cells", "bench"), ("detector", "detect"), ("before", "repair"), ("model_path", "evaluate")):
        if key in results:
            return kind
    for name, kind in (("manifest.json", "poison"), ("analysis.json", "analyze"), ("model", "repair")):
        if (out / name).exists() or name in config:
            return kind
    if (out / CHECKPOINT).exists() or (out / MODEL).exists() or config or results:
        return "train"
    return None


def recorded_config(out: Path) -> dict[str, Any]:
    """The settings config.json records for the run in `out` ({} when there are none): what `--resume` alone
    continues with."""
    config = _record(out / CONFIG).get("config")
    return config if isinstance(config, dict) else {}


def settings_of(config: Mapping[str, Any], model: Any = None) -> dict[str, Any]:
    """What a folder's settings are compared by: the config less VOLATILE, plus the model the command read."""
    settings = json.loads(json.dumps(dict(config), default=str))  # as config.json holds it: tuples are lists
    train = settings.get("train")
    if isinstance(train, dict):
        settings["train"] = {key: value for key, value in train.items() if key not in VOLATILE}
    return settings if model is None else {**settings, "model": str(model)}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differing(old: Mapping[str, Any], new: Mapping[str, Any], shown: int = 4) -> str:
    """The settings that differ, as `key: old -> new`, at most `shown` of them."""
    before, after = _flat(old), _flat(new)
    keys = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    text = ", ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def claim(out: Path, kind: str, config: Mapping[str, Any], model: Any = None, resume: bool = False) -> None:
    """Refuse `out` unless it can be the folder of this `kind` run of `config` (on `model`); reads only."""
    if out.exists() and not out.is_dir():
        raise BdguardError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return
    existing = folder_kind(out)
    if existing is None:
        return
    if existing != kind:
        raise BdguardError(f"{out} holds {NAMES.get(existing, existing)}: choose another --out for {kind}")
    if kind == "train" and not resume and (out / CHECKPOINT).exists():
        raise BdguardError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    recorded = _record(out / CONFIG)
    if not isinstance(recorded.get("config"), dict):
        return  # a folder with no settings recorded yet: nothing to compare
    old, settings = settings_of(recorded["config"], recorded.get("model")), settings_of(config, model)
    if old != settings:
        what = "cannot resume" if resume else f"{out} holds {NAMES[kind]} of other settings"
        raise BdguardError(
            f"{what}: {differing(old, settings)}; choose another --out"
            + (", or resume with the run's own settings (--resume alone reads them)" if kind == "train" else "")
        )


@contextmanager
def run_folder(
    out: str | Path, kind: str, config: Mapping[str, Any], model: Any = None, resume: bool = False
) -> Iterator[Path]:
    """Claim `out` for `kind` (refused before anything is written), create it, hold its lock and record the command
    and its settings (config.json). A folder this call created is removed again when the command fails before
    writing anything else into it."""
    out = Path(out)
    claim(out, kind, config, model, resume)
    created = not out.exists()
    check_writable(out)
    try:
        with run_lock(out):
            claim(out, kind, config, model, resume)  # another process may have written it since the first check
            write_config(out, kind, config, model)
            yield out
    except BaseException:
        if created and {path.name for path in out.iterdir()} <= {LOCK, CONFIG}:
            shutil.rmtree(out)
        raise


def write_config(out: Path, kind: str, config: Mapping[str, Any], model: Any = None) -> None:
    """config.json: the command, its settings, the model it read and the environment."""
    record = {"command": kind, "config": dict(config), **({} if model is None else {"model": str(model)})}
    write_json(out / CONFIG, {**record, "environment": environment()})
