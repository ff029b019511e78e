"""What the report reads, and how: only regular files inside the folders it is given.

A run folder may come from someone else. A link in it (`curve.png -> /etc/passwd`) must not carry a file from
outside into a page that is then mailed around, a FIFO must not hang the report, and a damaged record must cost
its own figure or row, not the whole report. Every read of `bdguard.reporting` goes through these functions.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from bdguard.progress import log


def _resolved_inside(root: Path, path: Path) -> Path | None:
    try:
        real = path.resolve(strict=True)
        real.relative_to(root.resolve(strict=True))
    except (OSError, RuntimeError, ValueError):  # missing, a link loop, or outside `root`
        return None
    return real


def regular_file(root: Path, path: Path) -> Path | None:
    """`path` (a link is followed only while it stays inside `root`) if it is a regular file inside `root`."""
    real = _resolved_inside(root, path)
    try:
        return real if real is not None and stat.S_ISREG(real.stat().st_mode) else None
    except OSError:
        return None


def folder_inside(root: Path, path: Path) -> Path | None:
    """`path` if it is a folder inside `root` (or `root` itself)."""
    real = _resolved_inside(root, path)
    return real if real is not None and real.is_dir() else None


def read_bytes(root: Path, path: Path) -> bytes | None:
    """The bytes of a regular file inside `root`; None (with a warning when it exists) otherwise."""
    real = regular_file(root, path)
    if real is None:
        if path.is_symlink() or path.exists():
            log(f"warning: {path} is not a regular file inside {root}; left out of the report")
        return None
    try:
        return real.read_bytes()
    except OSError as exc:
        log(f"warning: cannot read {path} ({exc.strerror or exc}); left out of the report")
        return None


def read_json_file(root: Path, path: Path) -> Any:
    """A JSON file inside `root`, or None (with a warning) when it is missing, not a regular file or damaged."""
    data = read_bytes(root, path)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        log(f"warning: {path} is not readable JSON ({exc}); left out of the report")
        return None


def read_json_dict(root: Path, path: Path) -> dict[str, Any]:
    """A JSON object file inside `root`; {} when it is anything else (a warning says why)."""
    data = read_json_file(root, path)
    if data is not None and not isinstance(data, dict):
        log(f"warning: {path} holds no JSON object; left out of the report")
    return data if isinstance(data, dict) else {}


def read_jsonl(root: Path, path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a file inside `root`; lines that are not one (damaged, not UTF-8) are skipped."""
    data = read_bytes(root, path)
    if data is None:
        return []
    rows, skipped = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    if skipped:
        log(f"warning: {path}: {skipped} line(s) that are not JSON objects skipped")
    return rows


def pngs(folder: Path) -> list[Path]:
    """The regular `*.png` files of `folder` itself (links that stay inside it included), sorted by name; a warning
    names each one left out."""
    try:
        paths = sorted(child for child in folder.iterdir() if child.name.endswith(".png"))
    except OSError:
        return []
    kept = [path for path in paths if regular_file(folder, path) is not None]
    for path in sorted(set(paths) - set(kept)):
        log(f"warning: {path} is not a regular file inside {folder}; left out of the report")
    return kept
