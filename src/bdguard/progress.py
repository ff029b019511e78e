"""Progress display: a rich bar with ETA on a terminal, nothing but the callers' log lines otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def log(message: str) -> None:
    """One plain line on stderr (stdout is kept for results)."""
    print(message, file=sys.stderr, flush=True)


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
def progress_bar(description: str, total: int, quiet: bool = False):
    """A bar over `total` steps on a terminal; a silent stand-in when quiet or when stderr is not a terminal."""
    if quiet or not _console.is_terminal:
        yield _Bar()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=_console, transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total, info=""))
