import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from bdguard.attacks import ATTACKS, AttackConfig, AttackContext, build_attack, iad
from bdguard.data import DataConfig, load_dataset
from bdguard.data.augment import to_float
from bdguard.data.base import DataBundle, ImageSet
from bdguard.errors import BdguardError

# A budget that learns a working trigger on 1000 synthetic images in about 10 s on one CPU core: a larger mask and
# more backdoored images per batch than the paper's, and no crop/flip, which on 16x16 images slows learning a lot.
FAST = {
    "classifier": "small-cnn",
    "epochs": 8,
    "mask_epochs": 6,
    "width": 8,
    "depth": 2,
    "batch_size": 64,
    "lr_classifier": 0.05,
    "p_attack": 0.2,
    "mask_density": 0.1,
    "augment": False,
}
TINY = {"classifier": "small-cnn", "epochs": 1, "mask_epochs": 1, "width": 4, "depth": 2, "batch_size": 32}


def _subset(bundle: DataBundle, n_train: int, n_test: int) -> DataBundle:
    return dataclasses.replace(
        bundle, train=bundle.train.subset(torch.arange(n_train)), test=bundle.test.subset(torch.arange(n_test))
    )


@pytest.fixture(scope="module")
def synthetic(one_thread):
    return _subset(load_dataset(DataConfig(dataset="synthetic")), 1000, 200)


@pytest.fixture(scope="module")
def small(synthetic):
    return _subset(synthetic, 256, 64)


def _iad(shape=(3, 16, 16), params=None, **kwargs):
    return build_attack(AttackConfig(name="iad", params=dict(FAST if params is None else params), **kwargs), 10, shape)


def _context(cache):
    return AttackContext(torch.device("cpu"), cache, quiet=True)


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    cache = tmp_path_factory.mktemp("iad-cache")
    attack = _iad(target=2, rate=0.1, seed=0)
    attack.prepare(synthetic, _context(cache))
    return attack, cache


def _fail(*args, **kwargs):
    raise RuntimeError("trained although a cached generator should have been loaded")


# ---- the trained generator ------------------------------------------------------------------------------------


def test_short_joint_training_learns_a_trigger_that_only_works_on_its_own_image(trained):
    info = trained[0].generator_info
    assert info["from_cache"] is False
    # its classifier: accurate on clean images, fooled by an image's own trigger, not by another image's (cross)
    assert info["clean_acc"] > 0.8
    assert info["attack_acc"] > 0.5
    assert info["cross_acc"] > 0.5


def test_the_generator_is_cached_and_a_second_prepare_loads_it(trained, synthetic, monkeypatch):
    attack, cache = trained
    files = list((cache / "attacks").glob("iad-synthetic-*.safetensors"))
    assert len(files) == 1 and attack.generator_info["cache"] == str(files[0])
    with safe_open(files[0], framework="pt") as f:
        stored = json.loads(f.metadata()["bdguard-iad"])
    assert stored["identity"]["seed"] == 0 and stored["identity"]["target"] == 2
    assert stored["metrics"]["attack_acc"] == attack.generator_info["attack_acc"]

    monkeypatch.setattr(iad, "train_generator", _fail)
    again = _iad(target=2, rate=0.1, seed=0)
    again.prepare(synthetic, _context(cache))
    assert again.generator_info["from_cache"] is True
    for key in ("clean_acc", "attack_acc", "cross_acc", "mask_density"):
        assert again.generator_info[key] == attack.generator_info[key]
    images = synthetic.test.images[:50]
    assert torch.equal(again.apply(images), attack.apply(images))
    first, second = attack.poison(synthetic.train), again.poison(synthetic.train)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.cross_mask, second.cross_mask)
    assert second.manifest["generator"]["from_cache"] is True

    # cross_ratio only changes poisoning, so it shares the generator; the seed changes the generator
    _iad(target=2, rate=0.1, seed=0, params={**FAST, "cross_ratio": 0.5}).prepare(synthetic, _context(cache))
    with pytest.raises(RuntimeError, match="trained although"):
        _iad(target=2, rate=0.1, seed=1).prepare(synthetic, _context(cache))


def test_same_seed_trains_the_same_generator_and_an_unreadable_cache_is_replaced(small, tmp_path):
    first = _iad(params=TINY, seed=5)
    first.prepare(small, _context(tmp_path / "a"))
    second = _iad(params=TINY, seed=5)
    path = second.cache_path(tmp_path / "b", second.cache_identity(small))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    second.prepare(small, _context(tmp_path / "b"))
    assert second.generator_info["from_cache"] is False
    with safe_open(path, framework="pt") as f:
        assert "bdguard-iad" in f.metadata()
    state, again = first.generator.state_dict(), second.generator.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = _iad(params=TINY, seed=6)
    other.prepare(small, _context(tmp_path / "a"))
    assert not torch.equal(other.generator.state_dict()["pattern_net.0.weight"], state["pattern_net.0.weight"])


# ---- triggers -------------------------------------------------------------------------------------------------


def test_triggers_are_input_aware(trained, synthetic):
    attack = trained[0]
    x = synthetic.test.images[:20]
    out = attack.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert (out != x).flatten(1).any(1).all()  # every image gets a trigger
    residual = out.int() - x.int()
    assert all(not torch.equal(residual[i], residual[i + 1]) for i in range(19))
    masks = attack.generator.mask(to_float(x))
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(19))
    # an image's trigger comes from the image: another image's pattern and mask give another result
    assert not torch.equal(iad.trigger(attack.generator, x, x.roll(1, 0)), out)


def test_masks_lie_in_the_unit_interval_with_a_density_near_the_target(trained, synthetic):
    attack = trained[0]
    with torch.no_grad():
        masks = attack.generator.mask(to_float(synthetic.test.images))
    assert masks.shape == (200, 1, 16, 16) and masks.min() >= 0 and masks.max() <= 1
    density = masks.mean().item()
    assert 0.25 * FAST["mask_density"] < density < 2.5 * FAST["mask_density"]
    assert abs(density - attack.generator_info["mask_density"]) < 1e-4
    off = masks == 0  # a mask that is off leaves the pixel exactly as it was
    x = synthetic.test.images
    # a good share of pixels is off (the trained share moves with the CPU's float kernels: 45-60 % seen)
    assert off.float().mean() > 0.3
    assert torch.equal(attack.apply(x)[off.expand_as(x)], x[off.expand_as(x)])


def test_a_mask_that_switched_off_is_reported(capsys):
    attack = _iad()
    attack.generator_info = {"mask_density": 0.0}
    attack._warn_if_mask_is_off()
    assert "the trained mask is (almost) off" in capsys.readouterr().err
    attack.generator_info = {"mask_density": 0.05}
    attack._warn_if_mask_is_off()
    assert capsys.readouterr().err == ""


# ---- poisoning and test sets ----------------------------------------------------------------------------------


def test_poison_counts_labels_and_cross_samples(trained, synthetic):
    attack = trained[0]
    train = synthetic.train
    poisoned = attack.poison(train)
    mask, cross = poisoned.poison_mask, poisoned.cross_mask
    assert int(mask.sum()) == 100 and int(cross.sum()) == 100 and not (mask & cross).any()
    assert poisoned.manifest["poisoned"] == 100 and poisoned.manifest["cross"] == 100
    assert poisoned.manifest["rate_meaning"] == "fraction of the whole training set"
    assert poisoned.manifest["generator"]["attack_acc"] == attack.generator_info["attack_acc"]
    assert (poisoned.train.labels[mask] == 2).all()
    assert torch.equal(poisoned.train.labels[~mask], train.labels[~mask])
    assert torch.equal(poisoned.original_labels, train.labels)
    clean = ~(mask | cross)
    assert torch.equal(poisoned.train.images[clean], train.images[clean])
    assert torch.equal(poisoned.train.images[mask], attack.apply(train.images[mask]))
    crossed = poisoned.train.images[cross]
    assert (crossed != train.images[cross]).flatten(1).any(1).float().mean() > 0.9
    assert not torch.equal(crossed, attack.apply(train.images[cross]))
    # each cross image carries the trigger generated from some other training image
    for i in cross.nonzero().squeeze(1)[:3].tolist():
        candidates = iad.trigger(attack.generator, train.images[i].expand(len(train), -1, -1, -1), train.images)
        match = (candidates == poisoned.train.images[i]).flatten(1).all(1)
        assert match.any() and not match[i]
    other = _iad(target=2, rate=0.1, seed=0, params={**FAST, "cross_ratio": 0})
    other.generator = attack.generator
    no_cross = other.poison(train)
    assert not no_cross.cross_mask.any() and torch.equal(no_cross.poison_mask, mask)


def test_test_set_excludes_the_target_class(trained, synthetic):
    attack, test = trained[0], synthetic.test
    triggered = attack.test_set(test)
    keep = test.labels != 2
    assert len(triggered) == int(keep.sum()) and (triggered.labels != 2).all() and (triggered.targets == 2).all()
    assert torch.equal(triggered.images, attack.apply(test.images[keep]))


def test_all2all_relabels_to_the_next_class(small, tmp_path):
    attack = _iad(params=TINY, mode="all2all", rate=0.2)
    attack.prepare(small, _context(tmp_path))
    poisoned = attack.poison(small.train)
    mask = poisoned.poison_mask
    assert int(mask.sum()) == round(0.2 * 256) and int(poisoned.cross_mask.sum()) == round(0.2 * 256)
    assert torch.equal(poisoned.train.labels[mask], (small.train.labels[mask] + 1) % 10)
    triggered = attack.test_set(small.test)
    assert len(triggered) == len(small.test) and torch.equal(triggered.targets, (triggered.labels + 1) % 10)


def test_one_channel_28x28_images_work_with_padding_to_the_generator_stride(one_thread, tmp_path):
    g = torch.Generator().manual_seed(0)

    def split(n):
        return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10)

    classes = tuple(str(i) for i in range(10))
    bundle = DataBundle("digits-toy", split(96), split(40), classes, (0.5,), (0.3,), False, "random")
    # 28 is not a multiple of 2^3: the generator pads
    attack = _iad((1, 28, 28), params={**TINY, "depth": 3}, rate=0.1)
    attack.prepare(bundle, _context(tmp_path))
    poisoned = attack.poison(bundle.train)
    assert poisoned.train.images.shape == (96, 1, 28, 28) and poisoned.train.images.dtype == torch.uint8
    changed = (poisoned.train.images != bundle.train.images).flatten(1).any(1)
    assert changed[poisoned.poison_mask].all()
    assert not changed[~(poisoned.poison_mask | poisoned.cross_mask)].any()
    assert attack.test_set(bundle.test).images.shape == (36, 1, 28, 28)


# ---- interface and parameters ---------------------------------------------------------------------------------


def test_registered_with_a_reference_preset():
    assert "iad" in ATTACKS
    params = _iad(params={"preset": "reference"}).params
    assert params.cross_ratio == 1.0 and params.p_attack == 0.1 and params.p_cross == 0.1
    assert params.mask_density == 0.032 and params.lambda_norm == 100 and params.lambda_div == 1


def test_apply_and_poison_before_prepare_are_refused():
    attack = _iad()
    with pytest.raises(BdguardError, match=r"iad needs prepare\(\) first"):
        attack.apply(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(BdguardError, match=r"iad needs prepare\(\) first"):
        attack.poison(ImageSet(torch.zeros(10, 3, 16, 16, dtype=torch.uint8), torch.arange(10)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"params": {"epochs": 0}}, r"iad.epochs must be in \[1, inf\], got 0"),
        ({"params": {"mask_epochs": 0}}, r"iad.mask_epochs must be in \[1, inf\], got 0"),
        ({"params": {"p_attack": 1.5}}, r"iad.p_attack must be in \[0.0, 1.0\], got 1.5"),
        ({"params": {"p_attack": 0.6, "p_cross": 0.6}}, r"iad.p_attack \+ iad.p_cross must be in \[0.0, 1.0\]"),
        ({"params": {"p_attack": 0.001}}, r"iad.p_attack x iad.batch_size must be >= 1"),
        ({"params": {"lr_generator": 0}}, "iad.lr_generator must be > 0, got 0"),
        ({"params": {"mask_density": 2}}, r"iad.mask_density must be in \[0.0, 1.0\], got 2"),
        ({"params": {"depth": 7}}, r"iad.depth must be in \[1, 6\], got 7"),
        ({"params": {"batch_size": 1}}, r"iad.batch_size must be in \[2, inf\], got 1"),
        ({"params": {"cross_ratio": -1}}, r"iad.cross_ratio must be in \[0.0, inf\], got -1"),
        ({"params": {"classifier": "vgg99"}}, "iad.classifier must be a registered model"),
        ({"params": {"generator": "x"}}, "unknown setting 'iad.generator'"),
        ({"params": {"preset": "paper"}}, "attack iad has no preset 'paper'"),
        ({"rate": 0.6}, r"rate x \(1 \+ cross_ratio\)"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    params = kwargs.pop("params", {})
    with pytest.raises(BdguardError, match=message):
        build_attack(AttackConfig(name="iad", params=params, **kwargs), 10, (3, 32, 32))
