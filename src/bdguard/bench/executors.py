"""Where the bench's steps run: one after another in this process (`serial`), in N local processes (`local`), or
as Ray tasks on a cluster (`ray`). All three run `execute` on the same folders, so the tables do not depend on the
executor; the parallel ones start a step once the model it reads exists, and run a step whose worker died again
(from its last checkpoint).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bdguard.bench.execute import LOG, execute, finished, prerequisite, record_failure
from bdguard.bench.grid import Step
from bdguard.config import check_range
from bdguard.errors import BdguardError
from bdguard.progress import log

# passed on to Ray's workers, which may run on other machines with other environments
PASSED_ENVIRONMENT = ("BDGUARD_DATA", "BDGUARD_CACHE")


@dataclass
class ExecutorConfig:
    kind: Literal["serial", "local", "ray"] = "serial"
    # steps at once; local: default 2; ray: default as many as the cluster's free resources allow
    workers: int | None = None
    address: str | None = None  # ray: the cluster's address; None: $RAY_ADDRESS, else a Ray started on this machine
    cell_cpus: float = 1.0  # ray: CPUs each step asks for (and its torch threads)
    cell_gpus: float = 0.0  # ray: GPUs each step asks for
    retries: int = 2  # times a step whose worker died runs again

    def __post_init__(self) -> None:
        if self.kind not in ("serial", "local", "ray"):
            raise BdguardError(f"unknown executor {self.kind!r}; use serial, local or ray")
        if self.kind == "serial" and self.workers is not None:
            raise BdguardError("--workers needs --executor local or ray")
        if self.kind != "ray" and (self.address is not None or self.cell_cpus != 1.0 or self.cell_gpus != 0.0):
            raise BdguardError("--address, --cell-cpus and --cell-gpus need --executor ray")
        if self.workers is not None:
            check_range("workers", self.workers, 1)
        check_range("cell_cpus", self.cell_cpus, 0.01)
        check_range("cell_gpus", self.cell_gpus, 0.0)
        check_range("retries", self.retries, 0)


def run_steps(executor: ExecutorConfig, steps: list[Step], out: Path, quiet: bool, done: Callable[[str], None]) -> None:
    """Run every unfinished step of `steps`, calling `done(line)` as each one ends (finished or failed)."""
    if executor.kind == "serial":
        for step in steps:
            if not finished(step):
                _, message = execute(step, out, quiet)
                done(message)
        return
    pool = LocalPool(executor.workers or 2) if executor.kind == "local" else RayPool(executor)
    try:
        _schedule(steps, out, pool, executor.retries, done)
    finally:
        pool.close()


def run_in_worker(step: Step, out: Path, threads: int, cwd: str) -> tuple[bool, str]:
    """`execute` in a worker process: torch's threads set to its share, relative paths read from the directory
    the bench was started in, and the step's log lines in its own folder."""
    import torch

    torch.set_num_threads(threads)
    if Path(cwd).is_dir():  # on another machine it may not be; the paths must then be absolute
        os.chdir(cwd)
    step.folder.mkdir(parents=True, exist_ok=True)
    with open(step.folder / LOG, "a") as handle, redirect_stdout(handle), redirect_stderr(handle):
        return execute(step, out, quiet=True)


class LocalPool:
    """N fresh interpreters on this machine (spawned: no forked torch or progress state)."""

    def __init__(self, workers: int) -> None:
        self.slots = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.generation = 0
        self._pool = None

    def submit(self, step: Step, out: Path) -> Future:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.slots, mp_context=get_context("spawn"))
        future = self._pool.submit(run_in_worker, step, out, self.threads, os.getcwd())
        future.generation = self.generation
        return future

    def died(self, future: Future, exc: BaseException) -> bool:
        """Whether `exc` says the worker died (killed, out of memory); a dead worker breaks the whole pool, which is
        replaced once."""
        from concurrent.futures.process import BrokenProcessPool

        if not isinstance(exc, BrokenProcessPool):
            return False
        if future.generation == self.generation and self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self.generation += 1
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class RayPool:
    """Ray tasks with the resources each step asks for; Ray itself runs a task again when its worker dies."""

    def __init__(self, executor: ExecutorConfig) -> None:
        try:
            import ray
        except ImportError:
            raise BdguardError("--executor ray needs Ray: pip install 'bdguard[ray]'") from None
        self.ray = ray
        env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if os.environ.get(name)}
        where = executor.address or os.environ.get("RAY_ADDRESS")
        options: dict[str, Any] = {
            # "local": a Ray of our own, even where `ray start` runs one on this machine (a plain init would join it)
            "address": where or "local",
            "runtime_env": {"env_vars": env} if env else None,
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,  # each step's lines are in its folder's log.txt
        }
        if not where and executor.workers is not None:
            options["num_cpus"] = executor.workers * executor.cell_cpus  # a Ray of our own: as large as asked
        if not where:
            # Ray runs its workers at niceness 15 unless told otherwise; the cells are this machine's work, and at 15
            # any other busy process (a second bench, a training run) starved them to a tenth of a core
            os.environ.setdefault("RAY_worker_niceness", "0")
        if where:
            _check_reachable(where)
        try:
            ray.init(**options)
        except ConnectionError as exc:
            raise BdguardError(f"cannot reach the Ray cluster at {where}: {exc}") from None
        self.slots = executor.workers or 1_000_000  # Ray queues what the resources do not allow yet
        self.threads = max(1, int(executor.cell_cpus))
        self.task = ray.remote(run_in_worker).options(
            num_cpus=executor.cell_cpus, num_gpus=executor.cell_gpus, max_retries=executor.retries
        )

    def submit(self, step: Step, out: Path) -> Future:
        return self.task.remote(step, out, self.threads, os.getcwd()).future()

    def died(self, future: Future, exc: BaseException) -> bool:
        return False  # Ray has already run it again as often as asked

    def close(self) -> None:
        self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT nobody answers on at once: Ray itself would retry it for minutes. Other forms ("auto",
    "ray://...") are left to Ray."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or "/" in host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise BdguardError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _schedule(steps: list[Step], out: Path, pool, retries: int, done: Callable[[str], None]) -> None:
    """The unfinished steps on `pool`, each as soon as the model it reads exists and a slot is free; the steps
    that read the model of a failed cell fail with that reason."""
    waiting = [step for step in steps if not finished(step)]
    running: dict[Future, Step] = {}
    failed: set[Path] = set()
    attempts: Counter[Path] = Counter()
    while waiting or running:
        for step in list(waiting):
            before = prerequisite(step, steps)
            if before is not None and before.folder in failed:
                waiting.remove(step)
                failed.add(step.folder)
                record_failure(step, f"BdguardError: its model's cell ({before.label}) failed")
                done(f"{step.label}: FAILED (its model's cell, {before.label}, failed)")
            elif len(running) < pool.slots and (before is None or finished(before)):
                waiting.remove(step)
                running[pool.submit(step, out)] = step
        if not running:
            if waiting:  # every waiting step reads a model no step makes: a bug in the grid
                raise RuntimeError(f"bench: {len(waiting)} steps wait for models no step makes")
            return
        complete, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in complete:
            step = running.pop(future)
            try:
                ok, message = future.result()
            except Exception as exc:
                if pool.died(future, exc) and attempts[step.folder] < retries:
                    attempts[step.folder] += 1
                    log(f"{step.label}: its worker died; running it again ({attempts[step.folder]} of {retries})")
                    waiting.insert(0, step)
                    continue
                reason = f"its worker died or could not run it: {type(exc).__name__}: {exc}"
                record_failure(step, reason)
                ok, message = False, f"{step.label}: FAILED ({reason.splitlines()[0]})"
            if not ok:
                failed.add(step.folder)
            done(message)
