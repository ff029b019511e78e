"""ANP on a model whose answer is known: the tiny BadNets small-cnn loses its backdoor, the functional forward is the
model's own, pruning zeroes what the authors zero, the model's BatchNorm statistics survive the mask search."""

import copy
import json

import pytest
import torch
from torch import nn

from bdguard.defenses import DefenseConfig, PostTrainingDefense, RepairJob, build_defense
from bdguard.defenses.anp import (
    AnpParams,
    PerturbedNetwork,
    bn_layers,
    neurons_to_prune,
    optimise_masks,
    prune_neurons,
)
from bdguard.errors import BdguardError
from bdguard.models.base import BackdoorModel
from bdguard.runs.repair import ProbeConfig, split_probe
from bdguard.training import TrainConfig
from tiny_models import backdoored, data, repair_job

pytestmark = pytest.mark.usefixtures("one_thread")

# Tuned for the tiny model only. 100 updates of 64 images instead of the authors' 2000 of 128 (about 3 s here). On
# this 224-neuron net the search settles with the backdoor's neurons at masks of about 0.3-0.6, not below the
# authors' 0.2: measured with 1000 updates of 128, mask <= 0.2 held 3 neurons and left the ASR at 1.0, while
# mask <= 0.5 held 8 and took it to 0.06. So the test prunes at 0.6: 11-16 neurons, ASR 0 over five seeds.
FAST = {"iterations": 100, "batch_size": 64, "threshold": 0.6}
BA_MARGIN = 0.05  # the repaired model may lose at most 5 points of BA (measured: none)


def _job(run_dir=None) -> RepairJob:
    """The backdoored tiny model (a copy) with a 200-image probe held out of the synthetic test set."""
    probe, rest = split_probe(data().test, ProbeConfig(size=200, seed=0))
    # no crops or flips: the tiny model was trained without them, so cropped images would look foreign to it
    return repair_job(
        probe, rest, TrainConfig(model="small-cnn", batch_size=32, augment=False, device="cpu", threads=1), run_dir
    )


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".running_" in k or "num_batches" in k}


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """One ANP repair of the tiny model: (the job, its model's state before, the metrics before and after, the
    extra results, the run folder)."""
    folder = tmp_path_factory.mktemp("anp")
    job = _job(folder)
    state = copy.deepcopy(job.model.state_dict())
    before = job.evaluate(job.model)
    defense = build_defense(DefenseConfig("anp", FAST))
    assert isinstance(defense, PostTrainingDefense)
    result = defense.repair(job)
    extra = {"pruned_fraction": result.pruned_fraction, "anp": result.details}
    return job, state, before, job.evaluate(result.model), extra, folder


def test_anp_removes_the_planted_backdoor_and_keeps_accuracy(repaired):
    job, _, before, after, extra, _ = repaired
    assert before["asr"] > 0.8, before
    assert after["asr"] < before["asr"] / 2 and after["asr"] < 0.2, (before, after)
    assert after["ba"] >= before["ba"] - BA_MARGIN, (before, after)
    summary = extra["anp"]
    assert summary["neurons"] == 32 + 64 + 128 and summary["layers"] == 3  # small-cnn's BatchNorm neurons
    assert 0 < summary["pruned"] < summary["neurons"] / 4
    assert extra["pruned_fraction"] == summary["pruned"] / summary["neurons"]
    assert summary["threshold"] == FAST["threshold"] and not job.model.training


def test_anp_chooses_backdoor_neurons_not_just_any(repaired):
    """Zeroing as many randomly chosen BN weights mostly leaves the backdoor working: ANP found the right ones."""
    job, state, _, _, extra, _ = repaired
    model = copy.deepcopy(job.model)
    model.load_state_dict(state)
    layers = bn_layers(model)
    original = [bn.weight.detach().clone() for _, bn in layers]
    neurons, pruned = extra["anp"]["neurons"], extra["anp"]["pruned"]
    generator = torch.Generator().manual_seed(0)
    asr = []
    for _ in range(10):
        drop = torch.zeros(neurons, dtype=torch.bool)
        drop[torch.randperm(neurons, generator=generator)[:pruned]] = True
        prune_neurons(layers, original, drop)
        asr.append(job.evaluate(model)["asr"])
    assert sum(asr) / len(asr) > 0.5, asr


def test_the_run_folder_records_masks_pruned_neurons_and_the_curve(repaired):
    _, _, _, _, extra, folder = repaired
    report = json.loads((folder / "anp.json").read_text())
    assert report["threshold"] == FAST["threshold"] and report["params"]["iterations"] == FAST["iterations"]
    assert [layer["bn"] for layer in report["layers"]] == ["body.0.1", "body.2.1", "body.4.1"]
    for layer in report["layers"]:
        assert len(layer["mask"]) == layer["neurons"] and all(0.0 <= m <= 1.0 for m in layer["mask"])
        assert layer["pruned"] == [k for k, m in enumerate(layer["mask"]) if m <= FAST["threshold"]]
    assert sum(len(layer["pruned"]) for layer in report["layers"]) == extra["anp"]["pruned"]

    curve = [json.loads(line) for line in (folder / "curve.jsonl").read_text().splitlines()]
    thresholds = [row["threshold"] for row in curve]
    assert thresholds == sorted(thresholds) and thresholds[0] == 0.0 and FAST["threshold"] in thresholds
    assert all({"fraction", "ba", "asr", "ra", "probe_acc"} <= row.keys() for row in curve)
    chosen = next(row for row in curve if row["threshold"] == FAST["threshold"])
    assert chosen["fraction"] == extra["pruned_fraction"]
    assert (folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_pruned_bn_weights_change(repaired):
    """Running statistics, biases and every other tensor are the model's own; pruned neurons' BN weights are 0."""
    job, state, _, _, extra, folder = repaired
    after = job.model.state_dict()
    pruned = {layer["bn"]: layer["pruned"] for layer in json.loads((folder / "anp.json").read_text())["layers"]}
    for key, value in state.items():
        layer, _, kind = key.rpartition(".")
        if layer in pruned and kind == "weight":
            expected = value.clone()
            expected[pruned[layer]] = 0.0
            assert torch.equal(after[key], expected), key
        else:
            assert torch.equal(after[key], value), key
    assert sum(len(p) for p in pruned.values()) == extra["anp"]["pruned"] > 0


def test_the_mask_search_leaves_the_model_as_it_was():
    job = _job()
    model = job.model
    state = copy.deepcopy(model.state_dict())
    masks = optimise_masks(model, job.probe, AnpParams(iterations=5, batch_size=16), None, seed=0, quiet=True)
    assert masks.shape == (224,) and float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    assert float(masks.min()) < 1.0  # the masks did move
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert not model.training and not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

    again = optimise_masks(model, job.probe, AnpParams(iterations=5, batch_size=16), None, seed=0, quiet=True)
    assert torch.equal(again, masks)  # seeded
    plain = optimise_masks(model, job.probe, AnpParams(iterations=3, batch_size=16, eps=0.0), None, 0, quiet=True)
    assert plain.shape == masks.shape and not torch.equal(plain, masks)  # eps 0: the clean loss alone


def test_the_perturbed_forward_with_unit_masks_and_no_noise_is_the_model():
    model = copy.deepcopy(backdoored()[0])
    net = PerturbedNetwork(model, bn_layers(model))
    x = data().test.images[:32].float() / 255
    ones, zeros = torch.ones(net.neurons), torch.zeros(net.neurons)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(net(x, ones), expected)
        assert torch.equal(net(x, ones, (zeros, zeros)), expected)

        # batch statistics: the model's own forward with its BN layers in training mode, buffers kept
        state = _bn_state(model)
        with net.batch_statistics():
            batch = net(x, ones)
            assert all(bn.training for _, bn in bn_layers(model))
        assert not any(m.training for m in model.modules())
        assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
        twin = copy.deepcopy(model)
        for _, bn in bn_layers(twin):
            bn.train()
        assert torch.allclose(batch, twin(x), atol=1e-6) and not torch.allclose(batch, expected, atol=1e-3)

        # a zero mask is a zeroed BN weight; the noise scales the weight by m + δ and the bias by 1 + ξ
        first = bn_layers(model)[0][1]
        mask = ones.clone()
        mask[:5] = 0.0
        twin = copy.deepcopy(model)
        bn_layers(twin)[0][1].weight[:5] = 0.0
        assert torch.allclose(net(x, mask), twin(x), atol=1e-6)
        delta, xi = torch.full((net.neurons,), 0.3), torch.full((net.neurons,), -0.2)
        twin = copy.deepcopy(model)
        for _, bn in bn_layers(twin):
            bn.weight.mul_(1.3)
            bn.bias.mul_(0.8)
        assert torch.allclose(net(x, ones, (delta, xi)), twin(x), atol=1e-5)
        assert torch.equal(first.weight, bn_layers(backdoored()[0])[0][1].weight)  # the model's own untouched


def test_pruning_zeroes_the_bn_weight_and_keeps_the_bias():
    """The authors' `pruning` sets `<bn>.weight[k]` to 0 and nothing else; another choice restores the rest."""
    model = copy.deepcopy(backdoored()[0])
    layers = bn_layers(model)
    original = [bn.weight.detach().clone() for _, bn in layers]
    biases = [bn.bias.detach().clone() for _, bn in layers]
    drop = torch.zeros(224, dtype=torch.bool)
    drop[[0, 31, 32, 223]] = True  # the first and last neuron of layer 0, the first of layer 1, the last of layer 2
    prune_neurons(layers, original, drop)
    weights = [bn.weight.detach() for _, bn in layers]
    assert weights[0][[0, 31]].eq(0).all() and weights[1][0] == 0 and weights[2][127] == 0
    assert int(sum(w.eq(0).sum() for w in weights)) == 4
    assert all(torch.equal(bn.bias, b) for (_, bn), b in zip(layers, biases, strict=True))
    prune_neurons(layers, original, torch.zeros(224, dtype=torch.bool))
    assert all(torch.equal(bn.weight, w) for (_, bn), w in zip(layers, original, strict=True))


def test_which_neurons_are_pruned():
    mask = torch.tensor([0.5, 0.2, 0.0, 0.9, 0.2, 0.1])
    assert neurons_to_prune(mask, AnpParams(threshold=0.2)).tolist() == [False, True, True, False, True, True]
    assert neurons_to_prune(mask, AnpParams(threshold=0.0)).tolist() == [False, False, True, False, False, False]
    by_fraction = neurons_to_prune(mask, AnpParams(prune_by="fraction", fraction=0.5))
    assert by_fraction.tolist() == [False, True, True, False, False, True]  # ties: the earlier neuron first


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"eps": -0.1}, r"anp\.eps must be in \[0\.0, inf\]"),
        ({"threshold": 1.5}, r"anp\.threshold must be in \[0\.0, 1\.0\]"),
        ({"threshold": -0.01}, r"anp\.threshold must be in \[0\.0, 1\.0\]"),
        ({"alpha": 1.2}, r"anp\.alpha must be in \[0\.0, 1\.0\]"),
        ({"iterations": 0}, r"anp\.iterations must be in \[1, inf\]"),
        ({"steps": 0}, r"anp\.steps must be in \[1, inf\]"),
        ({"lr": 0.0}, r"anp\.lr must be a finite number > 0"),
        ({"fraction": 2.0}, r"anp\.fraction must be in \[0\.0, 1\.0\]"),
        ({"prune_by": "number"}, r"anp\.prune_by must be one of threshold, fraction"),
    ],
)
def test_bad_params_are_refused_by_name(params, fragment):
    with pytest.raises(BdguardError, match=fragment):
        build_defense(DefenseConfig("anp", params))


class NoBatchNorm(BackdoorModel):
    def __init__(self) -> None:
        super().__init__(10, 3, [0.0] * 3, [1.0] * 3, feature_channels=8)
        self.conv = nn.Conv2d(3, 8, 3)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_a_model_without_batchnorm_is_refused():
    job = _job()
    job.model = NoBatchNorm().eval()
    with pytest.raises(BdguardError, match="anp needs a model with BatchNorm layers .*NoBatchNorm has none"):
        build_defense(DefenseConfig("anp", FAST)).repair(job)
