"""The benchmark scripts run at HEAD: nothing else executes them, and a script that no longer runs is only found
when someone needs its figures (benchmarks/throughput.py and plot_prune.py broke that way). Each runs in its tiny
setting, on the synthetic set with one thread and into tmp_path: SMOKE=1 for the shell scripts (see each one's
usage comment), small arguments for the Python ones.

A shell script runs for real with shims in front of `bdguard`, `python` and `torchrun` that write down each command
line; the commands are then run as written, in the order written, in this process (`torchrun` as itself, for its
ranks): the same work without a Python and torch start-up per command, which was most of their time. Run again, a
script whose runs all finished must skip each of them and start nothing."""

import csv
import io
import json
import os
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from bdguard.cli.main import main
from cli_helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # this interpreter's `bdguard`, `python` and `torchrun`
SHIM = """#!/usr/bin/env bash
# a command of a benchmark script, written down for tests/test_benchmarks.py to run
printf '%q ' "$(basename "$0")" "$@" >> "$BENCHMARK_COMMANDS"
echo >> "$BENCHMARK_COMMANDS"
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shims")
    for program in ("bdguard", "python", "torchrun"):
        (folder / program).write_text(SHIM)
        (folder / program).chmod(0o755)
    return folder


def _script(name: str, *argv: str) -> str:
    """benchmarks/NAME (or a script path) run as `python NAME ARGV...`: what it printed."""
    code, printed = run_python(Path(name) if "/" in name else ROOT / "benchmarks" / name, *argv)
    assert code in (0, None), code
    return printed


def _run(command: list[str]) -> str:
    """One written-down command, as the script would have run it: what it printed."""
    program, *argv = command
    if program == "torchrun":
        done = subprocess.run([str(BIN / "torchrun"), *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-5000:]
        return done.stdout
    if program == "python":
        return _script(*argv)
    assert program == "bdguard", command
    printed = io.StringIO()
    with redirect_stdout(printed), redirect_stderr(io.StringIO()):
        code = main(argv)
    assert code == 0, command
    return printed.getvalue()


def _smoke(shims: Path, name: str, *argv: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """benchmarks/NAME ARGV... with SMOKE=1 and `env`, from the repository root as its usage says, its commands
    written down: (the script's run, its commands)."""
    commands = shims / "commands"
    commands.unlink(missing_ok=True)
    path = os.pathsep.join([str(shims), str(BIN), os.environ.get("PATH", "")])
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / name), *argv],
        cwd=ROOT,
        env={**os.environ, "PATH": path, "SMOKE": "1", "BENCHMARK_COMMANDS": str(commands), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    lines = commands.read_text().splitlines() if commands.exists() else []
    return done, [shlex.split(line) for line in lines]


def _smoke_run(shims: Path, name: str, *argv: str, **env: str) -> list[str]:
    """The script's commands run: what each printed."""
    _, commands = _smoke(shims, name, *argv, **env)
    assert commands, f"{name} wrote down no command"
    here = Path.cwd()
    os.chdir(ROOT)  # the scripts' relative paths (benchmarks/..., runs/...) are the repository root's
    try:
        return [_run(command) for command in commands]
    finally:
        os.chdir(here)


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _rows(table: str) -> dict[str, list[str]]:
    """A markdown table's rows by their first cell."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line[:1] == "|"]
    return {row[0]: row[1:] for row in rows[2:]}


CIFAR_CELLS = {  # folder: (attack, defense), in the queue's order
    "attacks": {
        **{f"{attack}-none": (attack, "none") for attack in ("badnets", "blended", "wanet", "sig")},
        "clean": ("none", "none"),
        **{f"{attack}-none": (attack, "none") for attack in ("trojan", "lc", "iad")},
    },
    "vab": {f"{attack}-vab": (attack, "vab") for attack in ("badnets", "blended", "wanet", "sig")},
}


@pytest.mark.parametrize("queue", CIFAR_CELLS)
def test_cifar_cpu_trains_every_cell_of_a_queue_and_skips_them_once_finished(shims, tmp_path, queue):
    _smoke_run(shims, "cifar_cpu.sh", queue, OUT=str(tmp_path))
    cells = CIFAR_CELLS[queue]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(cells)
    for name, (attack, defense) in cells.items():
        results = _results(tmp_path / name)
        assert (results["dataset"], results["attack"], results["defense"]) == ("synthetic", attack, defense)
        assert results["epochs"] == 1
    again, commands = _smoke(shims, "cifar_cpu.sh", queue, OUT=str(tmp_path))
    assert again.stdout.splitlines() == [f"skip {name} (finished)" for name in cells] and not commands


def test_foundation_reports_two_throughputs_and_trains_badnets(shims, tmp_path):
    printed = "".join(_smoke_run(shims, "foundation.sh", OUT=str(tmp_path)))
    decoder, reports, at = json.JSONDecoder(), [], printed.find("{")
    while at >= 0:  # the two throughput reports, then train's summary line
        report, end = decoder.raw_decode(printed, at)
        reports.append(report)
        at = printed.find("{", end)
    assert len(reports) == 2 and all(report["images_per_second"] > 0 for report in reports)
    assert all(0 < report["data_pipeline_share"] < 1 for report in reports)
    results = _results(tmp_path / "bench-badnets-small-cnn")
    assert (results["dataset"], results["attack"], results["target"]) == ("synthetic", "badnets", 0)


PRUNINGS = {  # folder (after badnets-): (defense, trigger), as collect.py --prune prints them
    "linf-prune-oracle": ("linf-prune", "oracle"),
    "l2-prune-oracle": ("l2-prune", "oracle"),
    "l1-prune-oracle": ("l1-prune", "oracle"),
    "linf-prune-reverse": ("linf-prune", "reverse"),
    "random-prune": ("random-prune", "none"),
    "fine-pruning": ("fine-pruning", "none"),
    "clp": ("clp", "—"),
    "neural-cleanse": ("neural-cleanse", "—"),
}


@pytest.fixture(scope="module")
def pruned(shims, tmp_path_factory) -> Path:
    """prune_cpu.sh's gtsrb setting, which trains its own model first: RUNS."""
    runs = tmp_path_factory.mktemp("prune")
    _smoke_run(shims, "prune_cpu.sh", "gtsrb", "1", RUNS=str(runs))
    return runs


def test_prune_cpu_runs_every_pruning_defense(shims, pruned):
    assert _results(pruned / "gtsrb-cpu" / "badnets-none")["model"] == "alexnet"
    folder = pruned / "gtsrb-cpu-prune"
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"badnets-{name}" for name in PRUNINGS)
    rows = _rows(_script("collect.py", "--prune", str(folder)))
    for name, (defense, trigger) in PRUNINGS.items():
        row = rows[f"badnets-{name}"]
        assert row[:2] == [defense, trigger]
        assert row[2].isdigit() == (trigger != "—")  # k, for the defenses that rank channels
    again, commands = _smoke(shims, "prune_cpu.sh", "gtsrb", "1", RUNS=str(pruned))
    assert again.stdout.splitlines() == [f"skip badnets-{name} (finished)" for name in PRUNINGS] and not commands


def test_plot_prune_draws_the_curves_of_a_pruned_model(pruned, tmp_path):
    folder, figure = pruned / "gtsrb-cpu-prune", tmp_path / "figures" / "prune.png"
    _script("plot_prune.py", str(folder), "badnets", str(figure))
    assert figure.read_bytes().startswith(b"\x89PNG")
    # ... and it is refused, not drawn empty, where no curve was read
    code, _ = run_python(ROOT / "benchmarks" / "plot_prune.py", str(folder), "wanet", str(tmp_path / "x.png"))
    assert "no pruning curves of wanet" in str(code) and not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_scale_out_runs_the_executors_and_torchrun(shims, tmp_path):
    """The smoke's four commands (the Ray bench and V&B on two ranks run in test_bench and test_distributed)."""
    out = tmp_path / "scale-out"
    assert len(_smoke_run(shims, "scale_out.sh", OUT=str(out))) == 4
    tables = []
    for executor in ("serial", "local2"):
        with open(out / f"smoke-{executor}" / "results.csv", newline="") as handle:
            tables.append([(row["attack"], row["defense"], row["status"], row["ba"]) for row in csv.DictReader(handle)])
    assert tables[0] == tables[1] and [row[:3] for row in tables[0]] == [("badnets", "none", "done")]
    for run, processes in (("none-1proc", 1), ("none-2ranks", 2)):
        results = _results(out / run)
        assert results["defense"] == "none" and results["environment"]["processes"] == processes


@pytest.fixture(scope="module")
def ablation(shims, tmp_path_factory) -> Path:
    """vab_ablation.sh's `none` and `default` variants: the folder of the cell."""
    out = tmp_path_factory.mktemp("ablation")
    _smoke_run(shims, "vab_ablation.sh", "fmnist", "badnets", "none", "default", OUT=str(out))
    return out / "fmnist-badnets"


def test_vab_ablation_runs_the_variants_named(ablation):
    """... and collect.py tables a folder of runs: their time ratio to `none`, V&B's seconds by stage."""
    assert sorted(path.name for path in ablation.iterdir()) == ["default", "none"]
    assert _results(ablation / "none")["defense"] == "none" and _results(ablation / "default")["defense"] == "vab"
    rows = _rows(_script("collect.py", "--ratio", str(ablation)))
    assert rows["none"][6] == "1.00" and rows["default"][7] != "—"


def test_trigger_flips_splits_the_asr_of_each_run(ablation):
    runs = [ablation / "none", ablation / "default"]
    rows = _rows(_script("trigger_flips.py", *map(str, runs), "--device", "cpu", "--threads", "1"))
    assert set(rows) == set(map(str, runs))
    for run in runs:
        asr, _, flipped = (float(cell) for cell in rows[str(run)])
        assert asr == pytest.approx(100 * _results(run)["asr"], abs=0.006) and flipped <= asr
