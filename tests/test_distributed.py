"""`torchrun --nproc-per-node 2 -m bdguard train` on the CPU (gloo), plain and with V&B: the two ranks train like
one process (the same global batch and lr; BatchNorm's statistics are each rank's own), write through the main rank
alone, and a job that loses a rank, or is killed whole, resumes to exactly the weights of an uninterrupted job."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bdguard
from bdguard.io import read_json
from cli_helpers import assert_one_line_error, run_cli

EPOCHS = 4
TRAIN = ["train", "--dataset", "synthetic", "--attack", "badnets", "--model", "small-cnn", "--epochs", str(EPOCHS)]
TRAIN += ["--batch-size", "64", "--lr", "0.05", "--threads", "1", "--quiet"]
# V&B as tests/test_vab_e2e.py runs it: it removes this backdoor in 4 epochs
VAB = ["--defense", "vab", "--set", "defense.params.preset=smoke", "--set", "attack.params.patch_size=4"]
VAB += ["--set", "train.lr=0.1"]
# |BA| and |ASR| of a 2-rank run against the 1-process run: BatchNorm's statistics (and V&B's mixing partners)
# come from each rank's part of a batch
TOLERANCE = {"none": 0.03, "vab": 0.05}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    """The 2-rank job, with `extra` flags after TRAIN's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bdguard.__file__).parents[1]), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "bdguard", *TRAIN, *extra, "--out", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _bdguard_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bdguard:")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "two"
    code, printed, err = _finish(_torchrun(out))
    assert code == 0, err
    assert printed.count("BA ") == 1  # the main rank reports; the other is silent
    assert err.count(f"epoch {EPOCHS}/{EPOCHS}") == 1
    return out


def _rank_killed_when_checkpointed(out: Path, whole_job: bool, *extra: str) -> str:
    process = _torchrun(out, *extra)
    deadline = time.monotonic() + 300
    try:
        while not (out / "checkpoint.pt").exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint in 5 minutes"
            time.sleep(0.05)
        ranks = [
            int(pid)
            for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        ]
        assert len(ranks) == 2, ranks
        # the whole job: the launcher and both ranks (which run in sessions of their own); else one rank, which the
        # launcher must notice and stop the other
        for pid in [process.pid, *ranks] if whole_job else ranks[-1:]:
            os.kill(pid, signal.SIGKILL)
        code, _, err = _finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code != 0 and not (out / "model.safetensors").exists()
    return err


def _close_to_one_process(two: Path, one: Path, defense: str) -> None:
    results = read_json(two / "results.json"), read_json(one / "results.json")
    assert [r["environment"]["processes"] for r in results] == [2, 1]
    for key in ("ba", "asr"):
        assert abs(results[0][key] - results[1][key]) <= TOLERANCE[defense], (key, results)


def _same_weights(first: Path, second: Path) -> None:
    expected, resumed = _weights(first), _weights(second)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_two_ranks_train_like_one_process(two_ranks, tmp_path, capsys):
    code, _, err = run_cli(capsys, *TRAIN, "--out", str(tmp_path / "one"))
    assert code == 0, err
    results = read_json(two_ranks / "results.json")
    assert results["ba"] > 0.9 and results["asr"] > 0.9  # it learned both tasks
    _close_to_one_process(two_ranks, tmp_path / "one", "none")


def test_a_rank_that_dies_stops_the_job_with_one_line_and_the_job_resumes(two_ranks, tmp_path):
    out = tmp_path / "lost-rank"
    err = _rank_killed_when_checkpointed(out, whole_job=False)
    # the surviving rank either meets the dead one's absence in a collective or is stopped by the launcher first
    lines = _bdguard_lines(err)
    assert len(lines) == 1 and lines[0].endswith("finished files are kept (continue with --resume)"), err
    assert "bdguard/cli/main.py" not in err  # no traceback through bdguard's code
    code, _, err = _finish(_torchrun(out, "--resume"))
    assert code == 0, err
    assert "resuming after epoch" in err
    _same_weights(two_ranks, out)  # which also says that two 2-rank runs give the same weights


def test_vab_on_two_ranks_defends_like_one_process_and_resumes_exactly(tmp_path, capsys):
    """Both networks train data-parallel; the Victim's scoring and the label check are split over the ranks and
    gathered, so both ranks take the same split (a difference would hang or fail the job)."""
    two = tmp_path / "two"
    code, _, err = _finish(_torchrun(two, *VAB))
    assert code == 0, err
    results = read_json(two / "results.json")
    assert results["asr"] < 0.1 and results["ba"] > 0.75 and results["detector"]["tpr"] > 0.9, results
    assert (two / "victim.safetensors").exists() and (two / "suspicious.csv").exists()
    code, _, err = run_cli(capsys, *TRAIN, *VAB, "--out", str(tmp_path / "one"))
    assert code == 0, err
    _close_to_one_process(two, tmp_path / "one", "vab")

    killed = tmp_path / "killed"  # the whole job: the launcher and both ranks
    _rank_killed_when_checkpointed(killed, True, *VAB)
    code, _, err = _finish(_torchrun(killed, *VAB, "--resume"))
    assert code == 0, err
    _same_weights(two, killed)


def test_a_defense_that_does_not_train_data_parallel_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    """Refused from torchrun's environment alone, before any rank joins the others: rank 0 says why, the rest
    fail alike and say nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        code, _, err = run_cli(capsys, *TRAIN, "--defense", "abl", "--out", str(tmp_path / rank))
        if said:
            assert_one_line_error(code, err, "defense abl does not train data-parallel: run it without torchrun")
        else:
            assert code == 2 and err == ""


def test_commands_other_than_train_are_refused_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(capsys, "detect", "--dataset", "synthetic", "--detector", "spectral", "--out", str(tmp_path))
    assert_one_line_error(code, err, "only `bdguard train` runs under torchrun, not `bdguard detect`")
    monkeypatch.setenv("RANK", "1")  # the other ranks fail alike and say nothing
    code, _, err = run_cli(capsys, "detect", "--dataset", "synthetic", "--detector", "spectral", "--out", str(tmp_path))
    assert code == 2 and err == ""
