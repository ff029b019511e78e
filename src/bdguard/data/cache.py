"""Decoded arrays on disk: one folder per source identity, .npy files plus meta.json, memory-mapped on read.

Layout: <cache_dir>/<name>-<sha1(identity)[:16]>/{<array>.npy, meta.json}. meta.json is written last and lists
every array's shape and dtype, so an entry whose writer died half-way, or whose files were truncated or swapped,
fails validation and is rebuilt instead of trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bdguard.errors import BdguardError
from bdguard.io import write_with

FORMAT = 2  # bump when the layout or the decoding changes, so old entries are ignored
META = "meta.json"


def entry_dir(cache_dir: Path, name: str, identity: str) -> Path:
    digest = hashlib.sha1(f"{FORMAT}\n{identity}".encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{digest}"


def load_entry(entry: Path, identity: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays and metadata, or None when the entry is missing, foreign or damaged."""
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("format") != FORMAT or meta.get("identity") != identity:
            return None
        arrays = {}
        for key, spec in meta["arrays"].items():
            # Copy-on-write mapping: lazy like mode "r", but writable in this process only, so tensors built on
            # it accept in-place edits instead of crashing on a read-only page; the file itself never changes.
            array = np.load(entry / f"{key}.npy", mmap_mode="c", allow_pickle=False)
            if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                return None
            arrays[key] = array
        return arrays, meta
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


@contextlib.contextmanager
def building(entry: Path) -> Iterator[None]:
    """Hold the right to build `entry`. Two processes that miss it at once (a bench's workers, two runs) would
    otherwise unlink each other's half-written files; the second waits here, then finds the first's entry. The lock
    is the kernel's (flock on a file beside the entry), so a builder killed by kill -9 never leaves it held."""
    import fcntl  # POSIX only, like the run folders' lock

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.parent / f".{entry.name}.lock", "a")  # noqa: SIM115 (held open for the lock's lifetime)
    except OSError as exc:
        raise BdguardError(f"cannot write the data cache in {entry.parent}: {exc.strerror or exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def save_entry(entry: Path, identity: str, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write the arrays, then meta.json (identity, shapes, dtypes and `info`), each file atomically."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        # An entry being rebuilt must not look valid while its arrays are half replaced; the temporary files of an
        # earlier build that was killed mid-write go with it.
        with contextlib.suppress(FileNotFoundError):
            (entry / META).unlink()
        for stale in entry.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        for key, array in arrays.items():
            write_with(entry / f"{key}.npy", lambda f, a=array: np.save(f, np.ascontiguousarray(a)))
        meta = {
            "format": FORMAT,
            "identity": identity,
            "arrays": {key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in arrays.items()},
            **info,
        }
        write_with(entry / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as exc:
        raise BdguardError(f"cannot write the data cache in {entry}: {exc.strerror or exc}") from None
