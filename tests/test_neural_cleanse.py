import copy
import json
import math

import pytest
import torch

from bdguard.defenses import DefenseConfig, RepairJob, build_defense, neural_cleanse
from bdguard.defenses.neural_cleanse import (
    CostSchedule,
    NcParams,
    ReversedTrigger,
    anomaly_indices,
    flag_labels,
    reverse_engineer,
)
from bdguard.errors import BdguardError
from bdguard.training import TrainConfig
from tiny_models import TARGET, backdoored, data, patch_region, repair_job

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"steps": 100, "batch_size": 16}  # enough for the tiny model on one CPU thread


def _probe() -> torch.Tensor:
    return data().test.images[:200]


@pytest.fixture(scope="module")
def found() -> ReversedTrigger:
    model, _ = backdoored()
    return reverse_engineer(model, _probe(), NcParams(**FAST), quiet=True)


def test_reverse_engineer_recovers_the_planted_patch(found):
    assert found.target == TARGET and found.flagged[0] == TARGET and not found.fallback
    assert found.anomaly_index > 2
    assert len(found.norms) == 10 and min(found.norms) == found.norms[TARGET]
    assert found.mask.shape == (16, 16) and found.pattern.shape == (3, 16, 16)
    assert float(found.mask.min()) >= 0.0 and float(found.mask.max()) <= 1.0
    inside = float(found.mask[patch_region()].sum() / found.mask.sum())
    assert inside > 0.5, inside  # most of the mask lies on the real patch (1/16 of the image)
    assert found.reversed_asr > 0.8

    stamped = found.apply(_probe()[:5])
    assert stamped.dtype == torch.uint8 and stamped.shape == (5, 3, 16, 16)
    outside = ~found.region()
    assert torch.equal(stamped[:, :, outside & (found.mask < 1e-3)], _probe()[:5][:, :, outside & (found.mask < 1e-3)])
    report = json.loads(json.dumps(found.to_json(), allow_nan=False))
    assert report["target"] == TARGET and report["backdoored"] and report["labels_optimised"] == list(range(10))


def test_topk_optimises_only_the_cheapest_labels():
    model, _ = backdoored()
    found = reverse_engineer(model, _probe(), NcParams(**FAST, labels="topk", topk=3), quiet=True)
    optimised = [y for y, norm in enumerate(found.norms) if not math.isnan(norm)]
    assert len(optimised) == 3 and TARGET in optimised and found.target == TARGET
    report = found.to_json()
    assert report["labels_optimised"] == optimised
    assert sum(norm is None for norm in report["norms"]) == 7


def test_a_diverging_search_stops_with_a_message_not_a_nan_trigger():
    class Broken(torch.nn.Module):
        """A model file whose weights give NaN logits: every gradient of the trigger is NaN."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((), float("nan")))
            self.num_classes = 10

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.weight

    with pytest.raises(BdguardError, match=r"Neural Cleanse diverged after 5 steps.*learning rate \(lr = 0.1\)"):
        reverse_engineer(Broken(), _probe(), NcParams(steps=5, batch_size=8, early_stop=False), quiet=True)


def test_same_seed_same_trigger():
    model, _ = backdoored()
    params = NcParams(steps=15, batch_size=8, seed=4)
    first, second = (reverse_engineer(model, _probe(), params, quiet=True) for _ in range(2))
    assert torch.equal(first.mask, second.mask) and first.norms == second.norms


def test_cost_schedule_follows_neural_cleanse():
    schedule = CostSchedule(torch.zeros(2), init=1e-3, multiplier=2.0, patience=2)
    yes, mixed = torch.tensor([True, True]), torch.tensor([True, False])
    schedule.update(mixed)
    assert schedule.cost.tolist() == [0.0, 0.0]
    schedule.update(mixed)  # two successes in a row: the first problem starts its lambda
    assert schedule.cost.tolist() == pytest.approx([1e-3, 0.0])
    schedule.update(yes)  # one more success: patience 2 reached (the starting step counts as the first)
    assert schedule.cost[0] == pytest.approx(2e-3) and bool(schedule.went_up[0])
    schedule.update(torch.tensor([False, True]))
    schedule.update(torch.tensor([False, True]))  # two failures: lambda / 2^1.5
    assert schedule.cost[0] == pytest.approx(2e-3 / 2**1.5) and bool(schedule.went_down[0])
    assert schedule.cost[1] == pytest.approx(2e-3)  # started two steps later, then rose once on its own


def test_anomaly_index_and_flags():
    norms = torch.tensor([10.0, 11.0, 9.0, 10.5, 9.5, 2.0, math.nan], dtype=torch.float64)
    index = anomaly_indices(norms)
    median, mad = 9.75, 1.4826 * 0.75  # over the six finite norms
    assert index[5] == pytest.approx((median - 2.0) / mad) and math.isnan(index[6])
    assert flag_labels(norms, 2.0) == [5]
    assert flag_labels(torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64), 2.0) == []
    big = torch.tensor([1.0, 1.0, 1.0, 30.0], dtype=torch.float64)
    assert flag_labels(big, 2.0) == []  # an abnormally large trigger is not a backdoor
    assert anomaly_indices(big)[3] == math.inf  # zero MAD


def test_params_are_checked():
    with pytest.raises(BdguardError, match=r"nc\.steps must be in \[1, inf\]"):
        NcParams(steps=0)
    with pytest.raises(BdguardError, match=r"nc\.cost_multiplier must be > 1"):
        NcParams(cost_multiplier=1.0)
    with pytest.raises(BdguardError, match=r"nc\.topk must be in \[3, inf\]"):
        NcParams(labels="topk", topk=2)
    with pytest.raises(BdguardError, match=r"neural-cleanse\.unlearn_fraction must be in \[0\.0, 1\.0\]"):
        build_defense(DefenseConfig("neural-cleanse", {"unlearn_fraction": "1.5"}))
    with pytest.raises(BdguardError, match="neural-cleanse.labels must be one of all, topk"):
        build_defense(DefenseConfig("neural-cleanse", {"labels": "some"}))
    model, _ = backdoored()
    with pytest.raises(BdguardError, match="uint8"):
        reverse_engineer(model, _probe().float(), NcParams(steps=1))
    trigger = ReversedTrigger(0, 0.0, [], [0.0], torch.zeros(16, 16), torch.zeros(3, 16, 16), 0.0, True)
    with pytest.raises(BdguardError, match="uint8 images of shape"):
        trigger.apply(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def _job(run_dir) -> RepairJob:
    test = data().test
    probe, rest = test.subset(torch.arange(200)), test.subset(torch.arange(200, 500))
    return repair_job(probe, rest, TrainConfig(model="small-cnn", batch_size=32, device="cpu", threads=1), run_dir)


def test_defense_detects_and_unlearns(tmp_path, found, monkeypatch):
    job = _job(tmp_path)
    before = job.evaluate(job.model)
    assert before["asr"] > 0.95
    defense = build_defense(DefenseConfig("neural-cleanse", {**FAST, "unlearn_epochs": 2}))
    calls = []

    def reversal_done_above(model, images, params, quiet):  # the same reversal as `found`: saves its time
        calls.append((params.steps, params.batch_size, images.shape[0]))
        return found

    monkeypatch.setattr(neural_cleanse, "reverse_engineer", reversal_done_above)
    result = defense.repair(job)
    model, extra = result.model, result.details
    after = job.evaluate(model)
    assert calls == [(FAST["steps"], FAST["batch_size"], 200)]  # NC ran on the probe images, with the settings
    assert result.backdoor_flagged and extra["trigger"]["target"] == TARGET
    assert len(extra["unlearning"]) == 2 and not model.training
    assert after["asr"] < 0.2 and after["ba"] > 0.9, after
    assert extra["unlearned_probe_asr"] < extra["trigger"]["reversed_asr"]
    assert (tmp_path / "nc_trigger.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.undo()
    detect_only = build_defense(DefenseConfig("neural-cleanse", {"steps": 5, "mitigation": "none"}))
    job = _job(None)
    untouched = copy.deepcopy(job.model.state_dict())
    result = detect_only.repair(job)
    model, extra = result.model, result.details
    assert "unlearning" not in extra and all(torch.equal(untouched[k], v) for k, v in model.state_dict().items())
