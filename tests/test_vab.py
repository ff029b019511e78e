import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bdguard.attacks import AttackConfig, build_attack
from bdguard.data import DataConfig, load_dataset
from bdguard.data.augment import Augment
from bdguard.data.base import ImageSet, PoisonedSet
from bdguard.defenses import DEFENSES, DefenseConfig, build_defense
from bdguard.defenses.vab import PRESETS, VabParams, make_vab_schedule, threshold
from bdguard.defenses.vab.attention_mix import attention_map, attention_mix
from bdguard.defenses.vab.beneficiary import (
    Beneficiary,
    _unlabelled_forward,
    label_agreement,
    stage_a_epoch,
    stage_b_epoch,
    unlearn_epoch,
)
from bdguard.defenses.vab.labels import (
    LabelGuard,
    LabelRule,
    attacked_labels,
    class_balanced,
    disputed,
    diverse_contradictions,
    label_split,
    look_alikes,
    otsu_low,
)
from bdguard.defenses.vab.report import split_metrics
from bdguard.defenses.vab.suppression import (
    of_labels,
    pseudo_targets,
    soft_cross_entropy,
    suppress,
    unlearning_loss,
    victim_beliefs,
)
from bdguard.defenses.vab.victim import EntropyDetector, entropy_scores, entropy_split, victim_epoch, victim_logits
from bdguard.errors import BdguardError
from bdguard.models import build_model
from bdguard.training import TrainConfig, evaluate
from bdguard.training.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = Runtime(torch.device("cpu"), amp=False, channels_last=False, quiet=True)


def _params(settings: dict) -> VabParams:
    """V&B's settings as `--set vab.KEY=VALUE` gives them: strings over the named preset's."""
    return build_defense(DefenseConfig(name="vab", params=settings)).params


PAPER = _params({"preset": "paper"})


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- AttentionMix ---------------------------------------------------------------------------------------------------


def test_attention_map_is_min_max_normalised_per_sample_and_upsampled():
    features = torch.rand(3, 8, 2, 2, generator=_generator())
    nearest = attention_map(features, (4, 4), "nearest")
    assert nearest.shape == (3, 1, 4, 4)
    assert torch.allclose(nearest.amin(dim=(1, 2, 3)), torch.zeros(3))
    assert torch.allclose(nearest.amax(dim=(1, 2, 3)), torch.ones(3))
    # nearest: each feature cell becomes a constant 2x2 block, ordered like the channel sums of squares
    assert torch.equal(nearest[:, :, ::2, ::2], nearest[:, :, 1::2, 1::2])
    raw = features.pow(2).sum(1)
    assert torch.equal(nearest[:, 0, ::2, ::2].flatten(1).argmin(1), raw.flatten(1).argmin(1))
    bilinear = attention_map(features, (4, 4), "bilinear")
    assert torch.allclose(bilinear.amin(dim=(1, 2, 3)), torch.zeros(3))
    assert not torch.equal(bilinear, nearest)


def test_attention_mix_invariants():
    n, k = 8, 5
    g = _generator(1)
    images = torch.rand(n, 3, 8, 8, generator=g)
    attention = attention_map(torch.rand(n, 16, 2, 2, generator=g), (8, 8))
    targets = F.softmax(torch.randn(n, k, generator=g), dim=1)
    partner = torch.randperm(n, generator=g)
    mixed, mixed_targets, region = attention_mix(images, attention, targets, 0.1, partner)

    outside = (attention < 0.1).expand_as(images)
    assert outside.any()
    assert torch.equal(mixed[outside], images[outside])  # untouched, bit for bit
    weakest = attention.flatten(1).argmin(1)  # the min-attention cell is 0 after normalisation: never mixed
    flat = mixed.flatten(2)[torch.arange(n), :, weakest]
    assert torch.equal(flat, images.flatten(2)[torch.arange(n), :, weakest])
    assert torch.allclose(mixed_targets.sum(1), torch.ones(n))  # label weights sum to 1
    assert (mixed_targets >= 0).all()
    assert 0.0 < float(region) < 1.0
    # inside the region a pixel lies between the image and its partner's
    inside = ~outside
    low = torch.minimum(images, images[partner])[inside]
    high = torch.maximum(images, images[partner])[inside]
    assert ((mixed[inside] >= low - 1e-6) & (mixed[inside] <= high + 1e-6)).all()


def test_attention_mix_matches_hand_computed_values():
    # two 1-channel 2x2 images, swapped as partners, threshold 0.1
    attention = torch.tensor([[1.0, 0.0], [0.05, 0.45], [0.5, 0.0], [0.5, 1.0]]).view(2, 1, 2, 2)
    images = torch.tensor([0.9, 0.3]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    targets = torch.eye(2)
    mixed, mixed_targets, region = attention_mix(images, attention, targets, 0.1, torch.tensor([1, 0]))
    # image 0: M = cells (0,0), (1,1); W = 1.45 / 1.5 = 29/30; V = (0.5 + 1) / 2 = 3/4
    w0, v0 = 29 / 30, 3 / 4
    rho0, sigma0 = w0 / (w0 + v0), v0 / (w0 + v0)
    # image 1: M = cells (0,0), (1,0), (1,1); W = 1; V = (1 + 0.05 + 0.45) / 1.5 = 1
    rho1 = sigma1 = 0.5
    a, b = rho0 * 0.9 + sigma0 * 0.3, rho1 * 0.3 + sigma1 * 0.9
    expected = torch.tensor([[a, 0.9], [0.9, a], [b, 0.3], [b, b]]).view(2, 1, 2, 2)
    assert torch.allclose(mixed, expected, atol=1e-6)
    taken0, taken1 = w0 * sigma0, 1.0 * sigma1  # lambda3 = W - W rho = W sigma
    expected_targets = torch.tensor([[1 - taken0, taken0], [taken1, 1 - taken1]])
    assert torch.allclose(mixed_targets, expected_targets, atol=1e-6)
    assert float(region) == pytest.approx(5 / 8)


# -- stage B targets ------------------------------------------------------------------------------------------------


def test_suppression_of_labelled_targets():
    k = 10
    labels = torch.tensor([3, 7])
    onehot = F.one_hot(labels, k).float()
    assert torch.equal(suppress(onehot, onehot), torch.zeros(2, k))  # the Victim already says the label: nothing left
    uniform = torch.full((2, k), 1 / k)
    assert torch.allclose(suppress(onehot, uniform), (1 - 1 / k) * onehot)
    # a very high temperature flattens any Victim to uniform
    beliefs = victim_beliefs(torch.randn(2, k, generator=_generator()) * 5, temperature=1e6)
    assert torch.allclose(suppress(onehot, beliefs), (1 - 1 / k) * onehot, atol=1e-5)
    # targets are not renormalised: the loss weighs the sample by 1 - q_label
    logits = torch.randn(2, k, generator=_generator(1))
    half = suppress(onehot, 0.5 * onehot)
    assert soft_cross_entropy(logits, half) == pytest.approx(0.5 * float(F.cross_entropy(logits, labels)), rel=1e-5)


def test_pseudo_targets_are_the_argmax_of_two_views_and_split_ties():
    a = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    b = torch.tensor([[0.1, 0.8, 0.1], [0.5, 0.5, 0.0]])
    assert torch.equal(pseudo_targets(a, b), torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))


# -- schedules ------------------------------------------------------------------------------------------------------


def test_the_paper_schedule_at_200_epochs():
    params = PAPER
    schedule = make_vab_schedule(200, params)
    assert schedule.stage_a == 100
    assert schedule.victim_updates == tuple(range(5, 101, 5)) + tuple(range(101, 201))
    assert schedule.lr_drops == (51, 101, 151)
    assert [schedule.lr_factor(e, 0.1) for e in (1, 50, 51, 100, 101, 151, 200)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.001, 0.001]
    )
    assert schedule.alpha_switch == 151
    assert [schedule.alpha(e, params) for e in (101, 150, 151, 200)] == [0.1, 0.1, 0.5, 0.5]
    assert [schedule.stage(e) for e in (1, 100, 101, 200)] == ["A", "A", "B", "B"]
    # 1 full-data Victim epoch + 2 warm-up rounds + 120 updates: 123 scoring rounds, as in the reference code
    assert params.warm_up + len(schedule.victim_updates) == 123


def test_rescaled_schedules():
    params = PAPER
    s30 = make_vab_schedule(30, params)
    assert (s30.stage_a, s30.lr_drops, s30.alpha_switch) == (15, (9, 16, 24), 24)
    assert s30.victim_updates == tuple(range(1, 31))  # 20 stage-A updates cannot be sparser than every epoch
    s60 = make_vab_schedule(60, params)
    in_a = [u for u in s60.victim_updates if u <= 30]
    assert len(in_a) == 20 and in_a[:4] == [2, 3, 5, 6] and in_a[-1] == 30
    assert s60.victim_updates[20:] == tuple(range(31, 61))
    assert (s60.lr_drops, s60.alpha_switch) == ((16, 31, 46), 46)
    s400 = make_vab_schedule(400, params)
    assert s400.victim_updates == tuple(range(10, 201, 10)) + tuple(range(202, 401, 2))
    assert (s400.lr_drops, s400.alpha_switch) == ((101, 201, 301), 301)
    tiny = make_vab_schedule(1, params)
    assert (tiny.stage_a, tiny.victim_updates) == (1, (1,))


def test_thresholds_per_scoring_round():
    assert [threshold(r, VabParams()) for r in range(1, 6)] == [0.6, 0.2, 0.2, 0.2, 0.2]
    longer = VabParams(warm_up=5, tau_warm=(0.7, 0.4), tau=0.1)
    assert [threshold(r, longer) for r in range(1, 7)] == [0.7, 0.4, 0.4, 0.4, 0.1, 0.1]
    assert threshold(1, VabParams(warm_up=1)) == 0.2


# -- the Victim's detector ------------------------------------------------------------------------------------------


class _Planted(torch.nn.Module):
    """Peaked logits for images whose first pixel is bright (the planted samples), near-flat ones otherwise."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 0] = 20 * x[:, 0, 0, 0]
        logits[:, 1] = 2 * x[:, 0, 1, 1]  # some spread among the others
        return logits


def _planted_set(n: int = 40) -> tuple[ImageSet, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=_generator(), dtype=torch.uint8)
    planted = torch.zeros(n, dtype=torch.bool)
    planted[::7] = True
    images[:, 0, 0, 0] = torch.where(planted, 255, 0).to(torch.uint8)
    return ImageSet(images, torch.zeros(n, dtype=torch.long)), planted


def _poisoned(data: ImageSet, mask: torch.Tensor) -> PoisonedSet:
    return PoisonedSet(data, mask, torch.zeros_like(mask), data.labels, {})


def test_the_split_catches_planted_low_entropy_samples():
    data, planted = _planted_set()
    scores = entropy_scores(victim_logits(_Planted(), data.images, 16, CPU))  # batches of 16: 40 is not a multiple
    assert scores.shape == (40,) and torch.isfinite(scores).all()
    detector = EntropyDetector(ema=0.75)
    normalised = detector.update(scores)
    assert float(normalised.min()) == 0.0 and float(normalised.max()) == 1.0
    suspicious = entropy_split(normalised, 0.2)
    assert torch.equal(suspicious, planted)
    report = split_metrics(normalised, suspicious, _poisoned(data, planted))
    assert report["tpr"] == 1.0 and report["fpr"] == 0.0 and report["precision"] == 1.0
    assert report["residual"] == 0.0 and report["auroc"] == 1.0
    assert (report["suspicious"], report["credible"]) == (6, 34)
    # the sign is checked: calling the confident samples clean gives AUROC 0
    assert split_metrics(normalised, suspicious, _poisoned(data, ~planted))["auroc"] == 0.0


def test_entropy_history_is_an_ema_of_raw_scores():
    detector = EntropyDetector(ema=0.75)
    first, second = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 2.0, 0.0])
    detector.update(first)
    normalised = detector.update(second)
    history = 0.75 * second + 0.25 * first
    assert torch.allclose(detector.history, history)
    assert torch.allclose(normalised, (history - history.min()) / (history.max() - history.min()))
    assert detector.rounds == 2
    flat = EntropyDetector(ema=0.75)
    assert not entropy_split(flat.update(torch.ones(5)), 0.2).any()  # equal scores carry no signal: nothing flagged


def test_entropy_of_a_certain_prediction_is_zero_not_nan():
    class Certain(torch.nn.Module):
        def forward(self, x):
            logits = torch.full((x.shape[0], 10), float("-inf"))
            logits[:, 0] = 0.0
            return logits

    scores = entropy_scores(victim_logits(Certain(), torch.zeros(3, 1, 2, 2, dtype=torch.uint8), 8, CPU))
    assert torch.equal(scores, torch.zeros(3))


# -- guards: empty sets and tiny suspicious sets --------------------------------------------------------------------


def LR(done: float) -> float:
    return 0.01


def _beneficiary(n: int = 24) -> tuple[Beneficiary, torch.nn.Module, ImageSet]:
    torch.manual_seed(0)
    net = build_model("small-cnn", 10, 3, (0.5,) * 3, (0.25,) * 3)
    victim = build_model("small-cnn", 10, 3, (0.5,) * 3, (0.25,) * 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    ben = Beneficiary(net, optimizer, Augment(1, True), 8, 10, VabParams(), CPU)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=_generator(), dtype=torch.uint8)
    return ben, victim, ImageSet(images, torch.arange(n) % 10)


def test_empty_and_tiny_sets_are_guarded():
    ben, victim, data = _beneficiary()
    everything, nothing = torch.arange(len(data)), torch.zeros(0, dtype=torch.long)
    before = [p.clone() for p in victim.parameters()]
    adam = torch.optim.Adam(victim.parameters())
    assert victim_epoch(victim, adam, data, nothing, 8, _generator(), CPU, "") is None
    assert all(torch.equal(a, b) for a, b in zip(before, victim.parameters(), strict=True))
    assert stage_a_epoch(ben, data, nothing, _generator(), "", LR) == {"loss": None, "mixed_region": None}

    # |S| = 1 < floor(|C| / B) + 1 iterations: B_u = max(1, 0) = 1 and S is cycled
    logits = victim_logits(victim, data.images, 8, CPU)
    result = stage_b_epoch(ben, logits, data, everything[1:], everything[:1], 0.5, _generator(), "", LR)
    assert result.metrics["loss_u"] is not None and math.isfinite(result.metrics["loss"])
    assert int(result.pseudo_label[0]) >= 0 and (result.pseudo_label[1:] == -1).all()
    assert torch.isnan(result.suppression_weight[0]) and not torch.isnan(result.suppression_weight[1:]).any()
    # empty S: no unlabelled loss; empty C: only the unlabelled loss
    no_s = stage_b_epoch(ben, logits, data, everything, nothing, 0.5, _generator(), "", LR)
    assert no_s.metrics["loss_u"] is None and math.isfinite(no_s.metrics["loss_mix"])
    no_c = stage_b_epoch(ben, logits, data, nothing, everything, 0.5, _generator(), "", LR)
    assert no_c.metrics["loss_mix"] is None and no_c.metrics["mixed_region"] is None
    assert math.isfinite(no_c.metrics["loss_u"])


# -- configuration --------------------------------------------------------------------------------------------------


def test_params_presets_and_validation():
    assert "vab" in DEFENSES
    defense = build_defense(DefenseConfig(name="vab", params={"preset": "cpu", "tau_warm": "0.5,0.1"}))
    assert defense.params.victim_model == "same" and defense.params.tau_warm == (0.5, 0.1)
    assert defense.params.victim_architecture("small-cnn") == "small-cnn"
    explicit = _params({"preset": "cpu", "victim_model": "resnet20"})
    assert explicit.victim_architecture("small-cnn") == "resnet20"
    assert VabParams().victim_architecture("small-cnn") == "small-cnn"
    assert PAPER.victim_architecture("small-cnn") == "resnet18"
    assert {"paper", "cpu", "smoke"} <= set(PRESETS) and PRESETS["paper"].epochs == 200
    for bad, match in (
        ({"preset": "fast"}, "defense vab has no preset 'fast'"),
        ({"ema": "0"}, "vab.ema"),
        ({"tau": "1.5"}, "vab.tau"),
        ({"victim_model": "resnet99"}, "unknown model"),
        ({"temperature": "0"}, "vab.temperature"),
        ({"upsample": "bicubic"}, "vab.upsample"),
        ({"tau_warm": ""}, "vab.tau_warm"),
        ({"views": "3"}, "vab.views"),
        ({"refine_confidence": "1.5"}, "vab.refine_confidence"),
        ({"tau": "nan"}, "vab.tau"),
        ({"lr_schedule": "cosine"}, "vab.lr_schedule"),
        ({"split_rule": "ruled"}, "vab.split_rule"),
        ({"check_epochs": "0"}, "vab.check_epochs"),
        ({"label_share": "2"}, "vab.label_share"),
        ({"check_flags": "some"}, "vab.check_flags"),
    ):
        with pytest.raises(BdguardError, match=match):
            _params(bad)


def test_the_paper_preset_is_the_reference_and_the_default_differs_only_where_listed():
    from bdguard.defenses.vab.config import REFERENCE

    for key, value in REFERENCE.items():
        assert getattr(PAPER, key) == value, key
        assert getattr(VabParams(), key) != value, f"{key}: the default equals the reference, drop it from REFERENCE"
    others = {f for f in VabParams.__dataclass_fields__ if f not in REFERENCE and f != "preset"}
    assert all(getattr(PAPER, f) == getattr(VabParams(), f) for f in others)
    assert PAPER.mix_share == 1.0 and PAPER.views == 2 and PAPER.lr_schedule == "vab"


def test_the_default_schedule_counts_victim_updates_in_this_runs_epochs():
    schedule = make_vab_schedule(30, VabParams())
    assert schedule.stage_a == 15
    # every 2nd epoch of each stage, counted from its start
    assert schedule.victim_updates == tuple(range(2, 15, 2)) + tuple(range(17, 30, 2))
    assert make_vab_schedule(10, VabParams(victim_every=3, victim_every_b=1)).victim_updates == (3, 6, 7, 8, 9, 10)


# -- the Beneficiary's epochs: lr, views, mixing share, reused logits ----------------------------------------------


def _recording_lr(seen: list[float]):
    def lr(done: float) -> float:
        seen.append(done)
        return 0.01

    return lr


def test_the_lr_is_asked_for_at_every_step_with_the_share_of_the_epoch_done():
    ben, victim, data = _beneficiary(n=24)  # batch 8: three steps
    seen: list[float] = []
    stage_a_epoch(ben, data, torch.arange(24), _generator(), "", _recording_lr(seen))
    assert seen == pytest.approx([0, 1 / 3, 2 / 3])
    assert ben.optimizer.param_groups[0]["lr"] == 0.01


def test_partial_mixing_leaves_the_unmixed_share_of_the_batch_as_it_was():
    ben, _, data = _beneficiary(n=16)
    ben.params = VabParams(mix_share=0.5)
    views = ben.views(data.images[:16], _generator())
    targets = F.one_hot(data.labels[:16], 10).float()
    ben.model.eval()  # a deterministic forward, so the loss can be recomputed by hand

    captured = {}
    original = ben.model.forward

    def spy(x):
        captured.setdefault("inputs", []).append(x.detach().clone())
        return original(x)

    ben.model.forward = spy
    loss, region = ben.mixed_loss(views, targets, _generator(5))
    inputs = torch.cat(captured["inputs"])
    changed = (inputs != views[0]).flatten(1).any(dim=1)
    assert 0 < int(changed.sum()) <= 8  # at most half of the batch is mixed
    assert float(region) <= 0.5
    none = VabParams(mix_share=0.0)
    ben.params = none
    captured.clear()
    plain, region = ben.mixed_loss(views, targets, _generator(5))
    assert torch.equal(torch.cat(captured["inputs"]), views[0]) and float(region) == 0.0
    expected = F.cross_entropy(original(views[0]), data.labels[:16])
    assert float(plain.detach()) == pytest.approx(float(expected.detach()))


def test_reused_logits_change_nothing_but_the_batchnorm_running_averages():
    results = {}
    for reuse in (False, True):
        ben, victim, data = _beneficiary(n=32)
        ben.params = VabParams(reuse_logits=reuse, views=2)
        logits = victim_logits(victim, data.images, 8, CPU)
        everything = torch.arange(32)
        result = stage_b_epoch(ben, logits, data, everything[8:], everything[:8], 0.5, _generator(), "", LR)
        results[reuse] = (result, {k: v.clone() for k, v in ben.model.state_dict().items()})
    (separate, weights_a), (reused, weights_b) = results[False], results[True]
    assert torch.equal(separate.pseudo_label, reused.pseudo_label)
    assert separate.metrics["loss"] == pytest.approx(reused.metrics["loss"], rel=1e-5)
    running = {k for k in weights_a if "running" in k or "num_batches" in k}
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_a if k not in running)
    assert any(not torch.equal(weights_a[k], weights_b[k]) for k in running)


def test_label_agreement_takes_back_what_the_network_predicts_as_labelled():
    class Reads(torch.nn.Module):
        """Predicts the class written in the first pixel, sure of it when the second pixel is bright."""

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            logits[torch.arange(x.shape[0]), (x[:, 0, 0, 0] * 255).round().long()] = 10 * x[:, 0, 0, 1] + 1
            return logits

    images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([3, 3, 5, 5, 7, 7], dtype=torch.uint8)  # what the image shows
    images[:, 0, 0, 1] = torch.tensor([255, 0, 255, 255, 255, 0], dtype=torch.uint8)  # how sure the network is
    labels = torch.tensor([3, 3, 0, 5, 7, 0])  # samples 2 and 5 relabelled to 0, like poison
    data = ImageSet(images, labels)
    index = torch.arange(6)
    assert label_agreement(Reads(), data, index, 4, CPU, 0.0).tolist() == [True, True, False, True, True, False]
    sure = label_agreement(Reads(), data, index, 4, CPU, 0.5).tolist()
    assert sure == [True, False, False, True, True, False]  # sample 1: right label, not sure enough
    assert label_agreement(Reads(), data, index[[2, 3]], 4, CPU, 0.0).tolist() == [False, True]


def test_stage_a_suppression_takes_away_what_the_victim_is_sure_of():
    ben, _, data = _beneficiary(n=24)
    sure = F.one_hot(data.labels, 10).float() * 1000  # a Victim certain of every given label
    before = {k: v.clone() for k, v in ben.model.named_parameters()}
    result = stage_a_epoch(ben, data, torch.arange(24), _generator(), "", LR, victim_logits=sure)
    assert result["loss"] == 0.0  # every target suppressed to zero: nothing to learn
    assert all(torch.equal(before[k], v) for k, v in ben.model.named_parameters())
    unsure = torch.zeros(24, 10)  # uniform beliefs: each target keeps 1 - 1/10 of its weight
    result = stage_a_epoch(ben, data, torch.arange(24), _generator(), "", LR, victim_logits=unsure)
    assert result["loss"] > 0 and any(not torch.equal(before[k], v) for k, v in ben.model.named_parameters())


def test_stage_b_suppresses_the_credible_targets_of_the_given_labels_only():
    ben, _, data = _beneficiary(n=32)
    sure = F.one_hot(data.labels, 10).float() * 1000  # a Victim certain of every given label
    everything = torch.arange(32)
    attacked = torch.zeros(10, dtype=torch.bool)
    attacked[int(data.labels[0])] = True
    result = stage_b_epoch(ben, sure, data, everything, everything[:0], 0.5, _generator(), "", LR, attacked)
    inside = data.labels == int(data.labels[0])
    assert inside.any() and (~inside).any()
    assert torch.all(result.suppression_weight[inside] == 0.0)  # the attacked label: suppressed to nothing
    assert torch.all(result.suppression_weight[~inside] == 1.0)  # the others: their full label
    everywhere = stage_b_epoch(ben, sure, data, everything, everything[:0], 0.5, _generator(), "", LR)
    assert torch.all(everywhere.suppression_weight == 0.0)  # no labels given: every label suppressed (the reference)


def test_of_labels_keeps_the_beliefs_of_the_suppressed_labels_only():
    beliefs = torch.full((3, 4), 0.25)
    labels = torch.tensor([0, 2, 3])
    kept = of_labels(beliefs, labels, torch.tensor([False, False, True, True]))
    assert kept.tolist() == [[0.0] * 4, [0.25] * 4, [0.25] * 4]
    assert of_labels(beliefs, labels, None) is beliefs


def test_stage_b_weighs_the_unlabelled_loss_by_alpha():
    ben, victim, data = _beneficiary(n=24)
    logits = victim_logits(victim, data.images, 8, CPU)
    nothing = torch.zeros(0, dtype=torch.long)
    for alpha in (0.1, 0.5):  # no credible samples: one step whose loss is alpha * L_u alone
        metrics = stage_b_epoch(ben, logits, data, nothing, torch.arange(24), alpha, _generator(), "", LR).metrics
        assert math.isclose(metrics["loss"], alpha * metrics["loss_u"], rel_tol=1e-6), metrics


def test_two_views_give_pseudo_labels_from_the_mean_of_both_views():
    ben, _, data = _beneficiary(n=64)
    ben.params = VabParams(views=2)
    ben.model.eval()  # the same logits for a view whichever batch it is in
    logits, guessed = _unlabelled_forward(ben, data.images, _generator(3), slice(None))
    first, second = F.softmax(logits.detach(), dim=1).split(64)
    assert torch.equal(guessed, pseudo_targets(first, second))
    assert not torch.equal(guessed, pseudo_targets(first))  # one view alone would answer otherwise here


# -- stage_b=unlearn --------------------------------------------------------------------------------------------------


def test_the_unlearning_loss_is_minus_log_one_minus_the_labels_probability_and_stays_finite():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [100.0, -100.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2, 1])
    p = F.softmax(logits.detach(), dim=1).gather(1, labels[:, None]).squeeze(1)
    loss = unlearning_loss(logits, labels)
    assert math.isclose(float(loss.detach()), float(-(1 - p).log().mean()), rel_tol=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0] > 0 and logits.grad[1, 2] > 0  # descent lowers the given label's logit
    sure = torch.tensor([[60.0, 0.0, 0.0]])  # p_label = 1 - 2e-26: large but finite, not inf
    far = float(unlearning_loss(sure, torch.tensor([0])))
    assert math.isfinite(far) and far > 50


def test_unlearning_or_relabelling_takes_out_a_trigger_that_residual_poison_taught_and_keeps_the_classes():
    """A Beneficiary that learned BadNets from the poison (as stage A does from the poison the split misses): stage
    B's loss on the suspicious samples (nine in ten of the poison; the tenth stays in C), their given label unlearned
    or their true class learned (as the check model gives it), takes the trigger out and keeps benign accuracy; the
    same epochs without that loss leave the backdoor in."""
    bundle = load_dataset(DataConfig(dataset="synthetic"))
    attack = build_attack(AttackConfig(name="badnets", target=0, rate=0.1, params={"patch_size": 4}), 10, (3, 16, 16))
    poisoned, triggered = attack.poison(bundle.train), attack.test_set(bundle.test)
    torch.manual_seed(0)
    net = build_model("small-cnn", 10, 3, bundle.mean, bundle.std)
    ben = Beneficiary(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), None, 64, 10, VabParams(), CPU)
    everything = torch.arange(len(poisoned.train))
    for epoch in range(2):
        stage_a_epoch(ben, poisoned.train, everything, _generator(epoch), "", lambda done: 0.05)
    assert evaluate(ben.model, bundle.test, triggered)["asr"] > 0.9

    poison = poisoned.poison_mask.nonzero().squeeze(1)
    suspicious = poison[len(poison) // 10 :]
    credible = everything[~torch.isin(everything, suspicious)]
    outcomes = {}
    for name, weight, relabel in (("none", 0.0, None), ("unlearn", 1.0, None), ("relabel", 1.0, bundle.train.labels)):
        trained = copy.deepcopy(ben)
        for epoch in range(2):
            args = (poisoned.train, credible, suspicious, weight, _generator(epoch), "", LR, relabel)
            unlearn_epoch(trained, *args)
        outcomes[name] = evaluate(trained.model, bundle.test, triggered)
    assert outcomes["none"]["asr"] > 0.5, outcomes  # the residual tenth keeps the backdoor alive ...
    for name in ("unlearn", "relabel"):  # ... unless the suspicious samples are tied to something else
        assert outcomes[name]["asr"] < 0.1, outcomes
        assert outcomes[name]["ba"] >= outcomes["none"]["ba"] - 0.03, outcomes


def test_stage_b_weighs_a_suspicious_sample_as_much_as_a_credible_one():
    """With 64 credible samples and 8 suspicious ones in one step, L = L_C + weight * 8/64 * L_S: `unlearn_weight`
    is per sample. Weighing the two batch means alike made every suspicious sample count eight times a credible one
    here (about nine times at 10 % poison) and cost the target class 40 test points on Blended (RESULTS, round five)."""
    bundle = load_dataset(DataConfig(dataset="synthetic"))
    torch.manual_seed(0)
    net = build_model("small-cnn", 10, 3, bundle.mean, bundle.std)
    ben = Beneficiary(net, torch.optim.SGD(net.parameters(), lr=0.0), None, 64, 10, VabParams(), CPU)
    credible, suspicious = torch.arange(64), torch.arange(64, 72)
    row = unlearn_epoch(ben, bundle.train, credible, suspicious, 2.0, _generator(0), "", lambda done: 0.0)
    expected = row["loss_mix"] + 2.0 * (8 / 64) * row["loss_unlearn"]
    assert row["loss"] == pytest.approx(expected, rel=1e-5), row


# -- the label rule (labels.py) -------------------------------------------------------------------------------------

RULE = LabelRule(share=0.3, min_share=0.0, check_flags="off", within="global", holds=False)


def _flags(plan: list[tuple[int, int, int]], n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, flagged, predicted) of `count` flagged samples per (label, predicted class, count) in `plan`, after
    `n` unflagged samples of label 9 that the check model gets right."""
    labels = [9] * n + [label for label, _, count in plan for _ in range(count)]
    predicted = [9] * n + [pred for _, pred, count in plan for _ in range(count)]
    flagged = [False] * n + [True] * (len(labels) - n)
    return torch.tensor(labels), torch.tensor(flagged), torch.tensor(predicted)


def test_a_label_whose_flags_show_many_classes_is_attacked_and_one_confused_with_one_class_is_not():
    # label 0: poison from six source classes and some clean target images; label 1: an easy class the check model
    # mostly knows, its mistakes all one look-alike; label 2: a label taken whole by one mistaken class
    plan = [(0, 0, 30)] + [(0, c, 20) for c in range(3, 9)] + [(1, 1, 150), (1, 2, 60), (2, 4, 80)]
    labels, flagged, predicted = _flags(plan)
    diverse, per_label = diverse_contradictions(labels, flagged, predicted, 10)
    assert diverse[:3].tolist() == [100, 0, 0] and per_label[:3].tolist() == [150, 210, 80]
    assert attacked_labels(labels, flagged, predicted, 10, RULE).nonzero().flatten().tolist() == [0]
    suspicious = label_split(flagged, labels, predicted, attacked_labels(labels, flagged, predicted, 10, RULE), RULE)
    assert torch.equal(suspicious, flagged & (labels == 0))
    # the share and the count are both needed
    assert not attacked_labels(labels, flagged, predicted, 10, LabelRule(0.7, 0.0, "off", "global", False)).any()
    assert not attacked_labels(
        labels, flagged, predicted, 10, LabelRule(0.3, 101 / labels.numel(), "off", "global", False)
    ).any()


def test_an_all_to_all_attack_singles_out_no_label_and_the_global_split_stands():
    # every label's poison from the class before it: each label's contradictions are one class
    plan = [(c, (c - 1) % 10, 40) for c in range(10)] + [(c, c, 60) for c in range(10)]
    labels, flagged, predicted = _flags(plan)
    attacked = attacked_labels(labels, flagged, predicted, 10, RULE)
    assert not attacked.any()
    assert torch.equal(label_split(flagged, labels, predicted, attacked, RULE), flagged)


def test_check_flags_add_the_contradicted_samples_of_attacked_labels_only():
    labels = torch.tensor([0, 0, 0, 1, 1])
    flagged = torch.tensor([True, False, False, True, False])
    predicted = torch.tensor([3, 4, 0, 1, 2])  # sample 1: poison the Victim missed; sample 4: a clean label's slip
    attacked = torch.tensor([True, False] + [False] * 8)
    with_checks = LabelRule(0.3, 0.0, check_flags="all", within="global", holds=False)
    assert label_split(flagged, labels, predicted, attacked, with_checks).tolist() == [True, True, False, False, False]
    assert label_split(flagged, labels, predicted, attacked, RULE).tolist() == [True, False, False, False, False]


def test_the_attacked_labels_are_sought_until_found_and_then_fixed():
    guard = LabelGuard(RULE, 10, [str(c) for c in range(10)])
    plan = [(0, c, 20) for c in range(3, 9)] + [(1, 1, 100)] + [(2, c, 20) for c in (3, 4)]
    labels, flagged, predicted = _flags(plan)
    guard.predicted = predicted
    entropy = torch.ones(labels.numel())  # the global rule inside a label does not read it
    early = flagged & (labels == 1)  # a first round in which nothing stands out: the global split
    assert torch.equal(guard.split(early, labels, entropy), early) and not guard.attacked.any()
    later = flagged & (labels != 2)
    assert torch.equal(guard.split(later, labels, entropy), flagged & (labels == 0))  # a later round finds label 0
    # label 2's flags, disputed between two classes, stand out in a still later round (as hard classes can late in
    # a run): the set found stays as it is, and label 0 stays attacked with none of its samples flagged
    last = flagged & (labels == 2)
    assert attacked_labels(labels, last, predicted, 10, RULE).nonzero().flatten().tolist() == [2]
    assert not guard.split(last, labels, entropy).any()
    assert guard.attacked.nonzero().flatten().tolist() == [0]


def test_class_balanced_draws_give_every_label_its_share():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    drawn = class_balanced(labels, torch.arange(1000), 3, _generator())
    shares = torch.bincount(labels[drawn], minlength=3).float() / drawn.numel()
    assert drawn.numel() == 1000 and bool(((shares - 1 / 3).abs() < 0.05).all()), shares


def test_the_victims_batch_shrinks_so_that_an_epoch_on_a_small_set_takes_enough_steps():
    default = VabParams()
    assert default.victim_batch(20000) == 128 and default.victim_batch(50000) == 128
    assert default.victim_batch(5000) == 50  # 100 steps instead of 39
    assert default.victim_batch(300) == 16  # never below 16
    assert VabParams(victim_batch_size=8).victim_batch(300) == 8  # nor above what was asked
    assert PAPER.victim_batch(5000) == 128  # the reference keeps its batch


def test_otsu_inside_an_attacked_label_keeps_its_sure_clean_samples_credible():
    """Label 0: poison at entropy 1e-4, clean samples at 1e-2 that the Victim flags too (sure of them as of the
    trigger, by the global threshold); the Otsu cut inside the label keeps only the poison."""
    labels = torch.tensor([0] * 10 + [1] * 5)
    poison = torch.tensor([True] * 4 + [False] * 11)
    entropy = torch.where(poison, 1e-4, 1e-2) * (1.0 + 0.01 * torch.arange(15))
    flagged = labels == 0  # the Victim's global flags: the whole label
    predicted = torch.where(poison, 3, labels)
    attacked = torch.tensor([True] + [False] * 9)
    otsu = LabelRule(0.3, 0.0, check_flags="all", within="otsu", holds=False)
    assert torch.equal(label_split(flagged, labels, predicted, attacked, otsu, entropy), poison)
    assert torch.equal(label_split(flagged, labels, predicted, attacked, RULE, entropy), flagged)
    assert otsu_low(torch.tensor([1.0, 1.1, 5.0, 5.2, 5.1])).tolist() == [True, True, False, False, False]


def test_the_check_models_agreement_holds_a_sure_clean_sample_of_an_attacked_label_credible():
    """Late in a run the Victim is as sure of some typical clean samples of the target label as of the poison, and
    Otsu's cut inside the label takes them in: those the check model puts in their label go back to the credible
    set, the poison (shown in its source classes) and the clean sample the check model disputes stay suspicious."""
    labels = torch.tensor([0] * 10 + [1] * 5)
    poison = torch.tensor([True] * 4 + [False] * 11)
    sure_clean = torch.tensor([False] * 4 + [True] * 3 + [False] * 8)  # as low as the poison; one disputed
    entropy = torch.where(poison | sure_clean, 1e-4, 1e-2) * (1.0 + 0.01 * torch.arange(15))
    flagged = labels == 0
    predicted = torch.where(poison, torch.tensor([3, 4, 5, 6] + [0] * 11), labels)
    predicted[6] = 2  # a clean target image the check model mistakes for another class
    attacked = torch.tensor([True] + [False] * 9)
    args = (flagged, labels, predicted, attacked)
    held = label_split(*args, LabelRule(0.3, 0.0, check_flags="all", within="otsu", holds=True), entropy)
    assert held.nonzero().flatten().tolist() == [0, 1, 2, 3, 6]
    loose = label_split(*args, LabelRule(0.3, 0.0, check_flags="all", within="otsu", holds=False), entropy)
    assert loose.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    # off by default (it hands back the poison made of the target's own images too); with no attacked label the
    # Victim's flags stand untouched
    assert not VabParams().label_rule().holds and VabParams(check_holds=True).label_rule().holds
    nothing = torch.zeros(10, dtype=torch.bool)
    holding = VabParams(check_holds=True).label_rule()
    assert torch.equal(label_split(flagged, labels, predicted, nothing, holding, entropy), flagged)


def test_unlearning_reaches_the_disputed_samples_and_with_diverse_not_those_put_in_the_look_alike():
    # label 0's clean samples are mistaken for class 2 (its look-alike); the flagged ones show classes 1, 2 and 3
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 2, 3])
    predicted = torch.tensor([0, 2, 2, 0, 1, 2, 3, 1, 2, 3])
    credible = torch.tensor([True, True, True, True, False, False, False, True, True, True])
    assert disputed(labels, predicted, credible, 4, diverse=False).tolist() == [0, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    assert disputed(labels, predicted, credible, 4, diverse=True).tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0]


def test_diverse_check_flags_leave_out_the_labels_look_alike():
    """Label 0's credible samples are mistaken for class 6 (its look-alike): unflagged samples put in class 6 stay
    credible, those put in any other class (poison from other sources) join S."""
    labels = torch.tensor([0] * 8 + [1] * 2)
    flagged = torch.tensor([True, True] + [False] * 8)
    predicted = torch.tensor([5, 3, 6, 6, 0, 0, 6, 4, 1, 1])  # 2, 3, 6: clean mistaken for 6; 7: poison from class 4
    attacked = torch.tensor([True] + [False] * 9)
    assert look_alikes(labels, predicted, ~flagged, 10)[0] == 6
    diverse = LabelRule(0.3, 0.0, check_flags="diverse", within="global", holds=False)
    expected = [True, True, False, False, False, False, False, True, False, False]
    assert label_split(flagged, labels, predicted, attacked, diverse).tolist() == expected
    all_checks = label_split(
        flagged, labels, predicted, attacked, LabelRule(0.3, 0.0, check_flags="all", within="global", holds=False)
    )
    assert all_checks.tolist() == [True, True, True, True, False, False, True, True, False, False]


def test_a_victim_that_flags_everything_leaves_no_check_model_and_the_global_split():
    bundle = load_dataset(DataConfig(dataset="synthetic"))
    data = bundle.train.subset(torch.arange(50))
    guard = LabelGuard(RULE, bundle.num_classes, bundle.classes)
    everything = torch.ones(50, dtype=torch.bool)
    guard.train_check(bundle, data, everything, TrainConfig(model="small-cnn", device="cpu"), 1, CPU)
    assert guard.predicted is None
    assert torch.equal(guard.split(everything, data.labels, torch.ones(50)), everything)
