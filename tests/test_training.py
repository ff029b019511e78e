import json

import pytest
import torch
from safetensors.torch import load_file

from bdguard.attacks import AttackConfig, build_attack
from bdguard.data.base import ImageSet
from bdguard.errors import BdguardError
from bdguard.io import read_json
from bdguard.runs.train import RunConfig, run_train
from bdguard.training import TrainConfig, evaluate
from bdguard.training.schedule import lr_factor
from bdguard.training.trainer import Trainer
from cli_helpers import assert_one_line_error, run_cli


def _config(**train):
    base = {"model": "small-cnn", "epochs": 2, "batch_size": 64, "lr": 0.05, "schedule": "onecycle", "threads": 1}
    return RunConfig.from_dict(
        {"data": {"dataset": "synthetic"}, "attack": {"name": "badnets", "rate": 0.1}, "train": {**base, **train}}
    )


def test_lr_schedules():
    step = TrainConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(step, p) for p in (0.0, 0.49, 0.5, 0.8)] == pytest.approx([1, 1, 0.1, 0.01])
    cosine = TrainConfig(schedule="cosine")
    assert [lr_factor(cosine, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1, 0.5, 0], abs=1e-9)
    one = TrainConfig(schedule="onecycle", warmup=0.25)
    values = [lr_factor(one, p / 100) for p in range(101)]
    assert values.index(max(values)) == 25 and values[0] < 0.05 and values[-1] < 1e-3


class _Always(torch.nn.Module):
    """A stand-in model that predicts one fixed class."""

    def __init__(self, cls: int, classes: int = 10) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(cls), classes).float())

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_asr_excludes_target_class_images():
    labels = torch.arange(100) % 10
    test = ImageSet(torch.zeros((100, 3, 32, 32), dtype=torch.uint8), labels)
    triggered = build_attack(AttackConfig(name="badnets", target=4), 10, (3, 32, 32)).test_set(test)
    # a model that always answers the target: BA is the target's share, ASR is 1, RA is 0
    assert evaluate(_Always(4), test, triggered) == {"ba": 0.1, "asr": 1.0, "ra": 0.0}
    # a model that always answers class 7 is right on the 10 class-7 images among the 90 triggered ones
    assert evaluate(_Always(7), test, triggered) == pytest.approx({"ba": 0.1, "asr": 0.0, "ra": 1 / 9})


def test_a_poisoned_model_learns_the_backdoor(tmp_path):
    results = run_train(_config(epochs=4), tmp_path / "run", quiet=True)
    assert results["ba"] > 0.85, results
    assert results["asr"] > 0.9, results
    assert results["poisoned"] == 200
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4
    for name in ("model.safetensors", "model.json", "results.json", "config.json", "attack.json", "poison_mask.npy"):
        assert (tmp_path / "run" / name).exists(), name
    saved = read_json(tmp_path / "run" / "results.json")
    assert {"ba", "asr", "ra", "dataset", "attack", "defense", "model", "epochs", "seconds"} <= set(saved)


def test_clean_training_has_no_asr(tmp_path):
    config = _config(epochs=1)
    config.attack = AttackConfig(name="none")
    results = run_train(config, tmp_path / "clean", quiet=True)
    assert results["asr"] is None and results["ra"] is None and results["poisoned"] == 0


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    config = _config(epochs=3)
    run_train(config, tmp_path / "straight", quiet=True)

    original = Trainer.train_epoch
    calls = {"n": 0}

    def interrupted(self, data, epoch, quiet=False):
        calls["n"] += 1
        if epoch == 2 and calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, data, epoch, quiet)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, tmp_path / "resumed", quiet=True)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    with pytest.raises(BdguardError, match="--resume"):
        run_train(config, tmp_path / "resumed", quiet=True)
    spent = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["elapsed"]
    results = run_train(config, tmp_path / "resumed", resume=True, quiet=True)
    # the run's seconds count the first invocation's (up to its checkpoint) as well as the second's
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert results["seconds"] >= spent + sum(row["seconds"] for row in rows[1:]) and spent >= rows[0]["seconds"]

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() != ""
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    run_train(_config(epochs=1), tmp_path / "run", quiet=True)
    before = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.name != ".lock"}
    with pytest.raises(BdguardError, match=r"cannot resume: train\.lr: 0\.05 -> 0\.01"):
        run_train(_config(epochs=1, lr=0.01), tmp_path / "run", resume=True, quiet=True)
    after = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.name != ".lock"}
    assert after == before  # refused before anything was written


def test_resume_refuses_a_damaged_or_foreign_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_train(_config(epochs=1), run, quiet=True)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BdguardError, match="not a readable bdguard checkpoint"):
        run_train(_config(epochs=1), run, resume=True, quiet=True)
    torch.save(torch.zeros(3), run / "checkpoint.pt")
    with pytest.raises(BdguardError, match="another program"):
        run_train(_config(epochs=1), run, resume=True, quiet=True)


def test_a_resumed_run_rewrites_its_log_from_the_checkpoint(tmp_path):
    """A kill between the checkpoint write and the log write leaves a log one row short; resuming restores it."""
    run = tmp_path / "run"
    config = _config(epochs=2)
    run_train(config, run, quiet=True)
    log = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(log.splitlines(keepends=True)[0])  # the last epoch's row lost
    results = run_train(config, run, resume=True, quiet=True)
    assert (run / "metrics.jsonl").read_text() == log
    assert results["ba"] == json.loads(log.splitlines()[-1])["ba"]


def test_channels_last_changes_the_layout_not_the_training(tmp_path):
    runs = {cl: run_train(_config(epochs=1, channels_last=cl), tmp_path / str(cl), quiet=True) for cl in (False, True)}
    assert runs[True]["ba"] == pytest.approx(runs[False]["ba"], abs=0.02)
    loss = {cl: _rows(tmp_path / str(cl))[0]["loss"] for cl in runs}
    assert loss[True] == pytest.approx(loss[False], rel=1e-3)  # the same sums in another order
    weights = load_file(tmp_path / "True" / "model.safetensors")
    assert all(weights[k].is_contiguous() for k in weights)  # files hold the standard layout


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "flags, where",
    [
        ([], "training diverged in epoch 1"),
        (["--defense", "vab"], "training diverged in V&B stage A epoch 1"),
        (["--defense", "vab", "--lr", "0.05", "--set", "vab.victim_lr=1e30"], "training diverged in victim warm-up"),
    ],
)
def test_a_diverging_run_stops_with_one_line_and_leaves_no_result(tmp_path, capsys, flags, where):
    run = tmp_path / "run"
    common = ["--dataset", "synthetic", "--attack", "badnets", "--model", "small-cnn", "--epochs", "2"]
    argv = ["train", *common, "--lr", "1e9", "--batch-size", "64", "--threads", "1", "--quiet", *flags]
    code, _, err = run_cli(capsys, *argv, "--out", str(run))
    assert_one_line_error(code, err, where)
    assert "lr" in err.strip().splitlines()[-1]  # it names the setting to look at
    assert not (run / "model.safetensors").exists() and not (run / "results.json").exists()
    rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    assert all("NaN" not in row and "Infinity" not in row for row in rows)


def test_every_epoch_draws_its_own_shuffle_and_augmentation_and_a_rerun_draws_them_again():
    """Epoch e's generator is seeded by (seed, e): epochs differ from one another (a generator stuck at one state
    would show every epoch the same batches and crops) and a resumed epoch repeats its draws exactly."""
    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 4)
    config = TrainConfig(model="small-cnn", batch_size=8, epochs=3, device="cpu")
    seen: list[torch.Tensor] = []

    def recording(images, generator):
        seen.append(images.clone())
        return images.flip(-1) if torch.rand((), generator=generator) < 0.5 else images

    def first_batches(epochs):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
        trainer = Trainer(model, config, torch.device("cpu"), recording, steps=5)
        batches = []
        for epoch in epochs:
            seen.clear()
            trainer.train_epoch(data, epoch, quiet=True)
            batches.append(torch.stack(seen))
        return batches

    one, two, three = first_batches([1, 2, 3])
    assert not torch.equal(one, two) and not torch.equal(two, three)
    (again,) = first_batches([2])
    assert torch.equal(again, two)
