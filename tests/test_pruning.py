"""The pruning defenses on models whose answer is known: a hand-built backdoor, masks on every architecture, CLP's
Conv->BN pairs, the probe split."""

import json

import pytest
import torch
from torch import nn

from bdguard.data import DataConfig, load_dataset
from bdguard.data.base import DataBundle, ImageSet, TriggeredSet
from bdguard.defenses import DEFENSES, DefenseConfig, PostTrainingDefense, RepairJob, build_defense
from bdguard.defenses.common import fine_tune
from bdguard.defenses.pruning import clp, triggers
from bdguard.defenses.pruning.core import MaskedSet, choose_k, pruned_mask, rank_channels
from bdguard.defenses.pruning.params import PruneParams
from bdguard.errors import BdguardError
from bdguard.models import ModelMeta, build_model, load_model, save_model
from bdguard.models.base import BackdoorModel
from bdguard.runs.repair import ProbeConfig, split_probe
from bdguard.training import Evaluator, TrainConfig, predict

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = 3
PLANTED = 7  # the trigger channel of `Planted`


def stamp(images: torch.Tensor) -> torch.Tensor:
    """The planted trigger: a white 4x4 square in the bottom-right corner."""
    out = images.clone()
    out[..., -4:, -4:] = 255
    return out


class Planted(BackdoorModel):
    """A backdoor built by hand. Channels 0-6 are seeded zero-sum 3x3 filters (blind to flat regions); channel 7
    averages its 3x3x3 window and fires only above 0.9, which a white patch reaches and noise images never do;
    the classifier sends channel 7 to TARGET with a large weight."""

    def __init__(self) -> None:
        super().__init__(10, 3, [0.0] * 3, [1.0] * 3, feature_channels=8)
        self.conv = nn.Conv2d(3, 8, 3)
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(7, 3, 3, 3, generator=generator)
        with torch.no_grad():
            self.conv.weight[:PLANTED] = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
            self.conv.bias[:PLANTED] = 0.5
            self.conv.weight[PLANTED] = 100.0 / 27
            self.conv.bias[PLANTED] = -90.0
            self.fc.weight.copy_(torch.randn(10, 8, generator=generator))
            self.fc.bias.zero_()  # its default init is unseeded and decides the predictions once k passes k*
            self.fc.weight[:, PLANTED] = 0.0
            self.fc.weight[TARGET, PLANTED] = 200.0

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def raise_if_called(images: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the real trigger was read")


def planted_job(oracle=stamp, run_dir=None, probe_size: int = 100) -> RepairJob:
    """Noise images labelled by the model itself (BA 1 before pruning); the first `probe_size` are the probe."""
    model = Planted().eval()
    images = torch.randint(0, 256, (400, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = predict(model, images)
    probe, test = ImageSet(images[:probe_size], labels[:probe_size]), ImageSet(images[probe_size:], labels[probe_size:])
    keep = test.labels != TARGET
    triggered = TriggeredSet(stamp(test.images[keep]), test.labels[keep], torch.full_like(test.labels[keep], TARGET))
    bundle = DataBundle("noise", probe, test, tuple(map(str, range(10))), (0.0,) * 3, (1.0,) * 3, False, "test")
    return RepairJob(
        model=model,
        bundle=bundle,
        probe=probe,
        oracle=oracle,
        target=TARGET,
        evaluate=Evaluator(test, triggered),
        train=TrainConfig(batch_size=32, threads=1),
        device=torch.device("cpu"),
        run_dir=run_dir,
        quiet=True,
        seed=0,
    )


def repair(name: str, job: RepairJob, **params) -> dict:
    defense = build_defense(DefenseConfig(name, params))
    assert isinstance(defense, PostTrainingDefense) and defense.stage == "post-training"
    result = defense.repair(job)
    return {**job.evaluate(result.model), **result.details, "pruned_fraction": result.pruned_fraction}


def test_the_planted_backdoor_works():
    job = planted_job()
    assert job.evaluate(job.model) == {"ba": 1.0, "asr": 1.0, "ra": 0.0}


def test_oracle_linf_ranks_the_planted_channel_first_and_pruning_it_removes_the_backdoor(tmp_path):
    job = planted_job(run_dir=tmp_path)
    result = repair("linf-prune", job, trigger="oracle")
    assert result["pruned"] == [PLANTED] and result["k_reason"] == "probe ASR target"
    assert result["asr"] == 0.0 and result["ba"] > 0.95
    assert result["trigger_target"] == TARGET  # found from the model's answers, not from the job
    assert job.model.feature_mask.tolist() == [1.0] * 7 + [0.0]
    # channel 7 never fires on clean images: pruning it costs no BA, and ASR falls from 1 to 0 in the first step
    assert result["curve"] == {"asr_at_ba_drop_2": 0.0, "asr_at_ba_drop_5": 0.0, "asr_area": pytest.approx(1 / 16)}

    report = json.loads((tmp_path / "pruning.json").read_text())
    planted = report["per_channel"][PLANTED]
    assert planted["rank"] == 0 and planted["pruned"] and planted["linf_auroc"] == 1.0
    assert planted["linf_diff"] > 5 and planted["linf_mean_clean"] == 0.0
    assert sum(row["pruned"] for row in report["per_channel"]) == 1
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [row["k"] for row in curve] == list(range(6))  # 0 to 60% of 8 channels
    assert curve[0]["asr"] == 1.0 and curve[0]["probe_asr"] == 1.0 and curve[1]["asr"] == 0.0
    assert {"ba", "asr", "ra", "probe_acc", "probe_asr", "fraction"} <= set(curve[1])
    for png in ("curve.png", "norms.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_fixed_budgets_and_the_score_variants():
    for params in ({"budget": "count", "count": 2}, {"budget": "fraction", "fraction": 0.25}):
        result = repair("linf-prune", planted_job(), trigger="oracle", **params)
        assert result["k"] == 2 and PLANTED in result["pruned"] and result["asr"] == 0.0
    for score in ("trig", "rel", "z"):
        assert repair("linf-prune", planted_job(), trigger="oracle", score=score)["pruned"] == [PLANTED]
    with pytest.raises(BdguardError, match="has 8 channels"):
        repair("linf-prune", planted_job(), trigger="oracle", budget="count", count=9)


class FakeReversed:
    """What Neural Cleanse returns, with the planted trigger found exactly."""

    target = TARGET

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return stamp(images)

    def to_json(self) -> dict:
        return {"target": TARGET, "anomaly_index": 4.0}


def test_reverse_never_reads_the_real_trigger(monkeypatch):
    monkeypatch.setattr(triggers, "reverse_engineer", lambda model, images, params, quiet: FakeReversed())
    result = repair("linf-prune", planted_job(oracle=raise_if_called))
    assert result["trigger"] == "reverse" and result["pruned"] == [PLANTED] and result["asr"] == 0.0
    assert result["neural_cleanse"]["anomaly_index"] == 4.0


def test_reverse_with_the_real_neural_cleanse_never_reads_the_real_trigger():
    result = repair("linf-prune", planted_job(oracle=raise_if_called), nc_steps=10)
    assert result["trigger"] == "reverse" and result["trigger_target"] == result["neural_cleanse"]["target"]
    assert result["k"] <= 4  # max_fraction 0.5 of 8 channels


def test_oracle_needs_an_attack_with_a_trigger():
    with pytest.raises(BdguardError, match="trigger=oracle needs"):
        repair("linf-prune", planted_job(oracle=None), trigger="oracle")


def test_rankings_are_a_function_of_the_seed():
    first = repair("linf-prune", planted_job(), trigger="oracle", budget="count", count=4)["pruned"]
    assert repair("linf-prune", planted_job(), trigger="oracle", budget="count", count=4)["pruned"] == first
    summaries = {"inf": {"mean_clean": torch.zeros(128)}}
    orders = [
        rank_channels(DEFENSES.get("random-prune")(DefenseConfig("random-prune", {"seed": s})).score(summaries), live)
        for s, live in ((0, torch.ones(128, dtype=torch.bool)),) * 2 + ((1, torch.ones(128, dtype=torch.bool)),)
    ]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_rank_ties_keep_the_lower_index_and_masked_channels_go_last():
    score = torch.tensor([1.0, 3.0, 3.0, 0.0, 5.0])
    live = torch.tensor([True, True, True, True, False])
    assert rank_channels(score, live).tolist() == [1, 2, 0, 3, 4]


def test_clean_only_variants_prune_quiet_channels_first():
    # channel 7 never fires on clean images: the dormant-first orders take it first
    result = repair("linf-prune", planted_job(), trigger="none", budget="count", count=1)
    assert result["pruned"] == [PLANTED] and result["order"] == "clean linf mean, ascending"
    result = repair("fine-pruning", planted_job(), budget="count", count=1, finetune_epochs=0)
    assert result["pruned"] == [PLANTED] and result["probe_after"]["probe_asr"] is None
    result = repair("random-prune", planted_job(), fraction=0.5)
    assert result["k"] == 4 and result["trigger"] == "none"


def test_auto_stops_at_the_probe_accuracy_tolerance():
    # without a trigger, auto prunes in the given order until clean probe accuracy has dropped by the tolerance
    job = planted_job()
    result = repair("l1-prune", job, trigger="none", max_ba_drop=0.0, max_fraction=1.0)
    assert result["k_reason"] == "probe accuracy drop"
    assert result["probe_after"]["probe_acc"] == 1.0  # the last k before any drop


@pytest.mark.parametrize("name", ["small-cnn", "alexnet", "resnet20", "resnet18", "preact-resnet18"])
def test_masking_zeroes_exactly_the_chosen_channels(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, [0.5] * 3, [0.25] * 3).eval()
    x = torch.rand(4, 3, 16, 16)
    k = model.feature_channels
    chosen = torch.tensor([0, 5, k - 1])
    kept = torch.ones(k, dtype=torch.bool)
    kept[chosen] = False
    with torch.no_grad():
        before = model.features(x)
        images = (x * 255).round().to(torch.uint8)
        masked_set = MaskedSet(model, images, 256)
        model.feature_mask.copy_(pruned_mask(model.feature_mask, chosen))
        after = model.features(x)
    assert before[:, chosen].abs().sum() > 0  # they were active
    assert after[:, chosen].abs().max() == 0 and torch.equal(after[:, kept], before[:, kept])
    # the pooled shortcut the curves use gives exactly the masked model's predictions
    assert torch.equal(masked_set.predict(model.feature_mask), predict(model, images))

    meta = ModelMeta(name, {}, 10, list(map(str, range(10))), [3, 16, 16], [0.5] * 3, [0.25] * 3, "test")
    save_model(model, tmp_path / "m.safetensors", meta)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    assert torch.equal(loaded.feature_mask, model.feature_mask)


def test_pruned_channels_stay_zero_under_fine_tuning():
    data = load_dataset(DataConfig(dataset="synthetic"))
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 3, data.mean, data.std).eval()
    chosen = torch.tensor([1, 2, 64])
    model.feature_mask.copy_(pruned_mask(model.feature_mask, chosen))
    probe = data.test.subset(torch.arange(96))
    cpu = torch.device("cpu")
    job = RepairJob(
        model, data, probe, None, None, Evaluator(probe, None), TrainConfig(batch_size=32), cpu, None, True, 0
    )
    assert "feature_mask" not in dict(model.named_parameters())  # a buffer: no optimiser sees it
    weights = model.fc.weight.detach().clone()
    history = fine_tune(job, epochs=2, lr=0.05, seed=0)
    assert len(history) == 2 and not torch.equal(model.fc.weight, weights) and not model.training
    with torch.no_grad():
        maps = model.features(probe.images.float() / 255)
    assert maps[:, chosen].abs().max() == 0 and maps.abs().sum() > 0
    assert model.feature_mask[chosen].tolist() == [0.0] * 3


@pytest.mark.parametrize(
    "name, expected",
    [
        ("small-cnn", [("body.0.0", "body.0.1"), ("body.2.0", "body.2.1"), ("body.4.0", "body.4.1")]),
        ("resnet20", None),
        ("resnet18", None),
        ("preact-resnet18", None),
    ],
)
def test_clp_pairs_every_bn_that_follows_a_conv(name, expected):
    model = build_model(name, 10, 3, [0.5] * 3, [0.25] * 3)
    pairs = [(p.conv_name, p.bn_name) for p in clp.conv_bn_pairs(model, torch.rand(1, 3, 16, 16))]
    if name == "small-cnn":
        assert pairs == expected
    elif name == "preact-resnet18":
        # the stem feeds the first block's bn1; inside blocks only conv1 -> bn2; later bn1s and the last bn see sums
        blocks = [f"layers.{i}.{j}" for i in range(4) for j in range(2)]
        assert pairs == [("conv1", "layers.0.0.bn1")] + [(f"{b}.conv1", f"{b}.bn2") for b in blocks]
    else:
        stages, blocks = (3, 3) if name == "resnet20" else (4, 2)
        shortcuts = [(f"layers.{i}.0.shortcut.0", f"layers.{i}.0.shortcut.1") for i in range(1, stages)]
        assert pairs[0] == ("conv1", "bn1") and set(shortcuts) <= set(pairs)
        assert len(pairs) == 1 + 2 * stages * blocks + len(shortcuts)
        assert all(conv.replace("conv", "bn") == bn for conv, bn in pairs if "shortcut" not in conv)


def test_clp_prunes_an_outlier_channel_by_zeroing_its_bn(tmp_path):
    job = planted_job(run_dir=tmp_path)
    data = load_dataset(DataConfig(dataset="synthetic"))
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 3, data.mean, data.std).eval()
    with torch.no_grad():
        model.body[4][0].weight[9] *= 20  # a channel with an outsized Lipschitz bound, as backdoor channels have
    job.model = model
    result = build_defense(DefenseConfig("clp", {})).repair(job)
    model, extra = result.model, result.details
    bn = model.body[4][1]
    assert bn.weight[9] == 0 and bn.bias[9] == 0 and extra["pruned_channels"] >= 1
    report = json.loads((tmp_path / "pruning.json").read_text())
    assert 9 in report["layers"][2]["pruned"] and report["layers"][2]["bn"] == "body.4.1"
    with torch.no_grad():
        assert model.features(torch.rand(2, 3, 16, 16))[:, 9].abs().max() == 0  # Conv-BN-ReLU: exactly zero
    assert (tmp_path / "curve.jsonl").exists() and (tmp_path / "norms.png").exists()


def test_the_probe_is_a_seeded_share_of_the_test_set_disjoint_from_the_rest():
    images = torch.zeros(50, 1, 2, 2, dtype=torch.uint8)
    test = ImageSet(images, torch.arange(50))  # labels as identities
    probe, rest = split_probe(test, ProbeConfig(size=20, seed=3))
    ids, rest_ids = set(probe.labels.tolist()), set(rest.labels.tolist())
    assert len(ids) == 20 and not ids & rest_ids and ids | rest_ids == set(range(50))
    assert torch.equal(split_probe(test, ProbeConfig(size=20, seed=3))[0].labels, probe.labels)
    assert not torch.equal(split_probe(test, ProbeConfig(size=20, seed=4))[0].labels, probe.labels)
    with pytest.raises(BdguardError, match="leaves no test images"):
        split_probe(test, ProbeConfig(size=50))


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"budget": "fraction"}, "needs linf-prune.fraction"),
        ({"budget": "count"}, "needs linf-prune.count"),
        ({"max_fraction": 2}, "linf-prune.max_fraction must be in [0.0, 1.0]"),
        ({"norm": "3"}, "linf-prune.norm must be one of inf, 2, 1"),
        ({"trigger": "real"}, "linf-prune.trigger must be one of"),
        ({"colour": 1}, "unknown setting 'linf-prune.colour'"),
    ],
)
def test_bad_params_are_refused_by_name(params, fragment):
    with pytest.raises(BdguardError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        build_defense(DefenseConfig("linf-prune", params))


def test_auto_budget_stops_at_the_first_k_whose_asr_is_at_the_target_and_before_an_accuracy_fall():
    params = PruneParams(asr_target=0.125, max_ba_drop=0.25)  # values a float holds exactly
    rows = [{"probe_acc": 1.0, "probe_asr": asr} for asr in (0.95, 0.40, 0.125, 0.05)]
    assert choose_k(rows, params, limit=3) == (2, "probe ASR target")  # exactly at the target counts
    rows[2]["probe_asr"] = 0.1250001
    assert choose_k(rows, params, limit=3) == (3, "probe ASR target")
    assert choose_k(rows, params, limit=2) == (2, "max_fraction")
    rows[2]["probe_acc"] = 0.75  # a drop of exactly max_ba_drop is allowed ...
    assert choose_k(rows, params, limit=3) == (3, "probe ASR target")
    rows[2]["probe_acc"] = 0.74  # ... a larger one keeps the k before it
    assert choose_k(rows, params, limit=3) == (1, "probe accuracy drop")
