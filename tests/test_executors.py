"""The parallel executors when a worker dies under a step (killed, out of memory): the step runs again, from its
last checkpoint, and the bench ends with every step done as if nothing had happened."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bdguard
from bdguard.bench.results import read_csv
from bdguard.io import read_json

EPOCHS = 6  # long enough (about half a second each) to kill the `none` cell's worker in the middle of its training
BENCH = ["bench", "--suite", "smoke", "--attacks", "badnets", "--defenses", "none,linf-prune", "--detectors", ""]
BENCH += ["--set", f"train.epochs={EPOCHS}", "--set", "analyze=false", "--set", "gallery=false", "--quiet"]


def _processes(words: str, parent: int | None = None) -> list[int]:
    """The processes whose command line contains `words` (and whose parent is `parent`, if given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # it ended while we looked
        if words in command and (parent is None or ppid == parent):
            found.append(int(entry.name))
    return found


def _bench_killing_workers(out: Path, executor: list[str], workers) -> tuple[int, str]:
    """Run the bench in a child process, kill -9 the workers `workers(bench_pid)` lists once the `none` cell has
    a checkpoint, and return the bench's exit code and stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bdguard.__file__).parents[1]), *sys.path])}
    command = [sys.executable, "-m", "bdguard.cli.main", *BENCH, *executor, "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "cells/badnets/none/seed0/checkpoint.pt"
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the bench made no progress in 5 minutes"
            time.sleep(0.1)
        victims = workers(process.pid)
        assert victims, "no worker process found to kill"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = process.communicate(timeout=600)
    finally:
        process.kill()
        process.wait()
    return process.returncode, err


def _assert_every_step_done_once(out: Path) -> None:
    rows = read_csv(out / "results.csv")
    assert [(r["defense"], r["status"]) for r in rows] == [("none", "done"), ("linf-prune", "done")]
    cell = out / "cells/badnets/none/seed0"
    assert [row["epoch"] for row in _jsonl(cell / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    assert "resuming after epoch" in (cell / "log.txt").read_text()  # it went on from its checkpoint
    assert read_json(cell / "results.json")["epochs"] == EPOCHS


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_local_worker_killed_under_a_cell_is_replaced_and_the_cell_resumes(tmp_path):
    out = tmp_path / "local"
    code, err = _bench_killing_workers(
        out, ["--executor", "local", "--workers", "2"], lambda bench: _processes("spawn_main", parent=bench)
    )
    assert code == 0, err
    assert "its worker died; running it again (1 of 2)" in err
    _assert_every_step_done_once(out)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_ray_worker_killed_under_a_cell_is_retried_and_the_cell_resumes(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    code, err = _bench_killing_workers(
        out, ["--executor", "ray", "--workers", "2"], lambda bench: _processes("ray::run_in_worker")
    )
    assert code == 0, err
    _assert_every_step_done_once(out)


def test_a_ray_of_our_own_runs_its_workers_at_normal_priority(monkeypatch):
    """Ray's default niceness of 15 let any busy process on the machine starve the bench's cells (a Ray test took
    800 s beside two training runs, 110 s at niceness 0)."""
    ray = pytest.importorskip("ray")
    from bdguard.bench.executors import ExecutorConfig, RayPool

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pool = RayPool(ExecutorConfig(kind="ray", workers=1))
    try:
        niceness = ray.remote(lambda: os.nice(0))  # a lambda travels by value: the worker cannot import this file
        assert ray.get(niceness.remote()) == os.nice(0)
    finally:
        pool.close()
