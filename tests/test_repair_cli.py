"""`bdguard repair` end to end on the synthetic set, with a tiny backdoored small-cnn trained in seconds."""

import json

import pytest
import torch

from bdguard.attacks import AttackConfig, build_attack
from bdguard.cli.main import main
from bdguard.data import DataConfig, load_dataset
from bdguard.defenses import DefenseResult
from bdguard.defenses.pruning.norm_prune import LinfPrune
from bdguard.models import load_model
from bdguard.runs.repair import RepairConfig, run_repair
from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["train", "--dataset", "synthetic", "--model", "small-cnn", "--epochs", "1", "--batch-size", "64"]
REPAIR = ["repair", "--dataset", "synthetic", "--probe-size", "200", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "train"
    argv = [*TRAIN, "--threads", "1", "--attack", "badnets", "--set", "patch_size=4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out / "model.safetensors"


def test_prune_writes_the_repaired_model_and_its_report(model_file, tmp_path, capsys):
    out = tmp_path / "linf"
    argv = [
        *REPAIR,
        "--model",
        str(model_file),
        "--defense",
        "linf-prune",
        "--set",
        "trigger=oracle",
        "--out",
        str(out),
    ]
    code, printed, _ = run_cli(capsys, *argv)
    assert code == 0 and "ASR" in printed and "pruned" in printed
    results = json.loads((out / "results.json").read_text())
    trained = json.loads((model_file.parent / "results.json").read_text())
    # the same keys, each defense's details under its own name
    assert set(trained) - {"none"} | {"pruned_fraction", "linf-prune"} <= set(results)
    assert results["linf-prune"]["k"] == round(results["pruned_fraction"] * 128)
    assert results["attack"] == "badnets" and results["defense"] == "linf-prune"  # the attack from the model file
    assert results["eval_size"] == 300 and results["probe"] == {"source": "test-holdout", "size": 200, "seed": 0}
    assert results["before"]["asr"] > 0.5 and results["asr"] < results["before"]["asr"]

    report = json.loads((out / "pruning.json").read_text())
    pruned = report["pruned"]
    assert report["trigger"] == "oracle" and report["k"] == len(pruned) > 0
    assert results["pruned_fraction"] == pytest.approx(len(pruned) / 128) == report["pruned_fraction"]
    rows = report["per_channel"]
    assert len(rows) == 128 and sorted(r["rank"] for r in rows) == list(range(128))
    assert {r["index"] for r in rows if r["pruned"]} == set(pruned)
    assert {"linf_mean_clean", "l2_std_trig", "l1_diff", "linf_rel", "linf_z", "linf_auroc"} <= set(rows[0])
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert len(curve) == 78 and curve[0]["asr"] == pytest.approx(results["before"]["asr"])  # k = 0 .. 77 (60%)

    model, meta = load_model(out / "model.safetensors")
    assert (model.feature_mask == 0).nonzero().squeeze(1).tolist() == pruned
    assert meta.extra["repair"]["masked_channels"] == pruned and meta.extra["defense"]["name"] == "linf-prune"
    assert meta.extra["trained_with"]["name"] == "none" and meta.extra["attack"]["name"] == "badnets"
    for png in ("curve.png", "norms.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_probe_images_never_enter_ba_or_asr(model_file, tmp_path, monkeypatch):
    seen = {}

    def capture(self, job):
        seen["job"] = job
        return DefenseResult(job.model)

    monkeypatch.setattr(LinfPrune, "repair", capture)
    config = RepairConfig.from_dict({"data": {"dataset": "synthetic"}, "probe": {"size": 200}, "train": {"threads": 1}})
    run_repair(config, model_file, tmp_path / "out", quiet=True)
    job = seen["job"]
    rows = {_key(image) for image in job.probe.images}
    evaluation = job.evaluate.clean
    assert len(rows) == 200 and not rows & {_key(image) for image in evaluation.images}
    assert len(evaluation) == 300

    # the triggered set is the real trigger on the evaluation images not of the target class, nothing else
    test = load_dataset(DataConfig(dataset="synthetic")).test
    attack = build_attack(AttackConfig("badnets", params={"patch_size": 4}), 10, test.image_shape)
    expected = attack.apply(evaluation.images[evaluation.labels != 0])
    assert torch.equal(job.evaluate.triggered.images, expected)
    assert job.oracle is not None and job.target == 0


@pytest.mark.parametrize("defense", ["fine-pruning", "clp"])
def test_the_baselines_run_from_the_cli(defense, model_file, tmp_path, capsys):
    out = tmp_path / defense
    argv = [*REPAIR, "--model", str(model_file), "--defense", defense, "--out", str(out)]
    if defense == "fine-pruning":
        argv += ["--set", "finetune_epochs=1"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["defense"] == defense and 0 <= results["pruned_fraction"] <= 0.9
    for name in ("pruning.json", "curve.jsonl", "curve.png", "norms.png", "model.safetensors"):
        assert (out / name).exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--defense", "linf-prun"], "did you mean 'linf-prune'"),
        (["--defense", "none"], "defense none trains a model: use `bdguard train"),
        (["--defense", "vab"], "defense vab trains a model"),
        (["--dataset", "digits"], "expects 10 classes of (3, 16, 16) images"),
        (["--probe-size", "500"], "leaves no test images"),
        (["--probe-size", "0"], "probe.size must be in"),
        (["--probe-source", "/nonexistent/folder"], "probe.source must be 'test-holdout', 'train-split' or a folder"),
        (["--set", "norm=3"], "linf-prune.norm must be one of"),
        (["--set", "budget=count", "--set", "count=1000"], "but the feature map has 128 channels"),
        (["--set", "trigger=oracle", "--attack", "none"], "trigger=oracle needs an attack with a trigger"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, model_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, *REPAIR, "--model", str(model_file), "--out", str(tmp_path / "x"), *argv)
    assert_one_line_error(code, err, fragment)


def test_prune_refuses_to_overwrite_its_input_and_train_refuses_post_training_defenses(model_file, capsys):
    code, _, err = run_cli(capsys, *REPAIR, "--model", str(model_file), "--out", str(model_file.parent))
    assert_one_line_error(code, err, "holds a training run")
    code, _, err = run_cli(capsys, *TRAIN, "--defense", "linf-prune", "--out", str(model_file.parent / "x"))
    assert_one_line_error(code, err, "defense linf-prune acts on a trained model: use `bdguard repair`")


def test_a_folder_of_clean_images_can_be_the_probe(model_file, tmp_path, monkeypatch):
    from PIL import Image

    test = load_dataset(DataConfig(dataset="synthetic")).test
    folder = tmp_path / "probe"
    for i in range(30):
        label = int(test.labels[i])
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(folder / f"class{label}" / f"{i}.png")
    seen = {}
    monkeypatch.setattr(LinfPrune, "repair", lambda self, job: DefenseResult(seen.setdefault("job", job).model))
    config = RepairConfig.from_dict(
        {"data": {"dataset": "synthetic"}, "probe": {"size": 20, "source": str(folder)}, "train": {"threads": 1}}
    )
    results = run_repair(config, model_file, tmp_path / "out", quiet=True)
    probe = seen["job"].probe
    assert len(probe) == 20 and results["eval_size"] == 500  # nothing held out of the test set
    # the images come back as they were written, labelled by their class folder
    written = {_key(image): int(label) for image, label in zip(test.images[:30], test.labels[:30], strict=True)}
    assert all(written[_key(image)] == int(label) for image, label in zip(probe.images, probe.labels, strict=True))


def _key(image: torch.Tensor) -> bytes:
    return bytes(image.flatten().tolist())
