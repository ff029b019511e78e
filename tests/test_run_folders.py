"""A run folder belongs to one command of one kind, one process writes it at a time and a refused command changes
nothing on disk (runs/folder.py; docs/design.md, "Files and trust")."""

import json

import numpy as np
import pytest

from bdguard.cli.main import main
from bdguard.io import run_lock
from cli_helpers import assert_one_line_error, run_cli

TRAIN = ["train", "--dataset", "synthetic", "--attack", "badnets", "--model", "small-cnn", "--threads", "1", "--quiet"]
REPAIR = ["repair", "--dataset", "synthetic", "--probe-size", "200", "--threads", "1", "--quiet"]
DETECT = ["detect", "--dataset", "synthetic", "--attack", "badnets", "--detector", "spectral", "--quiet"]


def _files(folder):
    """Every file of the folder and its bytes (the lock's content, a pid, left out)."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.name != ".lock"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    assert main([*TRAIN, "--epochs", "1", "--batch-size", "64", "--out", str(root / "run")]) == 0
    model = str(root / "run" / "model.safetensors")
    assert main([*REPAIR, "--model", model, "--defense", "random-prune", "--out", str(root / "repair")]) == 0
    assert main(["poison", "--dataset", "synthetic", "--quiet", "--out", str(root / "poison")]) == 0
    return root


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attack", "blended"], "cannot resume: attack.name: 'badnets' -> 'blended'"),
        (["--lr", "0.5"], "cannot resume: train.lr: 0.1 -> 0.5"),
    ],
)
def test_a_refused_resume_changes_nothing(folders, capsys, flags, message):
    run = folders / "run"
    before = _files(run)
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", *flags)
    assert_one_line_error(code, err, message)
    assert _files(run) == before


def test_resume_alone_continues_with_the_runs_recorded_settings(folders, capsys):
    run = folders / "run"
    results = json.loads((run / "results.json").read_text())
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--quiet")
    assert code == 0, err
    again = json.loads((run / "results.json").read_text())
    assert (again["dataset"], again["attack"], again["ba"]) == (results["dataset"], "badnets", results["ba"])


@pytest.mark.parametrize(
    "command, target, message",
    [
        ("train", "repair", "holds a repair: choose another --out for train"),
        ("train", "poison", "holds a poisoned set: choose another --out for train"),
        ("repair", "run", "holds a training run: choose another --out for repair"),
        ("repair", "poison", "holds a poisoned set: choose another --out for repair"),
        ("detect", "repair", "holds a repair: choose another --out for detect"),
        ("poison", "run", "holds a training run: choose another --out for poison"),
    ],
)
def test_a_folder_of_another_command_is_refused_untouched(folders, capsys, command, target, message):
    model = str(folders / "run" / "model.safetensors")
    argv = {
        "train": [*TRAIN, "--epochs", "1"],
        "repair": [*REPAIR, "--model", model],
        "detect": DETECT,
        "poison": ["poison", "--dataset", "synthetic", "--quiet"],
    }[command]
    before = _files(folders / target)
    code, _, err = run_cli(capsys, *argv, "--out", str(folders / target))
    assert_one_line_error(code, err, message)
    assert _files(folders / target) == before


def test_a_repair_of_other_settings_is_refused_and_a_retry_cleans_up(folders, capsys):
    repair, model = folders / "repair", str(folders / "run" / "model.safetensors")
    before = _files(repair)
    code, _, err = run_cli(capsys, *REPAIR, "--model", model, "--defense", "l1-prune", "--out", str(repair))
    assert_one_line_error(code, err, "holds a repair of other settings: defense.name: 'random-prune' -> 'l1-prune'")
    assert _files(repair) == before
    # the same repair again (a retry after a kill) is the folder's own run: the kill's temporary files go
    (repair / ".results.json.k1ll3d.tmp").write_text("{half")
    assert main([*REPAIR, "--model", model, "--defense", "random-prune", "--out", str(repair)]) == 0
    assert not list(repair.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["repair", "poison", "evaluate", "analyze"])
def test_every_command_waits_for_no_one_and_writes_alone(folders, tmp_path, capsys, command):
    model = str(folders / "run" / "model.safetensors")
    out = tmp_path / "busy"
    out.mkdir()
    argv = {
        "repair": [*REPAIR, "--model", model],
        "poison": ["poison", "--dataset", "synthetic", "--quiet"],
        "evaluate": ["evaluate", "--model", model, "--dataset", "synthetic"],
        "analyze": ["analyze", "--model", model, "--dataset", "synthetic", "--quiet"],
    }[command]
    with run_lock(out):  # another bdguard process writing there
        code, _, err = run_cli(capsys, *argv, "--out", str(out))
    assert_one_line_error(code, err, "is being written by another bdguard process")
    assert _files(out) == {}


def test_a_command_refused_after_its_checks_leaves_no_folder(folders, tmp_path, capsys):
    model = str(folders / "run" / "model.safetensors")
    out = tmp_path / "new"
    code, _, err = run_cli(
        capsys, "analyze", "--model", model, "--dataset", "synthetic", "--attack", "none", "--out", str(out)
    )
    assert_one_line_error(code, err, "has no trigger to analyse")
    assert not out.exists()


def test_retraining_without_the_flagged_samples_gives_a_clean_model(tmp_path, capsys):
    """The practitioner's path: flags over the training set (here the poison mask itself, as a perfect detector's
    flagged.npy would be) -> `train --exclude` -> a model without the backdoor."""
    poisoned = tmp_path / "poisoned"
    argv = [*TRAIN, "--epochs", "3", "--batch-size", "64", "--lr", "0.05"]
    assert main([*argv, "--out", str(poisoned)]) == 0
    flags = poisoned / "poison_mask.npy"
    clean = tmp_path / "clean"
    assert main([*argv, "--exclude", str(flags), "--out", str(clean)]) == 0
    before, after = (json.loads((run / "results.json").read_text()) for run in (poisoned, clean))
    manifest = json.loads((clean / "attack.json").read_text())
    left_out = manifest["excluded"]
    assert left_out == manifest["excluded_poisoned"] == before["poisoned"] > 0
    assert after["train_size"] == before["train_size"] - left_out
    assert before["asr"] > 0.9 and after["asr"] < 0.2 and after["ba"] > 0.8
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=bool))
    code, _, err = run_cli(capsys, *argv, "--exclude", str(tmp_path / "short.npy"), "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "expected bool flags over the")
    (tmp_path / "names.txt").write_text("class0/0.png\n")  # file names, for a set that has none
    code, _, err = run_cli(capsys, *argv, "--exclude", str(tmp_path / "names.txt"), "--out", str(tmp_path / "y"))
    assert_one_line_error(code, err, "this data set was not read from files")
