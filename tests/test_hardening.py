"""What a careless or hostile user meets: read-only and full disks, signals. Each case exits 2 with one line and
leaves what was on disk as it was. CI runs as root, where permission bits stop nothing, so read-only and full disks
are simulated by a writer that raises the errors the kernel would."""

import errno

import pytest
import torch

import bdguard.io
from bdguard.cli.main import main
from cli_helpers import assert_one_line_error, run_cli

TRAIN = ["train", "--dataset", "synthetic", "--attack", "badnets", "--model", "small-cnn", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert main([*TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _read_only(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bdguard.io.tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("command", ["train", "evaluate", "prune"])
def test_a_read_only_output_folder_is_refused_before_any_work(trained, tmp_path, capsys, monkeypatch, command):
    model = ["--model", str(trained / "model.safetensors"), "--dataset", "synthetic"]
    argv = {
        "train": [*TRAIN, "--epochs", "1"],
        "evaluate": ["evaluate", *model],
        "prune": ["prune", *model, "--defense", "random-prune"],
    }[command]
    loaded = []
    monkeypatch.setattr("bdguard.runs.common.load_dataset", lambda *a, **k: loaded.append(1))
    _read_only(monkeypatch)
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "Read-only file system")
    assert "cannot write to" in err and not loaded  # refused before the data set was even read
    assert not any((tmp_path / "out").glob("*"))


@pytest.mark.parametrize(
    "failure, fragment",
    [
        (RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 123 vs 456"), "is the disk full?"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
)
def test_a_full_disk_stops_the_run_with_its_last_checkpoint_intact(tmp_path, capsys, monkeypatch, failure, fragment):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's checkpoint finds the disk full
            raise failure
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run_cli(capsys, *TRAIN, "--epochs", "3", "--out", str(out))
    assert_one_line_error(code, err, fragment)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # no half-written file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert main([*TRAIN, "--epochs", "3", "--out", str(out), "--resume"]) == 0


def test_one_process_at_a_time_writes_a_run_folder_and_a_dead_one_leaves_no_lock(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [*TRAIN, "--epochs", "8", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "bdguard.cli.main", *argv], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or stalled"
            time.sleep(0.1)
        code, _, err = run_cli(capsys, *argv, "--resume")
        assert_one_line_error(code, err, f"is being written by another bdguard process (pid {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed with -9: the kernel dropped its lock, and the run continues from its checkpoint; the temporary file of
    # a write the kill interrupted is cleaned up
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "resuming after epoch" in err, err
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rate", "nan"], "attack.rate must be a finite number"),
        (["--lr", "inf"], "train.lr must be a finite number"),
        (["--lr", "nan"], "train.lr must be a finite number"),
        (["--set", "train.momentum=nan"], "train.momentum must be a finite number"),
        (["--batch-size", "100000000000000000000"], "train.batch_size is too large"),
        (["--set", "vab.tau=2"], "--set vab.tau: vab is not the chosen defense (none); pass --defense vab"),
        (["--set", "blended.alpha=0.3"], "blended is not the chosen attack (badnets)"),
        (["--set", "colour=red"], "unknown setting 'badnets.colour'"),  # checked before the data loads
        (["--target", "12"], "attack target 12 is not a class (synthetic has 10)"),
        (["--set", "train=1"], "--set train=1: train is a section of settings; name one of its keys"),
        (["--attack", "none", "--set", "size=1"], "unknown setting 'none.size': none takes no settings"),
        (["--set", "train.model_kwargs.depth=3"], "model 'small-cnn' has no option depth"),
    ],
)
def test_non_finite_and_overflowing_settings_are_refused_at_once(tmp_path, capsys, monkeypatch, flags, message):
    loaded = []
    monkeypatch.setattr("bdguard.runs.common.load_dataset", lambda *a, **k: loaded.append(1))
    code, _, err = run_cli(capsys, *TRAIN, "--epochs", "1", *flags, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists() and not loaded  # refused before the data set was read


def test_a_model_path_that_is_a_folder_is_named_so(trained, capsys):
    code, _, err = run_cli(capsys, "evaluate", "--model", str(trained), "--dataset", "synthetic")
    assert_one_line_error(code, err, "is a folder; pass the .safetensors file in it")


@pytest.mark.parametrize("device", ["mps", "xla", "meta", "cuda:7"])
def test_a_device_this_machine_cannot_train_on_is_refused(tmp_path, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with CUDA, there is no eighth GPU here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, _, err = run_cli(capsys, *TRAIN, "--epochs", "1", "--device", device, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, f"device {device!r}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        # 9 levels of 10 aliases: 10**9 entries once expanded
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "uses YAML aliases",
        ),
        ("train: {5: x}\n", "setting names must be text, got 5"),
        ("train:\n  seed: 20000000000000\n", "train.seed must be in [0, 4294967295]"),
    ],
    ids=["alias-bomb", "number-key", "huge-seed"],
)
def test_hostile_config_files_are_refused_at_once(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    code, _, err = run_cli(capsys, *TRAIN, "--config", str(config), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, message)
    code, _, err = run_cli(capsys, "bench", str(config), "--out", str(tmp_path / "bench"))
    assert code == 2 and "Traceback" not in err


def test_a_seed_too_large_for_the_generators_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, *TRAIN, "--seed", "20000000000000", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "train.seed must be in [0, 4294967295], got 20000000000000")


def test_sidecar_records_of_the_wrong_type_are_refused_before_any_work(trained, tmp_path, capsys):
    import json
    import shutil

    model = tmp_path / "model.safetensors"
    shutil.copy(trained / "model.safetensors", model)
    sidecar = json.loads((trained / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**sidecar, "extra": {"defense": "none"}}))
    code, _, err = run_cli(
        capsys, "repair", "--model", str(model), "--dataset", "synthetic", "--out", str(tmp_path / "r")
    )
    assert_one_line_error(code, err, "extra.defense must be an object")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: state.pop("history"),
        lambda state: state["trainer"]["model"].update({"renamed.weight": state["trainer"]["model"].pop("fc.weight")}),
        lambda state: state["trainer"].update({"optimizer": {}}),
    ],
    ids=["missing-key", "renamed-parameter", "empty-optimizer"],
)
def test_a_checkpoint_of_this_run_but_another_layout_is_refused_in_one_line(tmp_path, capsys, damage):
    out = tmp_path / "run"
    argv = [*TRAIN, "--epochs", "1", "--batch-size", "64", "--out", str(out)]
    assert main(argv) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    damage(state)
    torch.save(state, out / "checkpoint.pt")
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert_one_line_error(code, err, "does not hold this run's state")


def test_a_model_of_other_classes_of_the_same_shape_is_refused(trained, tmp_path, capsys):
    import json
    import shutil

    model = tmp_path / "model.safetensors"
    shutil.copy(trained / "model.safetensors", model)
    sidecar = json.loads((trained / "model.json").read_text())
    classes = [f"kind{i}" for i in range(len(sidecar["classes"]))]
    (tmp_path / "model.json").write_text(json.dumps({**sidecar, "classes": classes, "dataset": "elsewhere"}))
    code, _, err = run_cli(capsys, "evaluate", "--model", str(model), "--dataset", "synthetic")
    assert_one_line_error(code, err, "was trained on elsewhere, whose classes differ from synthetic's")
    (tmp_path / "model.json").write_text(json.dumps({**sidecar, "dataset": "a copy of synthetic"}))
    code, _, err = run_cli(capsys, "evaluate", "--model", str(model), "--dataset", "synthetic")
    assert code == 0 and "was trained on a copy of synthetic; it reads synthetic" in err
