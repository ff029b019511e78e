import pytest
import torch
import torch.nn.functional as F

import bdguard.attacks.surrogate as surrogate_module
import bdguard.attacks.trojan as trojan_module
from bdguard.attacks import AttackConfig, AttackContext, build_attack
from bdguard.attacks.pixels import REFERENCE_PATCH
from bdguard.attacks.surrogate import train_surrogate
from bdguard.data import load_dataset
from bdguard.data.augment import to_float
from bdguard.data.base import DataBundle, ImageSet
from bdguard.data.config import DataConfig
from bdguard.errors import BdguardError
from bdguard.models import build_model

SURROGATE = {"surrogate_model": "small-cnn", "surrogate_epochs": 1}
EPS = 16  # lc's default eps in pixel levels
TROJAN = {**SURROGATE, "steps": 50, "images": 32}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return load_dataset(DataConfig(dataset="synthetic"))  # 3x16x16, 200 train images per class


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return AttackContext(torch.device("cpu"), tmp_path_factory.mktemp("cache"), quiet=True)


def _attack(name, image_shape=(3, 16, 16), **kwargs):
    params = kwargs.pop("params", {})
    return build_attack(AttackConfig(name=name, params=params, **kwargs), 10, image_shape)


def _prepared(name, bundle, context, **kwargs):
    defaults = SURROGATE if name == "lc" else TROJAN
    attack = _attack(name, params={**defaults, **kwargs.pop("params", {})}, **kwargs)
    attack.prepare(bundle, context)
    return attack


@pytest.fixture(scope="module")
def lc(bundle, context):
    attack = _prepared("lc", bundle, context, target=1, rate=0.5, seed=3)
    return attack, attack.poison(bundle.train)


@pytest.fixture(scope="module")
def trojan(bundle, context):
    attack = _prepared("trojan", bundle, context, target=2, rate=0.1, seed=4)
    return attack, attack.poison(bundle.train)


def _loss(model, images, labels):
    with torch.no_grad():
        return F.cross_entropy(model(to_float(images)), labels).item()


def _tiny_bundle(n=300):
    g = torch.Generator().manual_seed(0)
    split = [
        ImageSet(torch.randint(0, 256, (m, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(m) % 10)
        for m in (n, 100)
    ]
    classes = tuple(str(i) for i in range(10))
    return DataBundle("tiny", *split, classes, (0.5,), (0.29,), False, "random (test)")


# ---- lc ---------------------------------------------------------------------------------------------------------


def test_lc_perturbs_exactly_rate_of_the_target_class_and_keeps_labels(bundle, lc):
    attack, poisoned = lc
    mask = poisoned.poison_mask
    target_count = int((bundle.train.labels == 1).sum())
    assert int(mask.sum()) == round(0.5 * target_count) == poisoned.manifest["poisoned"]
    assert (bundle.train.labels[mask] == 1).all()
    assert torch.equal(poisoned.train.labels, bundle.train.labels)
    assert torch.equal(poisoned.train.images[~mask], bundle.train.images[~mask])
    changed = (poisoned.train.images != bundle.train.images).flatten(1).any(1)
    assert torch.equal(changed, mask)
    assert poisoned.manifest["rate_meaning"] == "fraction of the target class" and not poisoned.cross_mask.any()


def test_lc_perturbation_stays_within_eps_and_the_patch_is_exact(bundle, lc):
    attack, poisoned = lc
    mask = poisoned.poison_mask
    clean, out = bundle.train.images[mask], poisoned.train.images[mask]
    diff = (out.int() - clean.int())[:, ~attack.mask]
    assert diff.abs().max() == EPS  # the budget is used, never exceeded (rounding keeps it exact)
    assert (diff != 0).float().mean() > 0.5
    assert torch.equal(out[:, attack.mask], attack.pattern[attack.mask].expand(out.shape[0], -1))
    expected = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(attack.pattern[:, 13:, 13:], expected.expand(3, 3, 3))
    assert attack.mask.sum() == 27
    # the stamped images are the PGD images with the patch on top
    assert torch.equal(out, attack.apply(attack.perturb(clean, bundle.train.labels[mask])))


def test_lc_pgd_raises_the_surrogate_loss_far_more_than_random_noise(bundle, context, lc):
    attack, poisoned = lc
    mask = poisoned.poison_mask
    clean, labels = bundle.train.images[mask], bundle.train.labels[mask]
    model, _ = train_surrogate(bundle, context, "small-cnn", 1)
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, clean.shape, generator=g) * 2 - 1
    noisy = (clean.int() + EPS * signs).clamp(0, 255).to(torch.uint8)
    base, random, adversarial = (_loss(model, x, labels) for x in (clean, noisy, attack.perturb(clean, labels)))
    assert adversarial > 3 * base and adversarial - base > 3 * (random - base)
    pgd = poisoned.manifest["pgd"]
    assert pgd["perturbed_loss"] > 3 * pgd["clean_loss"] and pgd["perturbed_loss"] == pytest.approx(adversarial)
    assert 0 <= pgd["perturbed_misclassified"] <= 1
    assert poisoned.manifest["surrogate"]["model"] == "small-cnn"
    assert 0.2 < poisoned.manifest["surrogate"]["test_accuracy"] <= 1  # learnt something in one epoch


def test_lc_test_images_get_the_patch_only(bundle, lc):
    attack, _ = lc
    triggered = attack.test_set(bundle.test)
    keep = bundle.test.labels != 1
    assert len(triggered) == int(keep.sum()) and (triggered.targets == 1).all()
    clean = bundle.test.images[keep]
    assert torch.equal(triggered.images, torch.where(attack.mask, attack.pattern, clean))


def test_lc_same_seed_same_set_and_the_surrogate_is_loaded_not_retrained(bundle, context, lc, monkeypatch, tmp_path):
    _, first = lc

    def no_training(*args, **kwargs):
        raise AssertionError("the surrogate was trained again")

    monkeypatch.setattr(surrogate_module, "fit", no_training)
    again = _prepared("lc", bundle, context, target=1, rate=0.5, seed=3).poison(bundle.train)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.poison_mask, first.poison_mask)
    other = _prepared("lc", bundle, context, target=1, rate=0.5, seed=4).poison(bundle.train)
    assert not torch.equal(other.poison_mask, first.poison_mask)
    fresh = AttackContext(torch.device("cpu"), tmp_path, quiet=True)
    with pytest.raises(AssertionError, match="trained again"):  # the guard bites where nothing is cached
        _prepared("lc", bundle, fresh)


def test_a_set_of_the_same_name_size_and_labels_but_other_images_gets_its_own_surrogate(bundle, context, monkeypatch):
    """The surrogate cache is keyed by the training set's contents: one changed pixel means a new surrogate."""
    trained = []
    monkeypatch.setattr(surrogate_module, "fit", lambda *args, **kwargs: trained.append(1) or [])
    images = bundle.train.images.clone()
    images[0, 0, 0, 0] ^= 1
    other = DataBundle(
        bundle.name,
        ImageSet(images, bundle.train.labels),
        bundle.test,
        bundle.classes,
        bundle.mean,
        bundle.std,
        bundle.flip,
        bundle.source,
    )
    _prepared("lc", other, context, target=1, rate=0.5, seed=3)
    assert trained == [1]  # the original set's surrogate, cached by the test above, was not taken


def test_lc_reduced_amplitude_four_corners_and_presets():
    grey = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    dim = _attack("lc", params={"amplitude": 16 / 255}).apply(grey)
    assert dim[0, 0, 13:, 13:].tolist() == [[116, 84, 116], [84, 116, 84], [116, 84, 116]]  # 100 +- 16
    turner = _attack("lc", params={"preset": "turner", "corners": 4})
    assert turner.mask[0].sum() == 36
    # Turner et al.'s trigger: bottom-right as in their code, mirrored at the left-hand corners
    bottom_right = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    assert turner.pattern[0, 13:, 13:].tolist() == bottom_right and turner.pattern[0, :3, 13:].tolist() == bottom_right
    mirrored = [row[::-1] for row in bottom_right]
    assert turner.pattern[0, :3, :3].tolist() == mirrored and turner.pattern[0, 13:, :3].tolist() == mirrored
    reference = _attack("lc", image_shape=(3, 32, 32), params={"preset": "reference"})
    assert reference.params.eps == 16 / 255 and reference.mask[0].sum() == 4
    assert reference.pattern[:, 4:6, 4:6].permute(1, 2, 0).reshape(4, 3).tolist() == [list(v) for v in REFERENCE_PATCH]


def test_lc_and_trojan_on_one_channel_28x28_images(context):
    tiny = _tiny_bundle()
    for name in ("lc", "trojan"):
        attack = _prepared(name, tiny, context, image_shape=(1, 28, 28), params={"steps": 5})
        poisoned = attack.poison(tiny.train)
        assert poisoned.train.images.shape == (300, 1, 28, 28) and poisoned.train.images.dtype == torch.uint8
        changed = (poisoned.train.images != tiny.train.images).flatten(1).any(1)
        assert changed.any() and not changed[~poisoned.poison_mask].any()
        assert attack.test_set(tiny.test).images.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"params": {"eps": 2}}, r"lc.eps must be in \[0.0, 1.0\], got 2"),
        ({"params": {"epsilon": 0.1}}, "unknown setting 'lc.epsilon'"),
        ({"params": {"steps": 0}}, r"lc.steps must be in \[1, inf\], got 0"),
        ({"params": {"step_size": -0.1}}, r"lc.step_size must be in \[0.0, 1.0\]"),
        ({"params": {"amplitude": 0}}, r"lc.amplitude must be in \(0, 1\], got 0"),
        ({"params": {"corners": 2}}, "lc.corners must be 1 or 4, got 2"),
        ({"params": {"surrogate_model": "vgg"}}, "lc.surrogate_model must be one of"),
        ({"params": {"surrogate_epochs": 0}}, r"lc.surrogate_epochs must be in \[1, inf\]"),
        ({"params": {"pattern": "turner", "patch_size": 2}}, "set patch_size=3"),
        ({"params": {"corners": 4, "patch_size": 9}}, "needs four 9x9 patches"),
        ({"mode": "all2all"}, "clean-label and supports only mode all2one"),
    ],
)
def test_lc_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(BdguardError, match=message):
        _attack("lc", **kwargs)


def test_lc_poison_before_prepare_is_refused(bundle):
    with pytest.raises(BdguardError, match=r"needs prepare\(bundle, context\) first"):
        _attack("lc", target=1).poison(bundle.train)


# ---- trojan -----------------------------------------------------------------------------------------------------


def test_trojan_trigger_excites_the_chosen_neuron_far_more_than_random_triggers(bundle, context, trojan):
    attack, poisoned = trojan
    details = poisoned.manifest["trojan"]
    (neuron,) = details["neurons"]
    model, _ = train_surrogate(bundle, context, "small-cnn", 1)
    assert neuron == int(model.fc.weight.abs().sum(0).argmax())

    def activation(images):
        with torch.no_grad():
            return model.features(to_float(images))[:, neuron].mean().item()

    held_out = bundle.test.images  # not the images the trigger was optimised on
    g = torch.Generator().manual_seed(0)
    random = [
        activation(torch.where(attack.mask, torch.randint(0, 256, attack.mask.shape, generator=g).byte(), held_out))
        for _ in range(5)
    ]
    clean, triggered = activation(held_out), activation(attack.apply(held_out))
    assert triggered - clean > 3 * (max(random) - clean) and triggered - clean > 0.02
    before, after = details["activation"]["initial_trigger"], details["activation"]["optimised_trigger"]
    assert after - details["activation"]["clean"] > 3 * (before - details["activation"]["clean"])


def test_trojan_trigger_changes_only_the_patch_and_relabels_exactly_rate(bundle, trojan):
    attack, poisoned = trojan
    square = torch.zeros(3, 16, 16, dtype=torch.bool)
    square[:, 13:, 13:] = True
    assert torch.equal(attack.mask, square)
    out = attack.apply(bundle.test.images)
    assert torch.equal(out[:, ~square], bundle.test.images[:, ~square])
    assert torch.equal(out[:, square], attack.pattern[square].expand(out.shape[0], -1))
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 200 == poisoned.manifest["poisoned"]  # 0.1 of the 2000 images
    assert (poisoned.train.labels[mask] == 2).all()
    assert torch.equal(poisoned.train.labels[~mask], bundle.train.labels[~mask])
    assert torch.equal(poisoned.train.images[~mask], bundle.train.images[~mask])
    assert torch.equal(poisoned.train.images[mask], attack.apply(bundle.train.images[mask]))


def test_trojan_reuses_the_cached_trigger(bundle, context, trojan, monkeypatch):
    attack, _ = trojan

    def no_optimising(*args, **kwargs):
        raise AssertionError("the trigger was optimised again")

    monkeypatch.setattr(trojan_module, "optimise_trigger", no_optimising)
    again = _prepared("trojan", bundle, context, target=2, rate=0.1, seed=4)
    assert torch.equal(again.pattern, attack.pattern) and again.details == attack.details
    with pytest.raises(AssertionError, match="optimised again"):  # another seed: another start, another trigger
        _prepared("trojan", bundle, context, seed=5)


def test_trojan_all2all_shifts_labels_by_one(bundle, context, trojan):
    # the fixture's seed: the cached trigger is loaded
    poisoned = _prepared("trojan", bundle, context, mode="all2all", rate=0.3, seed=4).poison(bundle.train)
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 600
    assert torch.equal(poisoned.train.labels[mask], (bundle.train.labels[mask] + 1) % 10)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"neurons": 0}, r"trojan.neurons must be in \[1, inf\], got 0"),
        ({"steps": 0}, r"trojan.steps must be in \[1, inf\], got 0"),
        ({"lr": 0}, "trojan.lr must be > 0, got 0"),
        ({"images": 0}, r"trojan.images must be in \[1, inf\]"),
        ({"patch_size": 17}, "larger than the 16x16 image"),
        ({"mask": "square"}, "unknown setting 'trojan.mask'"),
        ({"surrogate_model": "vgg"}, "trojan.surrogate_model must be one of"),
        ({"preset": "reference"}, "no preset 'reference'"),
    ],
)
def test_trojan_bad_parameters_are_refused(params, message):
    with pytest.raises(BdguardError, match=message):
        _attack("trojan", params=params)


def test_trojan_needs_prepare_and_at_most_as_many_neurons_as_channels(bundle, context):
    with pytest.raises(BdguardError, match=r"needs prepare\(bundle, context\) first"):
        _attack("trojan").apply(bundle.test.images)
    with pytest.raises(BdguardError, match=r"trojan.neurons must be in \[1, 128\] for small-cnn, got 129"):
        _prepared("trojan", bundle, context, params={"neurons": 129})


def test_trojan_neurons_are_feature_channels_also_behind_a_hidden_layer():
    model = build_model("alexnet", 10, 3, [0.5] * 3, [0.25] * 3, width=1)
    with torch.no_grad():
        model.hidden[0].weight.zero_()
        model.hidden[0].weight[:, 7] = 1.0  # only channel 7 feeds the head
        model.fc.weight.normal_()
    assert trojan_module.select_neurons(model, 1) == [7]
