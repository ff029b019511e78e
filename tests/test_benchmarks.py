"""The benchmark scripts run at HEAD: nothing else executes them, and a script that no longer runs is only found
when someone needs its figures (benchmarks/throughput.py broke that way once)."""

import json
import subprocess
import sys
from pathlib import Path

from bdguard.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def _script(name, *argv):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_throughput_runs_and_reports_its_figures():
    figures = json.loads(_script("throughput.py", "--dataset", "synthetic", "--model", "small-cnn", "--threads", "1"))
    assert figures["images_per_second"] > 0 and 0 < figures["data_pipeline_share"] < 1


def test_collect_reads_a_folder_of_runs(tmp_path):
    argv = ["train", "--dataset", "synthetic", "--arch", "small-cnn", "--epochs", "1", "--threads", "1", "--quiet"]
    for defense in ("none", "vab"):
        extra = ["--set", "vab.victim_min_steps=0"] if defense == "vab" else []
        assert main([*argv, "--defense", defense, *extra, "--out", str(tmp_path / defense)]) == 0
    table = _script("collect.py", "--ratio", str(tmp_path))
    assert "none" in table and "vab" in table
