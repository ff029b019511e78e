"""The poisoned-sample detectors on sets where the answer is known: each ranks planted BadNets samples first,
`vab` is the defense's own warm-up, and `bdguard detect` writes its folder, also for a set without ground truth."""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdguard.data import DataConfig, load_dataset
from bdguard.detectors.spectral import flag_top, spectral_scores
from bdguard.errors import BdguardError
from bdguard.io import read_json
from bdguard.models import ModelMeta, build_model, save_model
from bdguard.runs.common import set_up
from bdguard.runs.detect import DetectConfig, run_detect
from bdguard.runs.train import RunConfig, run_train
from bdguard.training import evaluate, fit
from bdguard.training.factory import model_meta, new_model
from bdguard.training.metrics import detection_metrics
from bdguard.training.runtime import steps_per_epoch
from bdguard.training.trainer import Trainer
from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION = Path("/usr/share/datasets/fashion-mnist")
TRAIN = {"model": "small-cnn", "batch_size": 64, "lr": 0.05, "augment": False, "device": "cpu", "threads": 1}
PATCH = {"patch_size": 4}  # a 4x4 checkerboard on the 16x16 synthetic images


def _config(detector: str, params: dict, rate: float, epochs: int = 4, data: dict | None = None) -> DetectConfig:
    return DetectConfig.from_dict(
        {
            "data": data or {"dataset": "synthetic"},
            "attack": {"name": "badnets", "rate": rate, "params": PATCH if data is None else {}},
            "detector": {"name": detector, "params": params},
            "train": {**TRAIN, "epochs": epochs},
        }
    )


@cache
def _backdoored_model(folder: Path, rate: float) -> Path:
    """The undefended small CNN trained on the synthetic set with `rate` BadNets poison (ASR 1.0 after 2 epochs)."""
    run = RunConfig.from_dict(
        {
            "data": {"dataset": "synthetic"},
            "attack": {"name": "badnets", "rate": rate, "params": PATCH},
            "train": {**TRAIN, "epochs": 4},
        }
    )
    results = run_train(run, folder, quiet=True)
    assert results["asr"] > 0.95, results
    return folder / "model.safetensors"


def _shuffled_auroc(folder: Path) -> float:
    rows = (folder / "scores.csv").read_text().splitlines()[1:]
    scores = torch.tensor([float(row.split(",")[2]) for row in rows])
    truth = torch.tensor([row.endswith(",yes") for row in rows])
    shuffled = scores[torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(0))]
    return detection_metrics(shuffled, torch.zeros_like(truth), truth)["auroc"]


# Spectral Signatures and Activation Clustering assume the poison is a minority of its label: at 3 % of the set it
# is a quarter of the target label (at 10 % it would be half). The detectors that train their own network need the
# trigger learned within their first epochs: 10 %.
@pytest.mark.parametrize(
    ("detector", "params", "rate"),
    [
        ("spectral", {"eps": 0.05}, 0.03),
        ("activation-clustering", {}, 0.03),
        ("abl", {"isolation_epochs": 4}, 0.1),
        ("vab", {"victim_batch_size": 64, "victim_min_steps": 0}, 0.1),  # 31 steps an epoch, as configured
    ],
)
def test_each_detector_ranks_planted_poison_first(detector, params, rate, tmp_path_factory):
    out = tmp_path_factory.mktemp(detector)
    model = None
    if detector in ("spectral", "activation-clustering"):
        model = _backdoored_model(tmp_path_factory.getbasetemp() / f"model-{rate}", rate)
    results = run_detect(_config(detector, params, rate, epochs=10), out, model_path=model, quiet=True)
    metrics = results["metrics"]
    assert metrics["auroc"] >= 0.9, metrics
    assert _shuffled_auroc(out) < 0.7  # the same scores, shuffled, would fail the test
    assert results["poisoned"] == round(rate * 2000) and results["samples"] == 2000
    flagged = np.load(out / "flagged.npy", allow_pickle=False)
    assert flagged.shape == (2000,) and int(flagged.sum()) == results["flagged"] == metrics["suspicious"]
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "index,label,score,flagged,poisoned" and len(rows) == 2001
    assert sum(row.split(",")[3] == "yes" for row in rows[1:]) == results["flagged"]
    for figure in ("score_hist.png", "most_suspicious.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_strip_flags_triggered_fashion_mnist_images(tmp_path):
    """STRIP needs images whose blend with another is ambiguous to the model; the synthetic set's prototypes are
    not (a blend of two is still classified confidently), so this test uses 2,000 Fashion-MNIST images."""
    params = {"overlays": 10, "clean_images": 500}  # half the defaults: the same verdict in half the time
    config = _config("strip", params, 0.1, epochs=8, data={"dataset": "fashion-mnist", "train_size": 2000})
    # the model is trained here, without train's evaluation of 19,000 test images after every epoch (most of the
    # time of a detect run that trains its own), on the very set detect poisons
    cpu = torch.device("cpu")
    run = set_up(config.data, config.attack, cpu, quiet=True, poison=True)
    model = new_model(run.bundle, config.train, cpu)
    steps = steps_per_epoch(len(run.poisoned.train), config.train.batch_size)
    fit(Trainer(model, config.train, cpu, None, steps), run.poisoned.train, lambda m: {}, quiet=True)
    test = run.bundle.test.subset(torch.arange(1000))  # of 10,000: enough to see the backdoor learned
    assert evaluate(model.eval(), test, run.triggered(test))["asr"] > 0.9
    save_model(model, tmp_path / "model.safetensors", model_meta(model, run.bundle, {}))
    results = run_detect(config, tmp_path / "strip", tmp_path / "model.safetensors", quiet=True)
    metrics = results["metrics"]
    assert metrics["auroc"] >= 0.9 and metrics["fpr"] < 0.05, metrics


def test_the_vab_detector_is_the_defenses_own_warm_up(tmp_path):
    """Same seed and settings: the detector's rounds flag exactly what the defense's warm-up rounds flagged, and its
    final flags (after the label rule) are the defense's first split."""
    params = {"victim_batch_size": 64}
    run = RunConfig.from_dict(
        {
            "data": {"dataset": "synthetic"},
            "attack": {"name": "badnets", "rate": 0.1, "params": PATCH},
            "defense": {"name": "vab", "params": params},
            "train": {**TRAIN, "epochs": 2},
        }
    )
    run_train(run, tmp_path / "defense", quiet=True)
    defense_rounds = [json.loads(line) for line in (tmp_path / "defense" / "detector.jsonl").read_text().splitlines()]
    results = run_detect(_config("vab", params, 0.1, epochs=2), tmp_path / "detector", quiet=True)
    flagged = [r["flagged"] for r in results["rounds"]]
    assert flagged == [r["flagged_by_victim"] for r in defense_rounds[: len(flagged)]] and len(flagged) == 3
    first_split = defense_rounds[2]
    assert results["flagged"] == first_split["suspicious"] and results["attacked_labels"] == [0]
    assert first_split["attacked_labels"] == [0] and first_split["suspicious"] < first_split["flagged_by_victim"]


def _image_folder(root: Path) -> Path:
    """Two classes of 40 synthetic images as PNG files, the layout a user's own set has."""
    bundle = load_dataset(DataConfig(dataset="synthetic"))
    for label in (0, 1):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        images = bundle.train.images[bundle.train.labels == label][:40]
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def test_a_users_own_folder_is_ranked_without_metrics(tmp_path):
    folder = _image_folder(tmp_path / "images")
    config_dict = {
        "data": {"dataset": f"imagefolder:{folder}", "cache_dir": str(tmp_path / "cache")},
        "train": {**TRAIN, "epochs": 1},
    }
    config = DetectConfig.from_dict({**config_dict, "detector": {"name": "spectral"}, "gallery": 8})
    results = run_detect(config, tmp_path / "out", quiet=True)
    assert results["metrics"] is None and results["poisoned"] is None and results["attack"] == "none"
    rows = [row.split(",") for row in (tmp_path / "out" / "scores.csv").read_text().splitlines()]
    assert rows[0] == ["index", "label", "score", "flagged", "file"] and len(rows) == 1 + results["samples"]
    flagged = [file for _, label, _, flag, file in rows[1:] if flag == "yes"]
    assert results["flagged"] == len(flagged) > 0
    assert all(file == f"class{label}/{int(file[7:-4])}.png" for _, label, _, _, file in rows[1:])
    assert (tmp_path / "out" / "most_suspicious.png").is_file() and (tmp_path / "out" / "score_hist.png").is_file()

    # the user's next step: retrain without the flagged files, named as scores.csv names them
    (tmp_path / "flagged.txt").write_text("\n".join(flagged) + "\n")
    retrain = {**config_dict, "data": {**config_dict["data"], "exclude": str(tmp_path / "flagged.txt")}}
    trained = run_train(RunConfig.from_dict(retrain), tmp_path / "retrained", quiet=True)
    manifest = read_json(tmp_path / "retrained" / "attack.json")
    assert manifest["excluded"] == len(flagged) and trained["train_size"] == results["samples"] - len(flagged)
    (tmp_path / "typo.txt").write_text(f"{rows[1][4]}\nclass9/0.png\n")
    typo = {**config_dict, "data": {**config_dict["data"], "exclude": str(tmp_path / "typo.txt")}}
    with pytest.raises(BdguardError, match="1 name\\(s\\) are not training files, e.g. 'class9/0.png'"):
        run_train(RunConfig.from_dict(typo), tmp_path / "typo", quiet=True)


def test_spectral_scores_single_out_a_shifted_minority():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 16, generator=generator)
    features[:20] += 4.0 * torch.nn.functional.normalize(torch.ones(16), dim=0)  # a tenth, moved along one direction
    scores = spectral_scores(features)
    flags = flag_top(scores, 0.15)
    assert int(flags.sum()) == 30 and bool(flags[:20].all())


def test_detection_auroc_reads_higher_scores_as_more_suspicious():
    truth = torch.tensor([True, True, False, False, False])
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3])
    metrics = detection_metrics(scores, scores > 0.5, truth)
    assert metrics["auroc"] == 1.0 and metrics["tpr"] == 1.0 and metrics["fpr"] == 0.0
    assert detection_metrics(-scores, scores > 0.5, truth)["auroc"] == 0.0
    # nothing poisoned (no attack): no ground truth to measure against, only the count flagged
    nothing = detection_metrics(scores, scores > 0.5, torch.zeros_like(truth))
    assert nothing["suspicious"] == 2 and nothing["credible"] == 3
    assert all(nothing[key] is None for key in ("tpr", "fpr", "precision", "residual", "auroc"))


def _foreign_model(path: Path) -> Path:
    model = build_model("small-cnn", 3, 1, [0.5], [0.25])  # 3 classes of grey images: not the synthetic set
    meta = ModelMeta("small-cnn", {}, 3, ["a", "b", "c"], [1, 16, 16], [0.5], [0.25], "other")
    save_model(model, path, meta)
    return path


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--detector", "spectrall"], "unknown detector 'spectrall' (did you mean 'spectral'?)"),
        (["--detector", "spectral", "--set", "eps=0.9"], "spectral.eps"),
        (["--detector", "strip", "--set", "frr=1.5"], "strip.frr"),
        (["--detector", "vab", "--set", "tau=2"], "vab.tau"),
        (["--detector", "vab", "--model", "MODEL"], "detector vab trains what it needs itself"),
        (["--detector", "spectral", "--model", "MODEL"], "expects 3 classes"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, fragment, tmp_path, capsys):
    model = str(_foreign_model(tmp_path / "foreign.safetensors"))
    argv = ["detect", "--dataset", "synthetic", "--attack", "badnets", "--out", str(tmp_path / "out"), "--quiet"]
    code, _, err = run_cli(capsys, *argv, *[model if arg == "MODEL" else arg for arg in extra])
    assert_one_line_error(code, err, fragment)
