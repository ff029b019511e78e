import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from bdguard.attacks import AttackConfig
from bdguard.data import DataConfig, load_dataset
from bdguard.data.base import DataBundle
from bdguard.defenses import DefenseConfig, TrainingJob, build_defense
from bdguard.defenses.vab import defense as vab_defense
from bdguard.errors import BdguardError
from bdguard.io import read_json
from bdguard.models import load_model
from bdguard.runs.train import RunConfig, run_train
from bdguard.training import TrainConfig
from tiny_models import training_job

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
    epochs = 4
    results = _run(tmp_path, "vab", epochs, {"name": "vab", "params": VAB})
    out = tmp_path / "vab"
    assert results["asr"] < 0.1 and results["ba"] > 0.75, results
    # the Victim is backdoored on purpose: the trigger is learned at this setting, and kept out of the Beneficiary
    assert results["vab"]["victim"]["asr"] > 0.9
    detector, split = results["detector"], results["vab"]["split"]
    assert detector["tpr"] > 0.9 and detector["fpr"] < 0.25 and detector["auroc"] > 0.85, detector
    assert split["rounds"] == 3 + epochs  # warm-up rounds + one update after every epoch at this budget
    assert set(results["vab"]["seconds_by_stage"]) == {"warm_up", "stage_a", "stage_b", "victim", "evaluation"}
    assert read_json(out / "results.json")["detector"] == detector

    rows = [line.split(",") for line in (out / "suspicious.csv").read_text().splitlines()]
    assert rows[0] == ["index", "normalised_entropy", "suspicious"] and len(rows) == 2001
    assert [int(r[0]) for r in rows[1:]] == list(range(2000))
    entropy = torch.tensor([float(r[1]) for r in rows[1:]])
    flagged = torch.tensor([r[2] == "yes" for r in rows[1:]])
    assert {r[2] for r in rows[1:]} == {"yes", "no"} and int(flagged.sum()) == detector["flagged"]
    assert float(entropy.min()) == 0.0 and float(entropy.max()) == 1.0
    assert float(entropy[flagged].max()) <= 0.2 + 1e-6 and float(entropy[~flagged].min()) >= 0.2 - 1e-6  # tau

    png = (out / "entropy_hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 3 * height  # one panel per key round, side by side

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["A", "A", "B", "B"]
    assert metrics[-1]["asr"] == results["asr"] and metrics[-1]["victim_ba"] == results["vab"]["victim"]["ba"]
    assert {"loss_mix", "loss_u", "alpha", "suppression_weight_clean", "pseudo_attacker_label_poisoned"} <= set(
        metrics[-1]
    )
    assert metrics[-1]["detector"]["round"] == split["rounds"]
    assert len((out / "detector.jsonl").read_text().splitlines()) == split["rounds"]
    victim, meta = load_model(out / "victim.safetensors")
    assert meta.architecture == "small-cnn" and "Victim" in meta.extra["role"]


def _job(
    bundle: DataBundle, run_dir, train: TrainConfig, fingerprint: str, resume: bool = False, rate: float = 0.1
) -> TrainingJob:
    """A V&B job on `bundle` poisoned by ATTACK at `rate`."""
    return training_job(bundle, AttackConfig(**{**ATTACK, "rate": rate}), train, run_dir, fingerprint, resume)


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
    train = TrainConfig(**{**TRAIN, "batch_size": 32, "epochs": 2, "device": "cpu"})
    return _job(bundle, run_dir, train, fingerprint, resume)


def _defense():
    return build_defense(DefenseConfig(name="vab", params={**VAB, "victim_batch_size": 32}))


def test_vab_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = _defense().train(_small_job(tmp_path / "straight")).model

    original = vab_defense.stage_b_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vab_defense, "stage_b_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _defense().train(_small_job(tmp_path / "resumed"))
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1  # stage A's epoch 1
    monkeypatch.setattr(vab_defense, "stage_b_epoch", original)
    resumed = _defense().train(_small_job(tmp_path / "resumed", resume=True)).model

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


def _easy_class_job(run_dir, easy: int = 5) -> TrainingJob:
    """The synthetic set with one clean class made easy (most of its images carry a tenth of the usual noise), then
    BadNets: the Victim is as sure of those images as of the trigger, as it is of most of Fashion-MNIST's trousers.
    20 % poison, so that as on Fashion-MNIST and CIFAR-10 the target label's flagged samples are mostly poison (at
    10 % this set's target class is itself easy, and its flagged samples are half clean)."""
    full = load_dataset(DataConfig(dataset="synthetic"))

    def flatten(split):
        images = split.images.clone()
        chosen = (split.labels == easy).nonzero().squeeze(1)
        quiet = chosen[: len(chosen) * 3 // 4]  # the rest keep the usual noise: the class stays learnable from C
        prototype = images[chosen].float().mean(dim=0)
        images[quiet] = (prototype + 0.1 * (images[quiet].float() - prototype)).round().to(torch.uint8)
        return type(split)(images, split.labels)

    bundle = DataBundle(
        full.name, flatten(full.train), flatten(full.test), full.classes, full.mean, full.std, full.flip, full.source
    )
    train = TrainConfig(**{**TRAIN, "epochs": 4, "device": "cpu", "lr": 0.05, "schedule": "onecycle"})
    return _job(bundle, run_dir, train, "easy", rate=0.15)


def _split(tmp_path, name: str, **params) -> tuple[TrainingJob, dict, torch.Tensor]:
    job = _easy_class_job(tmp_path / name)
    params = {"victim_batch_size": 64, "victim_min_steps": 0, **params}  # 31 Victim steps an epoch
    result = build_defense(DefenseConfig(name="vab", params=params)).train(job)
    results = {**job.evaluate(result.model), "detector": result.detector, **result.details}
    rows = [line.split(",") for line in (tmp_path / name / "suspicious.csv").read_text().splitlines()[1:]]
    return job, results, torch.tensor([r[2] == "yes" for r in rows])


def _record_unlearning(patch: pytest.MonkeyPatch, seen: list[torch.Tensor]) -> None:
    """Stage B's unlearning epochs append the suspicious samples they reach to `seen`."""
    original = vab_defense.unlearn_epoch

    def recorded(ben, data, credible, suspicious, *args):
        seen.append(suspicious.clone())
        return original(ben, data, credible, suspicious, *args)

    patch.setattr(vab_defense, "unlearn_epoch", recorded)


@pytest.fixture(scope="module")
def global_split(tmp_path_factory) -> tuple[TrainingJob, dict, torch.Tensor, list[torch.Tensor]]:
    """The easy-class set under the Victim's global split (no attacked label: stage B falls back to suppression),
    shared by the split tests; and the suspicious sets stage B unlearned (none, in a fallback)."""
    seen: list[torch.Tensor] = []
    with pytest.MonkeyPatch.context() as patch:
        _record_unlearning(patch, seen)
        job, results, flagged = _split(tmp_path_factory.mktemp("split"), "global", split_rule="global")
    return job, results, flagged, seen


def _share(mask: torch.Tensor, within: torch.Tensor) -> float:
    return float(mask[within].float().mean())


def _easy_and_relabelled(poisoned) -> tuple[torch.Tensor, torch.Tensor]:
    """The easy class's clean samples; the poison relabelled (the target class's own poisoned images keep their
    true label, as a clean-label trigger's would)."""
    easy = (poisoned.original_labels == 5) & ~poisoned.poison_mask
    return easy, poisoned.poison_mask & (poisoned.original_labels != poisoned.train.labels)


def test_the_refined_split_hands_an_easy_clean_class_back_and_keeps_the_poison(tmp_path, global_split):
    job, plain, flagged, _ = global_split
    _, refined, suspicious = _split(tmp_path, "refined", split_rule="global", refine=True, refine_until=1.0)
    easy, relabelled = _easy_and_relabelled(job.poisoned)
    # the Victim alone (its training never depends on the Beneficiary) loses most of the easy class to S ...
    assert refined["split"]["flagged_by_victim"] == plain["detector"]["flagged"] == int(flagged.sum())
    assert _share(flagged, easy) > 0.5, _share(flagged, easy)
    # ... the Beneficiary takes that class back and none of the relabelled poison the Victim caught
    assert _share(suspicious, easy) < 0.1, _share(suspicious, easy)
    assert _share(suspicious, relabelled) >= _share(flagged, relabelled) - 0.01
    assert refined["detector"]["fpr"] < plain["detector"]["fpr"] / 2
    # and the target label stays flagged as a whole: none of it goes back, poison or not
    target = job.poisoned.train.labels == 0
    assert bool((suspicious[target] == flagged[target]).all())


def test_the_label_rule_keeps_an_easy_clean_class_credible_and_the_poison_suspicious(tmp_path, global_split):
    """On the same set: the check model finds label 0 attacked from the flagged samples' content and every flag
    outside it goes back to C, with no Beneficiary in the loop; inside label 0, the Victim's own flags keep the
    poison suspicious, and the default's Otsu cut keeps the label's clean samples credible too."""
    job, plain, flagged, _ = global_split
    _, inside, suspicious = _split(tmp_path, "inside", label_within="global")
    _, default, cut = _split(tmp_path, "otsu")
    easy, relabelled = _easy_and_relabelled(job.poisoned)
    clean_target = (job.poisoned.train.labels == 0) & ~job.poisoned.poison_mask
    assert _share(flagged, easy) > 0.5, _share(flagged, easy)
    for results, split in ((inside, suspicious), (default, cut)):
        assert results["split"]["attacked_labels"] == [0]
        assert not split[job.poisoned.train.labels != 0].any()
        assert _share(split, easy) == 0.0
    assert _share(suspicious, relabelled) >= 0.95, _share(suspicious, relabelled)
    assert inside["detector"]["fpr"] < plain["detector"]["fpr"] / 2
    # Otsu's cut: fewer of the target's clean samples, most of the poison, and a clean model at the end
    assert _share(cut, clean_target) < _share(suspicious, clean_target) / 2, _share(cut, clean_target)
    assert _share(cut, relabelled) >= 0.8, _share(cut, relabelled)
    assert default["asr"] < 0.05 and default["ba"] >= plain["ba"], (default, plain)


@pytest.mark.parametrize("stage_b", ["unlearn", "relabel"])
def test_stage_b_unlearns_only_the_suspicious_samples_the_check_model_disputes(
    tmp_path, monkeypatch, global_split, stage_b
):
    """On the easy-class set (label 0 found attacked): stage B's loss on S reaches only the suspicious samples the
    check model puts in another class, nearly all of them relabelled poison, and never the target label's clean
    samples the check model agrees with; the model ends clean. With the global split (no attacked label) stage B
    falls back to the reference's suppression."""
    seen: list[torch.Tensor] = []
    _record_unlearning(monkeypatch, seen)
    job, results, split = _split(tmp_path, stage_b, stage_b=stage_b)
    _, relabelled = _easy_and_relabelled(job.poisoned)
    assert len(seen) == 2 and seen[-1].numel() > 0  # both stage B epochs
    reached = torch.zeros_like(split)
    reached[torch.cat(seen).unique()] = True
    assert not (reached & ~split).any()  # only suspicious samples ...
    # ... most of them poison: the check model disputes some of the target's clean samples too, how many depends
    # on the CPU's arithmetic (0.80 poison on an AVX-512 Xeon, above 0.9 on the machine this test was written on)
    assert _share(relabelled, reached) >= 0.75, _share(relabelled, reached)
    assert _share(reached, relabelled) >= 0.6, _share(reached, relabelled)
    assert results["asr"] < 0.05, results
    rows = [json.loads(line) for line in (tmp_path / stage_b / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("unlearned") for row in rows] == [None, None, seen[0].numel(), seen[1].numel()]

    if stage_b == "unlearn":  # the default: the shared global run is its fallback
        _, fallback, _, seen = global_split
    else:
        seen.clear()
        _, fallback, _ = _split(tmp_path, "global", split_rule="global", stage_b=stage_b)
    assert seen == [] and fallback["split"]["attacked_labels"] == []


def test_refinement_freezes_after_its_share_of_the_run(tmp_path, monkeypatch):
    """refine_until 0.5 of 4 epochs: the Beneficiary's agreement is asked before epoch 2 only; from epoch 3 on, what
    it took back then stays in C and the rest of the Victim's (updated) flagged set is suspicious."""
    calls = []
    original = vab_defense.label_agreement

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(vab_defense, "label_agreement", counted)
    job = _easy_class_job(tmp_path / "run")
    params = {
        "victim_batch_size": 64,
        "victim_min_steps": 0,
        "split_rule": "global",
        "refine": True,
        "refine_until": 0.5,
    }
    build_defense(DefenseConfig(name="vab", params=params)).train(job)
    assert len(calls) == 1
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    flagged, taken_back = state["flagged"], state["taken_back"]
    rows = (tmp_path / "run" / "suspicious.csv").read_text().splitlines()[1:]
    suspicious = torch.tensor([row.endswith(",yes") for row in rows])
    assert taken_back.any() and torch.equal(suspicious, flagged & ~taken_back)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["returned"] > 0 for r in rows] == [False, True, True, True]
