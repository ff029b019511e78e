"""Atomic file writes: a reader (or an interrupted run) never sees half a file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after the write: mkstemp, and writers that replace the file themselves (safetensors), make it private;
        # every output is meant to be shared like any file the user writes
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_with(path: str | Path, writer: Callable[[BinaryIO], None]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer(handle)


def write_text(path: str | Path, text: str) -> None:
    write_with(path, lambda handle: handle.write(text.encode()))


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, which strict JSON readers accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON: a value that is not a finite number is written as null."""
    write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite a JSON-lines file whole, so its lines always match a finished state; strict JSON as write_json."""
    write_text(path, "".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in rows))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
