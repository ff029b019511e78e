"""`bdguard analyze` end to end on the synthetic set, with tiny small-cnns trained in seconds by `bdguard train`."""

import json

import pytest

from bdguard.cli.main import main
from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", "2", "--batch-size", "64", "--quiet"]
TRAIN += ["--threads", "1"]
STATS = ("mean_clean", "std_clean", "mean_trig", "std_trig")
ANALYZE = ["analyze", "--dataset", "synthetic", "--probe-size", "200", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(backdoored, clean) model files; the backdoored one records its attack (BadNets, 4x4 patch, target 0)."""
    root = tmp_path_factory.mktemp("analyze")
    assert main([*TRAIN, "--attack", "badnets", "--set", "patch_size=4", "--out", str(root / "bad")]) == 0
    assert main([*TRAIN, "--out", str(root / "clean")]) == 0
    return root / "bad" / "model.safetensors", root / "clean" / "model.safetensors"


def test_analyze_writes_the_grid_the_norms_and_the_reversed_trigger(models, tmp_path, capsys):
    bad, clean = models
    out = tmp_path / "analysis"
    reverse = ["--set", "trigger=reverse", "--set", "nc.steps=20", "--set", "nc.batch_size=8"]
    argv = [*ANALYZE, "--model", str(bad), "--clean-model", str(clean), *reverse, "--out", str(out)]
    code, printed, _ = run_cli(capsys, *argv)
    assert code == 0 and "backdoored / real trigger: focus" in printed and "Neural Cleanse" in printed
    for name in ("gradcam.png", "norms.png", "norms_clean.png", "nc_trigger.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    result = json.loads((out / "analysis.json").read_text())
    assert result["attack"] == "badnets" and result["target"] == 0  # the attack recorded in the model file
    assert result["probe"]["size"] == 200 and 0 < result["probe"]["analysed"] < 200  # target-class images left out
    cells = {(cell["model"], cell["input"]): cell for cell in result["gradcam"]}
    models_, inputs = ("clean-trained", "backdoored"), ("clean", "real trigger", "reversed trigger")
    assert set(cells) == {(m, i) for m in models_ for i in inputs}
    assert cells["backdoored", "real trigger"]["predicted_target"] > 0.9
    assert cells["backdoored", "real trigger"]["focus"] > 1.0 > cells["backdoored", "clean"]["focus"]
    assert cells["clean-trained", "real trigger"]["predicted_target"] < 0.5
    assert result["neural_cleanse"]["labels_optimised"] == list(range(10))
    assert result["config"]["analysis"]["nc"]["steps"] == 20

    norms = json.loads((out / "norms.json").read_text())
    assert set(norms["models"]) == set(models_) and norms["images"] == result["probe"]["analysed"]
    for model in models_:
        assert set(norms["models"][model]) == {"oracle", "reverse"}
        linf = norms["models"][model]["oracle"]["linf"]
        assert len(linf["per_channel"]["diff"]) == 128 and len(linf["top_channels"]) == 6  # 5% of 128
        assert set(linf["per_channel"]) == {*STATS, "diff", "rel", "z", "auroc"}
    assert result["norms"]["backdoored"]["oracle"]["linf"]["top_auroc"] > 0.9  # the trigger lights channels up


def test_analyze_defaults_to_the_real_trigger_only(models, tmp_path, capsys):
    out = tmp_path / "oracle"
    code, _, _ = run_cli(capsys, *ANALYZE, "--model", str(models[0]), "--set", "example=3", "--out", str(out))
    assert code == 0
    result = json.loads((out / "analysis.json").read_text())
    cells = [(cell["model"], cell["input"]) for cell in result["gradcam"]]
    assert cells == [("backdoored", "clean"), ("backdoored", "real trigger")]
    assert result["neural_cleanse"] is None and result["trigger"] == "oracle"
    names = ["analysis.json", "config.json", "gradcam.png", "norms.json", "norms.png"]
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "missing.safetensors"], "does not exist"),
        (["--set", "trigger=bogus"], "analysis.trigger must be one of oracle, reverse"),
        (["--set", "nc.steps=0"], "nc.steps must be in [1, inf]"),
        (["--set", "nc.bogus=1"], "unknown setting 'analysis.nc.bogus'"),
        (["--set", "example=1000"], "analysis.example 1000 is not among"),
        (["--probe-size", "500"], "leaves no test images"),
        (["--clean-model", "missing.safetensors"], "does not exist"),
        (["--attack", "nonsense"], "nonsense"),
        (["--set", "patch_size=4"], "unknown setting 'none.patch_size'"),  # attack options need --attack
    ],
)
def test_bad_input_is_one_error_line(models, tmp_path, capsys, args, message):
    argv = [*ANALYZE, "--model", str(models[0]), *args, "--out", str(tmp_path / "out")]
    if args[0] == "--model":
        argv = [*ANALYZE, *args, "--out", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, message)


def test_a_model_without_attack_needs_a_trigger(models, tmp_path, capsys):
    code, _, err = run_cli(capsys, *ANALYZE, "--model", str(models[1]), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "has no trigger to analyse")
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, *ANALYZE, "--model", str(models[0]), "--out", str(tmp_path / "file"))
    assert_one_line_error(code, err, "exists and is not a folder")
