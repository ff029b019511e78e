"""ABL (defenses/abl.py) on the synthetic set with a planted BadNets patch: the isolation catches the poison, the
defense keeps the backdoor out at the budget of undefended training, LGA flips the gradient at gamma, and a killed
run resumes to the same weights."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdguard.attacks import AttackConfig
from bdguard.data import DataConfig, load_dataset
from bdguard.data.base import DataBundle
from bdguard.defenses import DefenseConfig, TrainingJob, build_defense
from bdguard.defenses.abl import (
    AblParams,
    IsolationParams,
    isolate,
    isolation_config,
    lga_loss,
    make_abl_schedule,
    sample_losses,
    train_isolation_model,
)
from bdguard.errors import BdguardError
from bdguard.training import TrainConfig
from bdguard.training.trainer import Trainer
from tiny_models import training_job

pytestmark = pytest.mark.usefixtures("one_thread")

POISON_RATE = 0.1  # 200 of the 2000 synthetic training images carry a 4x4 checkerboard and the target label
TRAIN = {"model": "small-cnn", "batch_size": 64, "threads": 1, "device": "cpu"}
# A 2000-image set needs more unlearning than the authors' CIFAR-10 setting: 5 % isolated (100 images, 2 steps an
# epoch) and lr 0.02 against 1 % (500 images, 4 steps an epoch) and 5e-4 (docs/methods/abl.md)
SMALL_SET = {"isolation_ratio": 0.05, "unlearning_lr": 0.02, "unlearning_epochs": 2}


def _bundle(train_size: int | None = None) -> DataBundle:
    full = load_dataset(DataConfig(dataset="synthetic"))
    if train_size is None:
        return full
    train, test = full.train.subset(torch.arange(train_size)), full.test.subset(torch.arange(100))
    return DataBundle(full.name, train, test, full.classes, full.mean, full.std, full.flip, full.source)


def _job(epochs: int, run_dir=None, train_size: int | None = None, resume: bool = False) -> TrainingJob:
    attack = AttackConfig(name="badnets", rate=POISON_RATE, params={"patch_size": 4})
    train = TrainConfig(**TRAIN, epochs=epochs)
    return training_job(_bundle(train_size), attack, train, run_dir, "abl-test", resume)


def _precision(isolated: torch.Tensor, poison: torch.Tensor) -> float:
    return float(poison[isolated].float().mean())


def test_lga_descends_above_gamma_and_ascends_below_it():
    gamma = 0.5
    labels = torch.tensor([0, 1])
    for scale, sign in ((0.1, 1.0), (10.0, -1.0)):  # near-uniform logits: CE ~ log 3 > gamma; confident: CE ~ 0
        logits = (scale * torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])).requires_grad_()
        ce = F.cross_entropy(logits, labels)
        assert (ce.item() > gamma) == (sign > 0)
        (ce_grad,) = torch.autograd.grad(ce, logits)
        loss = lga_loss(gamma)(logits, labels)
        (lga_grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == pytest.approx(sign * ce.item())
        assert torch.allclose(lga_grad, sign * ce_grad)
        assert ce_grad.abs().sum() > 0


def test_isolation_catches_the_planted_poison():
    job = _job(epochs=5)
    params = IsolationParams(isolation_ratio=0.05)  # half the poison rate
    config = isolation_config(job.train, params)
    assert (config.epochs, config.schedule, config.augment) == (1, "constant", False)  # a fifth of 5 epochs

    model = job.new_model()
    data, poison = job.poisoned.train, job.poisoned.poison_mask
    rows = train_isolation_model(model, data, config, params.gamma, quiet=True)
    assert len(rows) == 1
    losses = sample_losses(model, data, batch_size=256)
    assert losses.shape == (len(data),) and bool((losses >= 0).all())
    isolated = isolate(losses, params.isolation_ratio)
    assert int(isolated.sum()) == 100
    assert float(losses[isolated].max()) <= float(losses[~isolated].min())  # the lowest losses
    assert _precision(isolated, poison) > 0.8, _precision(isolated, poison)

    shuffled = isolate(losses[torch.randperm(len(losses), generator=torch.Generator().manual_seed(0))], 0.05)
    assert _precision(shuffled, poison) < 0.3  # the same count at random finds about the poison rate


def test_abl_keeps_the_backdoor_out_at_the_budget_of_undefended_training(tmp_path):
    epochs = 6
    plain = build_defense(DefenseConfig(name="none")).train(_job(epochs)).model
    undefended = _job(epochs).evaluate(plain)
    assert undefended["asr"] > 0.9 and undefended["ba"] > 0.95, undefended

    job = _job(epochs, tmp_path / "abl")
    result = build_defense(DefenseConfig(name="abl", params=SMALL_SET)).train(job)
    defended = job.evaluate(result.model)
    assert defended["asr"] < 0.1, defended  # undefended: > 0.9
    assert defended["ba"] > undefended["ba"] - 0.15, (defended, undefended)

    assert result.details["schedule"] == {"isolation": 1, "training": 3, "unlearning": 2}
    detector = result.detector
    assert detector["flagged"] == 100 and detector["precision"] > 0.8 and detector["auroc"] > 0.75, detector
    assert detector["tpr"] == pytest.approx(detector["precision"] * 100 / 200)

    rows = [json.loads(line) for line in (tmp_path / "abl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # the whole budget, no more
    assert [r["stage"] for r in rows] == ["isolation"] + ["training"] * 3 + ["unlearning"] * 2
    assert [r["samples"] for r in rows] == [2000] + [1900] * 3 + [100] * 2
    assert rows[-1]["lr"] == SMALL_SET["unlearning_lr"] and rows[-1]["loss"] < 0  # gradient ascent
    assert rows[-1]["asr"] == defended["asr"]
    isolated = np.load(tmp_path / "abl" / "isolation.npy", allow_pickle=False)
    losses = np.load(tmp_path / "abl" / "losses.npy", allow_pickle=False)
    assert isolated.dtype == bool and isolated.sum() == 100 and losses.shape == (2000,)
    assert losses[isolated].max() <= losses[~isolated].min()


def test_a_killed_abl_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed in the first training epoch (the isolation is redone from its checkpoint) and in unlearning."""
    params = {**SMALL_SET, "unlearning_epochs": 1}  # 5 epochs: isolation 1, training 3, unlearning 1

    def run(name: str, resume: bool = False):
        job = _job(5, tmp_path / name, train_size=300, resume=resume)
        return build_defense(DefenseConfig(name="abl", params=params)).train(job)

    straight = run("straight")
    original = Trainer.train_epoch
    for kill in (2, 5):
        calls = {"n": 0}

        def interrupted(self, data, epoch, quiet=False, kill=kill, calls=calls):
            calls["n"] += 1
            if calls["n"] == kill:
                raise KeyboardInterrupt
            return original(self, data, epoch, quiet)

        monkeypatch.setattr(Trainer, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(f"killed{kill}")
        assert len((tmp_path / f"killed{kill}" / "metrics.jsonl").read_text().splitlines()) == kill - 1
        monkeypatch.setattr(Trainer, "train_epoch", original)
        resumed = run(f"killed{kill}", resume=True)

        a, b = straight.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), kill
        assert resumed.detector == straight.detector

        def rows(name):
            text = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            return [(r["stage"], r["loss"], r["ba"], r["asr"]) for r in map(json.loads, text)]

        assert rows(f"killed{kill}") == rows("straight")
        for name in ("isolation.npy", "losses.npy"):
            assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / f"killed{kill}" / name).read_bytes()


@pytest.mark.parametrize(
    "params",
    [
        {"isolation_ratio": 0.0},
        {"isolation_ratio": 1.0},
        {"isolation_ratio": 1.5},
        {"isolation_share": 0.0},
        {"isolation_epochs": 0},
        {"isolation_epochs": -2},
        {"unlearning_epochs": -1},
        {"unlearning_share": -0.1},
        {"unlearning_share": 1.0},
        {"gamma": 0.0},
        {"unlearning_lr": 0.0},
    ],
)
def test_bad_settings_are_refused(params):
    with pytest.raises(BdguardError, match=f"abl.{next(iter(params))}"):
        build_defense(DefenseConfig(name="abl", params=params))


def test_the_stages_share_the_run_budget():
    params = AblParams()  # the paper's T_te = 20 of T = 100, BackdoorBench's 60 training and 20 unlearning epochs
    explicit = AblParams(isolation_epochs=20, unlearning_epochs=20)
    assert make_abl_schedule(100, params) == make_abl_schedule(100, explicit)
    for epochs in (3, 4, 10, 17, 30, 100):
        schedule = make_abl_schedule(epochs, params)
        assert schedule.isolation + schedule.training + schedule.unlearning == epochs
        assert min(schedule.isolation, schedule.training, schedule.unlearning) >= 1
    assert make_abl_schedule(10, AblParams(unlearning_share=0.0)).unlearning == 0
    with pytest.raises(BdguardError, match="at least 3 epochs"):
        make_abl_schedule(2, params)
    with pytest.raises(BdguardError, match="isolation ratio"):
        isolate(torch.zeros(10), 1.0)
