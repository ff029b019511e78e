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

from bdguard.errors import BdguardError

LOCK = ".lock"  # a run folder's lock file (run_lock)

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
    """Write through `writer` atomically; a full or read-only disk is bad input (one message), and the file that
    was there before stays as it was."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            writer(handle)
    except OSError as exc:
        raise BdguardError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextmanager
def run_lock(folder: str | Path):
    """Hold `folder` for this process: a second bdguard process that wants to write there is refused at once. The
    lock is the kernel's (flock on `folder/.lock`), so a process that dies, even by kill -9, never leaves it stuck.
    Holding it, the temporary files of writes that a killed process left behind (atomic_path's) are removed."""
    import fcntl  # POSIX only, like the rest of the run folder's guarantees

    path = Path(folder) / LOCK
    handle = open(path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BdguardError(
                f"{folder} is being written by another bdguard process ({holder}); wait for it to end, or choose "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        for stale in Path(folder).glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        handle.close()  # closing releases the lock


def check_writable(folder: str | Path) -> None:
    """Create `folder` if needed and prove a file can be written there, before any work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BdguardError(f"cannot write to {folder}: {exc.strerror or exc}") from None


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


def write_array(path: str | Path, array: Any) -> None:
    """A tensor or array as .npy (no pickles, so `np.load(allow_pickle=False)` reads it), atomically."""
    # imported here: numpy is not needed by the rest of this module
    import numpy as np

    values = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    write_with(path, lambda handle: np.save(handle, values, allow_pickle=False))
