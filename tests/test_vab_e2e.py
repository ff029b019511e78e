import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from bdguard.attacks import AttackConfig, build_attack
from bdguard.data import DataConfig, load_dataset
from bdguard.data.base import DataBundle
from bdguard.defenses import DefenseConfig, TrainingJob, build_defense
from bdguard.defenses.vab import defense as vab_defense
from bdguard.errors import BdguardError
from bdguard.io import read_json
from bdguard.models import load_model
from bdguard.pipeline import RunConfig, run_train
from bdguard.training import TrainConfig, evaluate
from bdguard.training.factory import new_model

pytestmark = pytest.mark.usefixtures("one_thread")

# a 4x4 checkerboard on 16x16 images: learned within one epoch when nothing defends
ATTACK = {"name": "badnets", "rate": 0.1, "params": {"patch_size": 4}}
TRAIN = {"model": "small-cnn", "batch_size": 64, "threads": 1}
VAB = {"preset": "smoke"}  # small-cnn Victim, 31 Victim steps per epoch on the 2000 synthetic images


def _run(tmp_path, name: str, epochs: int, defense: dict) -> dict:
    config = RunConfig.from_dict(
        {"data": {"dataset": "synthetic"}, "attack": ATTACK, "defense": defense, "train": {**TRAIN, "epochs": epochs}}
    )
    return run_train(config, tmp_path / name, quiet=True)


def test_vab_trains_a_clean_model_on_poisoned_data(tmp_path):
    plain = _run(tmp_path, "none", 2, {"name": "none"})
    assert plain["asr"] > 0.9 and plain["ba"] > 0.85, plain

    epochs = 4
    results = _run(tmp_path, "vab", epochs, {"name": "vab", "params": VAB})
    out = tmp_path / "vab"
    assert results["asr"] < 0.1 and results["ba"] > 0.75, results
    assert results["victim"]["asr"] > 0.9  # the Victim is backdoored on purpose
    detector = results["detector"]
    assert detector["tpr"] > 0.9 and detector["fpr"] < 0.25 and detector["auroc"] > 0.85, detector
    assert detector["rounds"] == 3 + epochs  # warm-up rounds + one update after every epoch at this budget
    assert set(results["seconds_by_stage"]) == {"warm_up", "stage_a", "stage_b", "victim", "evaluation"}
    assert read_json(out / "results.json")["detector"] == detector

    rows = [line.split(",") for line in (out / "suspicious.csv").read_text().splitlines()]
    assert rows[0] == ["index", "normalised_entropy", "suspicious"] and len(rows) == 2001
    assert [int(r[0]) for r in rows[1:]] == list(range(2000))
    entropy = torch.tensor([float(r[1]) for r in rows[1:]])
    flagged = torch.tensor([r[2] == "yes" for r in rows[1:]])
    assert {r[2] for r in rows[1:]} == {"yes", "no"} and int(flagged.sum()) == detector["suspicious"]
    assert float(entropy.min()) == 0.0 and float(entropy.max()) == 1.0
    assert float(entropy[flagged].max()) <= 0.2 + 1e-6 and float(entropy[~flagged].min()) >= 0.2 - 1e-6  # tau

    png = (out / "entropy_hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 3 * height  # one panel per key round, side by side

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["A", "A", "B", "B"]
    assert metrics[-1]["asr"] == results["asr"] and metrics[-1]["victim_ba"] == results["victim"]["ba"]
    assert {"loss_mix", "loss_u", "alpha", "suppression_weight_clean", "pseudo_attacker_label_poisoned"} <= set(
        metrics[-1]
    )
    assert metrics[-1]["detector"]["round"] == detector["rounds"]
    assert len((out / "detector.jsonl").read_text().splitlines()) == detector["rounds"]
    victim, meta = load_model(out / "victim.safetensors")
    assert meta.architecture == "small-cnn" and "Victim" in meta.extra["role"]


def _small_job(run_dir, resume: bool = False, fingerprint: str = "test") -> TrainingJob:
    """300 synthetic training images: enough to exercise every part of V&B in seconds."""
    full = load_dataset(DataConfig(dataset="synthetic"))
    bundle = DataBundle(
        full.name,
        full.train.subset(torch.arange(300)),
        full.test.subset(torch.arange(100)),
        full.classes,
        full.mean,
        full.std,
        full.flip,
        full.source,
    )
    attack = build_attack(AttackConfig(**ATTACK), bundle.num_classes, bundle.image_shape)
    poisoned = attack.poison(bundle.train)
    triggered = attack.test_set(bundle.test)
    train = TrainConfig(**{**TRAIN, "batch_size": 32, "epochs": 2, "device": "cpu"})
    device = torch.device("cpu")
    return TrainingJob(
        bundle=bundle,
        poisoned=poisoned,
        triggered=triggered,
        train=train,
        device=device,
        new_model=lambda: new_model(bundle, train, device),
        evaluate=lambda model: evaluate(model, bundle.test, triggered),
        run_dir=run_dir,
        fingerprint=fingerprint,
        resume=resume,
        quiet=True,
    )


def _defense():
    return build_defense(DefenseConfig(name="vab", params={**VAB, "victim_batch_size": 32}))


def test_vab_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight, _ = _defense().train(_small_job(tmp_path / "straight"))

    original = vab_defense.stage_b_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vab_defense, "stage_b_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _defense().train(_small_job(tmp_path / "resumed"))
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1  # stage A's epoch 1
    monkeypatch.setattr(vab_defense, "stage_b_epoch", original)
    resumed, _ = _defense().train(_small_job(tmp_path / "resumed", resume=True))

    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    va = load_file(tmp_path / "straight" / "victim.safetensors")
    vb = load_file(tmp_path / "resumed" / "victim.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)
    for name in ("suspicious.csv", "detector.jsonl"):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text(), name

    def losses(run):
        text = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(row["loss"], row["ba"], row["victim_loss"], row["detector"]) for row in map(json.loads, text)]

    assert losses("straight") == losses("resumed")
    with pytest.raises(BdguardError, match="different settings"):
        _defense().train(_small_job(tmp_path / "straight", resume=True, fingerprint="other"))
