"""Progress display: a rich bar with ETA on a terminal, nothing but the callers' log lines otherwise.

`progress_bar` is one loop's bar (an epoch, Neural Cleanse's steps, PGD's batches). `grid_progress` is a whole
grid's (`bdguard bench`): while it is open, every loop's bar appears under it on the same display and goes when
its loop ends; without a terminal, or when quiet, the grid says one plain line per finished step, with its ETA.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bdguard.distributed import environment_rank

_console = Console(stderr=True)
_live: Progress | None = None  # the grid's display, which loops' bars join while it is open


def number(value: float | None, digits: int = 3) -> str:
    """A figure for a log line: `digits` decimals, "-" when there is none (None or NaN)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _speaking() -> bool:
    """Under torchrun only the main rank prints (RANK is set before any process group exists)."""
    return environment_rank() == 0


def log(message: str) -> None:
    """One plain line on stderr (stdout is kept for results)."""
    if _speaking():
        print(message, file=sys.stderr, flush=True)


def showing_bars(quiet: bool) -> bool:
    """Whether bars are drawn: not when quiet, nor when stderr is no terminal (a log file, a pipe, CI), nor on the
    ranks of a torchrun job other than the main one."""
    return not quiet and _console.is_terminal and _speaking()


def _progress(transient: bool) -> Progress:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    return Progress(*columns, console=_console, transient=transient)


class _Bar:
    def __init__(self, progress: Progress | None = None, task: int | None = None) -> None:
        self.progress, self.task = progress, task

    def update(self, advance: int = 1, **fields: float) -> None:
        if self.progress is None:
            return
        if fields:
            info = "  ".join(f"{key} {value:.4g}" for key, value in fields.items())
            self.progress.update(self.task, advance=advance, info=info)
        else:
            self.progress.update(self.task, advance=advance)


@contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[_Bar]:
    """A bar over `total` steps on a terminal; a silent stand-in when quiet or when stderr is not a terminal."""
    if not showing_bars(quiet):
        yield _Bar()
        return
    if _live is not None:  # inside a grid: one more line on its display, removed when the loop ends
        task = _live.add_task(description, total=total, info="")
        try:
            yield _Bar(_live, task)
        finally:
            _live.remove_task(task)
        return
    with _progress(transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total, info=""))


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class GridProgress:
    """Counts a grid's steps; each finished step is one log line with the elapsed time and the ETA (the mean
    time of the steps run so far, times those left), and on a terminal also advances the grid's bar."""

    def __init__(self, total: int, done: int, progress: Progress | None = None, task: int | None = None) -> None:
        self.total, self.done = total, done
        self.progress, self.task = progress, task
        self.began = time.perf_counter()
        self.run_here = 0

    def finished(self, message: str) -> None:
        self.done += 1
        self.run_here += 1
        elapsed = time.perf_counter() - self.began
        left = self.total - self.done
        eta = f", eta {format_seconds(elapsed / self.run_here * left)}" if left else ""
        log(f"[{self.done}/{self.total}] {message}  (elapsed {format_seconds(elapsed)}{eta})")
        if self.progress is not None:
            self.progress.update(self.task, advance=1)


@contextmanager
def grid_progress(description: str, total: int, done: int = 0, quiet: bool = False) -> Iterator[GridProgress]:
    """The progress of a grid of `total` steps, `done` of which were finished before (a resumed grid)."""
    global _live
    if not showing_bars(quiet) or _live is not None:
        yield GridProgress(total, done)
        return
    with _progress(transient=False) as progress:
        task = progress.add_task(description, total=total, completed=done, info="")
        _live = progress
        try:
            yield GridProgress(total, done, progress, task)
        finally:
            _live = None
