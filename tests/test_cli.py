import json
import subprocess
import sys

import pytest
import torch

from bdguard.cli.main import main
from cli_helpers import assert_one_line_error, run_cli

TRAIN = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--attack", "badnets", "--set", "patch_size=4", "--out", str(out)]) == 0
    return out


def test_train_then_evaluate_agree(trained, tmp_path, capsys):
    train_results = json.loads((trained / "results.json").read_text())
    assert train_results["attack"] == "badnets" and train_results["model"] == "small-cnn"
    assert json.loads((trained / "attack.json").read_text())["params"]["patch_size"] == 4
    # the attack (with its patch size) comes from the model file when --attack is not given
    code, out, _ = run_cli(
        capsys,
        "evaluate",
        "--model",
        str(trained / "model.safetensors"),
        "--dataset",
        "synthetic",
        "--out",
        str(tmp_path / "eval"),
    )
    assert code == 0 and "ASR" in out
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    for key in ("ba", "asr", "ra"):
        assert evaluated[key] == pytest.approx(train_results[key])
    assert {"dataset", "attack", "defense", "model", "epochs", "seconds"} <= set(evaluated)


def test_listings(capsys):
    code, out, _ = run_cli(capsys, "datasets")
    assert code == 0 and "synthetic" in out and "cifar10" in out
    code, out, _ = run_cli(capsys, "attacks")
    assert code == 0 and "badnets" in out and "patch_size=3" in out and "reference" in out
    code, out, _ = run_cli(capsys, "defenses")
    assert code == 0 and "none" in out
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "resnet20" in out and "preact-resnet18" in out
    assert "torchvision:" in out and "timm:" in out  # the model sources (a narrow console cuts their text)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--dataset", "nosuchset", "--out", "x"], "unknown data set 'nosuchset'"),
        ([*TRAIN, "--rate", "2", "--out", "x"], "attack rate must be in"),
        ([*TRAIN, "--rate", "lots", "--out", "x"], "attack.rate must be a number"),
        ([*TRAIN, "--attack", "badnet", "--out", "x"], "did you mean 'badnets'"),
        ([*TRAIN, "--attack", "badnets", "--set", "colour=red", "--out", "x"], "unknown setting 'badnets.colour'"),
        ([*TRAIN, "--model", "vgg99", "--out", "x"], "unknown model 'vgg99'"),
        ([*TRAIN, "--device", "cuda:0", "--out", "x"], "CUDA is not available"),
        (["train", "--dataset", "synthetic"], "--out"),
        (["train", "--config", "/nonexistent.toml", "--out", "x"], "config file not found"),
        (["evaluate", "--model", "/nonexistent/model.safetensors", "--dataset", "synthetic"], "/nonexistent"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_foreign_and_corrupt_model_files_are_refused(tmp_path, capsys):
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    code, _, err = run_cli(capsys, "evaluate", "--model", str(pickled), "--dataset", "synthetic")
    assert_one_line_error(code, err, "pickle")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run_cli(capsys, "evaluate", "--model", str(garbage), "--dataset", "synthetic")
    assert_one_line_error(code, err, "safetensors")


def test_evaluate_refuses_a_model_of_another_shape(trained, capsys):
    code, _, err = run_cli(capsys, "evaluate", "--model", str(trained / "model.safetensors"), "--dataset", "digits")
    assert_one_line_error(code, err, "expects 10 classes of (3, 16, 16) images")


def test_evaluate_never_writes_into_a_run_folder(trained, capsys):
    before = (trained / "results.json").read_text()
    model = str(trained / "model.safetensors")
    code, _, err = run_cli(capsys, "evaluate", "--model", model, "--dataset", "synthetic", "--out", str(trained))
    assert_one_line_error(code, err, "holds a training run: choose another --out for evaluate")
    assert (trained / "results.json").read_text() == before


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "bdguard.cli.main", *TRAIN[:6], "40", "--threads", "1", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before its first epoch"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143
    assert err.strip().splitlines()[-1] == "bdguard: terminated; finished files are kept (continue with --resume)"
    assert (out / "checkpoint.pt").exists() and not (out / "model.safetensors").exists()


def test_existing_run_needs_resume(trained, capsys):
    code, _, err = run_cli(capsys, *TRAIN, "--attack", "badnets", "--set", "patch_size=4", "--out", str(trained))
    assert_one_line_error(code, err, "--resume")


def test_console_entry_point():
    done = subprocess.run([sys.executable, "-m", "bdguard", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("bdguard ")


def test_demo_trains_prunes_and_prints_one_table(tmp_path, capsys, monkeypatch):
    """The demo is the shipped `demo` suite run by the bench; here on the synthetic set, so that it runs in seconds."""
    from bdguard.bench import config as bench_config
    from bdguard.bench import execute
    from bdguard.cli import demo

    shipped = demo.demo_suite()
    tiny = bench_config.from_dict(
        bench_config.BenchConfig,
        {
            **bench_config.read_suite("demo"),
            "data": {"dataset": "synthetic"},
            "by_attack": {"badnets": {"params": {"patch_size": 4}}},
            "train": {"model": "small-cnn", "epochs": 1, "batch_size": 64, "threads": 1},
            "probe": {"size": 200},
            "by_defense": {
                "vab": {"params": {"preset": "smoke"}},  # V&B's settings for the synthetic set
                "linf-prune": {"params": {"nc_steps": 30}},  # Neural Cleanse cut short
                "linf-prune-oracle": {"defense": "linf-prune", "params": {"trigger": "oracle", "nc_steps": 30}},
            },
        },
    )
    assert (tiny.attacks, tiny.defenses) == (shipped.attacks, shipped.defenses)
    monkeypatch.setattr(demo, "demo_suite", lambda: tiny)
    code, out, _ = run_cli(capsys, "demo", "--out", str(tmp_path), "--quiet")
    assert code == 0
    assert all(column in out for column in demo.COLUMNS)
    cells = [line.split() for line in out.splitlines()]
    rows = {" ".join(c[:-7]): c[-7:] for c in cells if len(c) > 7 and c[-1].isdigit()}  # label: BA ... seconds
    assert set(rows) == {"none", "vab", "none + linf-prune", "none + linf-prune-oracle"}
    folder = tmp_path / "cells" / "badnets"
    trained = json.loads((folder / "none" / "seed0" / "results.json").read_text())
    assert trained["attack"] == "badnets" and trained["asr"] > 0.5
    vab = json.loads((folder / "vab" / "seed0" / "results.json").read_text())
    assert rows["vab"][3:5] == [f"{vab['detector']['tpr']:.1%}", f"{vab['detector']['fpr']:.1%}"]
    assert rows["none"][3:5] == ["—", "—"]  # no detector
    assert json.loads((folder / "vab" / "seed0" / "attack.json").read_text()) == json.loads(
        (folder / "none" / "seed0" / "attack.json").read_text()
    )  # both rows train on the same poisoned samples
    for name, trigger in (("linf-prune", "reverse"), ("linf-prune-oracle", "oracle")):
        report = json.loads((folder / name / "seed0" / "pruning.json").read_text())
        assert report["trigger"] == trigger
    pruned = json.loads((folder / "linf-prune-oracle" / "seed0" / "results.json").read_text())
    assert pruned["model_path"] == str(folder / "none" / "seed0" / "model.safetensors")
    assert pruned["pruned_fraction"] > 0 and pruned["asr"] < trained["asr"]
    # run again: every cell is read back, nothing is trained or pruned twice
    monkeypatch.setattr(execute, "run_repair", lambda *a, **k: pytest.fail("pruned again"))
    monkeypatch.setattr(execute, "run_train", lambda *a, **k: pytest.fail("trained again"))
    code, again, _ = run_cli(capsys, "demo", "--out", str(tmp_path), "--quiet")
    assert code == 0 and f"{pruned['asr']:.1%}" in again


def test_the_demo_settings_are_the_documented_ones():
    from bdguard.bench.grid import plan
    from bdguard.cli import demo

    suite = demo.demo_suite()
    steps = {step.defense: step for step in plan(suite, "out")}
    config = steps["none"].config
    assert (config.data.dataset, config.data.train_size) == ("fashion-mnist", 20_000)
    assert (config.attack.name, config.attack.rate, config.train.model, config.train.epochs) == (
        "badnets",
        0.1,
        "small-cnn",
        10,
    )
    vab = steps["vab"].config
    assert (vab.data, vab.attack) == (config.data, config.attack) and vab.defense.params == {}
    assert vab.train == config.train and config.train.schedule == "onecycle"
    # as a defender runs it (reversed trigger, auto budget), and with the real trigger, both on the `none` model
    repairs = [(steps[name].config.defense.name, steps[name].config.defense.params) for name in suite.defenses[2:]]
    assert repairs == [("linf-prune", {}), ("linf-prune", {"trigger": "oracle"})]
    assert {steps[name].source for name in suite.defenses[2:]} == {steps["none"].folder / "model.safetensors"}
    assert steps["linf-prune"].config.probe.size == 500 and steps["linf-prune"].config.data == config.data


@pytest.mark.parametrize(
    "command, module, hint",
    [
        (["repair", "--model", "m.safetensors"], "cli.repair.run_repair", "run the same command again to redo it"),
        (["detect"], "runs.detect.run_detect", "run the same command again: the model it trains resumes"),
    ],
)
def test_ctrl_c_names_how_each_command_continues(tmp_path, capsys, monkeypatch, command, module, hint):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"bdguard.{module}", interrupted)
    code, _, err = run_cli(capsys, *command, "--dataset", "synthetic", "--out", str(tmp_path / "out"))
    assert code == 130 and err.strip() == f"bdguard: interrupted; finished files are kept ({hint})"


def test_repairs_summary_names_the_reversed_target_and_its_anomaly_index(tmp_path, capsys, monkeypatch):
    figures = {"ba": 0.9, "asr": 0.05, "ra": 0.8}
    trigger = {"target": 3, "anomaly_index": 4.25, "backdoored": True}
    results = {**figures, "before": figures, "pruned_fraction": 0.0, "neural-cleanse": {"trigger": trigger}}
    monkeypatch.setattr("bdguard.cli.repair.run_repair", lambda *args, **kwargs: results)
    argv = ["repair", "--model", "m.safetensors", "--dataset", "synthetic", "--defense", "neural-cleanse"]
    code, printed, _ = run_cli(capsys, *argv, "--out", str(tmp_path / "r"))
    assert code == 0 and "reversed target 3 (anomaly index 4.25: backdoored)" in printed


def test_the_target_may_be_named_by_its_class(tmp_path, capsys):
    from bdguard.cli.main import build_parser
    from bdguard.cli.options import run_config

    def target(*argv):
        return run_config(build_parser().parse_args(["train", *argv, "--out", str(tmp_path / "r")])).attack.target

    assert target("--dataset", "fashion-mnist", "--target", "Coat") == 4
    assert target("--dataset", "synthetic", "--target", "3") == 3
    for name in ("cat", "dog"):
        (tmp_path / "set" / name).mkdir(parents=True)
    assert target("--dataset", f"imagefolder:{tmp_path / 'set'}", "--target", "dog") == 1  # folders sort by name
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--target", "cat", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "synthetic has no class 'cat'; its classes: 'class0', 'class1'")
