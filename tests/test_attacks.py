from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdguard.attacks import AttackConfig, build_attack
from bdguard.attacks.wanet import identity_grid
from bdguard.data.base import ImageSet
from bdguard.errors import BdguardError

TRIGGERS = Path(__file__).resolve().parents[2] / "shared/data/triggers"
HELLO_KITTY = TRIGGERS / "hello_kitty.png"
WANET_GRID = TRIGGERS / "wanet_grid_k4_s0.5.npy"
SIG_ROW = [0, 18, 14, 249, 236, 249, 14, 18, 0, 238, 242, 7, 20]  # docs/methods/sig.md 3, W = 32, delta 20, f 6


def _data(n=200, shape=(3, 32, 32), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(n) % classes)


def _attack(name, image_shape=(3, 32, 32), **kwargs):
    params = kwargs.pop("params", {})
    return build_attack(AttackConfig(name=name, params=params, **kwargs), 10, image_shape)


def _constant(value, shape=(3, 32, 32), n=1):
    return torch.full((n, *shape), value, dtype=torch.uint8)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


# ---- all three: seeds, counts, labels, test sets, shapes ------------------------------------------------------


@pytest.mark.parametrize("name", ["blended", "sig", "wanet"])
def test_same_seed_same_set_other_seed_other_set(name):
    data = _data(n=500)
    first = _attack(name, rate=0.2, seed=3).poison(data)
    again = _attack(name, rate=0.2, seed=3).poison(data)
    other = _attack(name, rate=0.2, seed=4).poison(data)
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.train.labels, again.train.labels)
    assert torch.equal(first.poison_mask, again.poison_mask) and torch.equal(first.cross_mask, again.cross_mask)
    assert not torch.equal(first.poison_mask, other.poison_mask)
    assert not torch.equal(first.train.images, other.train.images)


def test_poison_label_attacks_relabel_exactly_rate_of_the_whole_set():
    data = _data(n=1000)
    for name in ["blended", "wanet"]:
        poisoned = _attack(name, rate=0.1, target=3, seed=5).poison(data)
        mask = poisoned.poison_mask
        assert int(mask.sum()) == 100 and poisoned.manifest["poisoned"] == 100
        assert poisoned.manifest["rate_meaning"] == "fraction of the whole training set"
        assert (poisoned.train.labels[mask] == 3).all()
        assert torch.equal(poisoned.original_labels, data.labels)
        clean = ~(mask | poisoned.cross_mask)
        assert torch.equal(poisoned.train.labels[clean], data.labels[clean])
        assert torch.equal(poisoned.train.images[clean], data.images[clean])
        attack = _attack(name, rate=0.1, target=3, seed=5)
        assert torch.equal(poisoned.train.images[mask], attack.apply(data.images[mask]))


@pytest.mark.parametrize("name", ["blended", "wanet"])
def test_all2all_shifts_labels_by_one(name):
    data = _data(n=100)
    poisoned = _attack(name, rate=0.3, mode="all2all").poison(data)
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 30
    assert torch.equal(poisoned.train.labels[mask], (data.labels[mask] + 1) % 10)


@pytest.mark.parametrize("name", ["blended", "sig", "wanet"])
def test_test_set_excludes_the_target_class_and_triggers_every_image(name):
    data = _data(n=100)
    attack = _attack(name, target=2)
    triggered = attack.test_set(data)
    assert len(triggered) == 90 and (triggered.labels != 2).all() and (triggered.targets == 2).all()
    assert torch.equal(triggered.images, attack.apply(data.images[data.labels != 2]))  # wanet: the clean grid
    assert not torch.equal(triggered.images, data.images[data.labels != 2])


@pytest.mark.parametrize("name", ["blended", "sig", "wanet"])
def test_one_channel_28x28_images_work(name):
    data = _data(n=200, shape=(1, 28, 28))
    params = {"image": str(HELLO_KITTY)} if name == "blended" and HELLO_KITTY.exists() else {}
    poisoned = _attack(name, image_shape=(1, 28, 28), rate=0.1, params=params).poison(data)
    assert poisoned.train.images.shape == (200, 1, 28, 28) and poisoned.train.images.dtype == torch.uint8
    changed = (poisoned.train.images != data.images).flatten(1).any(1)
    assert changed.any() and not changed[~(poisoned.poison_mask | poisoned.cross_mask)].any()


# ---- blended --------------------------------------------------------------------------------------------------


def test_blended_constant_image_and_trigger_give_the_truncated_blend(tmp_path):
    trigger = _png(tmp_path / "t.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    x = _constant(101)
    # 101 + 0.1 * (200 - 101) = 110.9 -> 110 (truncated, not rounded); 101 + 0.3 * 99 = 130.7 -> 130
    assert _attack("blended", params={"image": trigger, "preset": "reference"}).apply(x).eq(110).all()
    assert _attack("blended", params={"image": trigger, "alpha": 0.3}).apply(x).eq(130).all()
    assert _attack("blended", params={"image": trigger, "alpha": 1.0}).apply(x).eq(200).all()
    assert _attack("blended", params={"image": trigger, "alpha": 0.0}).apply(x).eq(101).all()


def test_blended_grey_trigger_for_one_channel_and_resize_to_the_image_size(tmp_path):
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red: PIL grey = 255 * 299 / 1000 -> 76
    attack = _attack("blended", image_shape=(1, 6, 9), params={"image": _png(tmp_path / "r.png", rgb)})
    assert attack.trigger.shape == (1, 6, 9) and attack.trigger.eq(76).all()


def test_blended_default_trigger_is_seeded_uniform_noise():
    a, b, c = (_attack("blended", seed=s).trigger for s in (1, 1, 2))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 127.5) < 6 and int(a.min()) < 5 and int(a.max()) > 250
    # alpha 0.2 on a black image: trunc(0.2 t)
    assert torch.equal(_attack("blended", seed=1).apply(_constant(0)), (a.float() * 0.2).to(torch.uint8)[None])


def test_blended_reference_matches_pil_image_blend_on_hello_kitty():
    if not HELLO_KITTY.exists():
        pytest.skip(f"{HELLO_KITTY} not here")
    data = _data(n=8)
    ours = _attack("blended", params={"preset": "reference", "image": str(HELLO_KITTY)}).apply(data.images)
    with Image.open(HELLO_KITTY) as img:
        trigger = img.convert("RGB").resize((32, 32))  # the reference code's calls, PIL's default filter
    for i in range(len(data)):  # the reference's per-image PIL loop, as the oracle
        reference = Image.blend(Image.fromarray(data.images[i].permute(1, 2, 0).numpy()), trigger, 0.1)
        assert np.array_equal(ours[i].permute(1, 2, 0).numpy(), np.asarray(reference))


# ---- sig ------------------------------------------------------------------------------------------------------


def test_sig_poisons_only_target_class_images_and_keeps_labels():
    data = _data(n=1000)
    poisoned = _attack("sig", rate=0.5, target=3, seed=1).poison(data)
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 50 and (data.labels[mask] == 3).all()  # half of the 100 target-class images
    assert torch.equal(poisoned.train.labels, data.labels)
    assert torch.equal(poisoned.train.images[~mask], data.images[~mask])
    assert not poisoned.cross_mask.any()
    assert poisoned.manifest["rate_meaning"] == "fraction of the target class" and poisoned.manifest["clean_label"]


def test_sig_standard_form_adds_the_signal_and_clamps():
    columns = _attack("sig").apply(_constant(100))[0, :, :, :13]
    expected = [100, 118, 114, 92, 80, 92, 114, 118, 100, 81, 85, 107, 120]  # 100 + 20 sin(2 pi j 6 / 32), floored
    assert torch.equal(columns, torch.tensor(expected, dtype=torch.uint8).expand(3, 32, 13))
    assert _attack("sig").apply(_constant(250))[0, 0, 0, :5].tolist() == [250, 255, 255, 242, 230]
    assert _attack("sig").apply(_constant(5))[0, 0, 0, 3:6].tolist() == [0, 0, 0]  # 5 - 7.65, 5 - 20 -> 0


def test_sig_reference_form_wraps_the_pattern_and_blends_it():
    attack = _attack("sig", params={"preset": "reference"})
    assert attack.pattern[0, 0, :13].tolist() == SIG_ROW
    assert torch.equal(attack.pattern, attack.pattern[:1, :1].expand(3, 32, 32))  # every row and channel
    # trunc(100 + 0.1 (P - 100)): the wrapped negative lobes (236..249) brighten by about 14
    expected = [90, 91, 91, 114, 113, 114, 91, 91, 90, 113, 114, 90, 92]
    assert attack.apply(_constant(100))[0, :, :, :13].eq(torch.tensor(expected, dtype=torch.uint8)).all()
    data = _data(n=4)
    pattern = Image.fromarray(attack.pattern.permute(1, 2, 0).numpy())
    for i in range(len(data)):  # the reference's PIL blend as the oracle
        reference = Image.blend(Image.fromarray(data.images[i].permute(1, 2, 0).numpy()), pattern, 0.1)
        assert np.array_equal(attack.apply(data.images[i : i + 1])[0].permute(1, 2, 0).numpy(), np.asarray(reference))


def test_sig_signal_follows_the_image_width():
    attack = _attack("sig", image_shape=(1, 28, 28), params={"frequency": 7})  # period 4 columns
    assert attack.apply(_constant(100, (1, 28, 28)))[0, 0, 0, :8].tolist() == [100, 120, 100, 80] * 2


# ---- wanet ----------------------------------------------------------------------------------------------------


def test_wanet_counts_poisoned_and_cross_samples():
    data = _data(n=1000)
    attack = _attack("wanet", rate=0.1, target=3, seed=2)
    poisoned = attack.poison(data)
    mask, cross = poisoned.poison_mask, poisoned.cross_mask
    assert int(mask.sum()) == 100 and int(cross.sum()) == 200 and not (mask & cross).any()
    assert poisoned.manifest["poisoned"] == 100 and poisoned.manifest["cross"] == 200
    assert torch.equal(poisoned.train.labels[cross], data.labels[cross])
    # noise samples are warped, but not with the clean grid
    assert not torch.equal(poisoned.train.images[cross], data.images[cross])
    assert not torch.equal(poisoned.train.images[cross], attack.apply(data.images[cross]))
    no_cross = _attack("wanet", rate=0.1, seed=2, params={"cross_ratio": 0}).poison(data)
    assert int(no_cross.cross_mask.sum()) == 0 and torch.equal(no_cross.poison_mask, mask)


def test_wanet_with_zero_strength_is_the_identity_up_to_truncation():
    data = _data(n=20)
    out = _attack("wanet", params={"s": 0}).apply(data.images)
    # grid_sample's float32 rounding can land a hair below an integer, which truncation turns into one less
    drop = data.images.int() - out.int()
    assert drop.min() == 0 and drop.max() <= 1 and (drop == 0).float().mean() > 0.8
    assert torch.equal(_attack("wanet", params={"s": 0}).apply(_constant(200)), _constant(200))


def _ramp_expected(grid, axis, size, slope):
    """Bilinear sampling of a ramp (value = slope x pixel index along `axis`) at the grid's coordinate."""
    return slope * (grid[0, :, :, axis].double() + 1) / 2 * (size - 1)


def _assert_matches_ramp(out, expected):
    frac = expected - expected.floor()
    safe = (frac > 0.01) & (frac < 0.99)  # away from integers, float32 rounding cannot change the truncation
    assert safe.float().mean() > 0.9
    assert torch.equal(out[safe].long(), expected.floor().long()[safe])
    assert (out.long() - expected.floor().long()).abs().max() <= 1


def test_wanet_reference_grid_file_on_a_horizontal_ramp():
    if not WANET_GRID.exists():
        pytest.skip(f"{WANET_GRID} not here")
    attack = _attack("wanet", params={"preset": "reference", "grid_path": str(WANET_GRID)})
    ramp = (torch.arange(32) * 8).to(torch.uint8).expand(1, 3, 32, 32)
    out = attack.apply(ramp)
    grid = torch.from_numpy(np.load(WANET_GRID))
    # pixel (0, 1): grid x = -0.92629534 -> column (1 - 0.92629534) / 2 * 31 = 1.1424 -> value 9.139 -> 9
    assert abs(grid[0, 0, 1, 0].item() + 0.92629534) < 1e-6 and out[0, :, 0, 1].tolist() == [9, 9, 9]
    _assert_matches_ramp(out[0, 0], _ramp_expected(grid, 0, 32, 8))


def test_wanet_seeded_grid_uses_x_for_columns_and_y_for_rows_on_non_square_images():
    attack = _attack("wanet", image_shape=(1, 20, 37), params={"s": 4})
    columns = (torch.arange(37) * 6).to(torch.uint8).expand(1, 1, 20, 37)
    rows = (torch.arange(20) * 12).to(torch.uint8)[:, None].expand(1, 1, 20, 37)
    _assert_matches_ramp(attack.apply(columns)[0, 0], _ramp_expected(attack.grid, 0, 37, 6))
    _assert_matches_ramp(attack.apply(rows)[0, 0], _ramp_expected(attack.grid, 1, 20, 12))
    other = _attack("wanet", image_shape=(1, 20, 37), params={"s": 4}, seed=1)
    assert not torch.equal(attack.grid, other.grid)


def test_wanet_seeded_grid_scales_with_s_and_grid_rescale():
    def grid(s, rescale=1.0):
        return _attack("wanet", image_shape=(1, 20, 37), params={"s": s, "grid_rescale": rescale}).grid

    identity = identity_grid(20, 37)
    shift_1, shift_2 = grid(1) - identity, grid(2) - identity
    inside = (grid(1).abs() < 1) & (grid(2).abs() < 1)  # not clamped
    assert inside.float().mean() > 0.8
    assert torch.allclose(shift_2[inside], 2 * shift_1[inside], atol=1e-6)
    assert torch.equal(grid(2, 0.5)[inside], 0.5 * grid(2)[inside])
    # in pixels the shift is s x noise / 2, the noise having a mean magnitude near 1 (u / mean|u|)
    pixels = shift_2 * torch.tensor([36 / 2, 19 / 2])
    assert 0.3 < pixels[inside].abs().mean() < 2


# ---- bad parameters -------------------------------------------------------------------------------------------


def test_bad_grid_files_are_refused(tmp_path):
    np.save(tmp_path / "g.npy", np.zeros((1, 32, 32, 2), dtype=np.float32))
    with pytest.raises(BdguardError, match=r"shape \(1, 28, 28, 2\) for 28x28 images, got float32 \(1, 32, 32, 2\)"):
        _attack("wanet", image_shape=(1, 28, 28), params={"grid_path": str(tmp_path / "g.npy")})
    np.save(tmp_path / "o.npy", np.array([{"a": 1}] * 2048, dtype=object).reshape(1, 32, 32, 2))
    with pytest.raises(BdguardError, match="cannot read wanet.grid_path"):
        _attack("wanet", params={"grid_path": str(tmp_path / "o.npy")})
    (tmp_path / "t.npy").write_text("not an array")
    with pytest.raises(BdguardError, match="cannot read wanet.grid_path"):
        _attack("wanet", params={"grid_path": str(tmp_path / "t.npy")})


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("blended", {"params": {"alpha": 1.5}}, r"blended.alpha must be in \[0.0, 1.0\], got 1.5"),
        ("blended", {"params": {"ratio": 0.1}}, "unknown setting 'blended.ratio'"),
        ("blended", {"params": {"image": "/nonexistent.png"}}, "blended.image not found"),
        ("sig", {"params": {"delta": -1}}, r"sig.delta must be in \[0.0, inf\], got -1"),
        ("sig", {"params": {"form": "code"}}, "sig.form must be one of standard, reference"),
        ("sig", {"mode": "all2all"}, "clean-label and supports only mode all2one"),
        ("wanet", {"params": {"k": -2}}, r"wanet.k must be in \[1, inf\], got -2"),
        ("wanet", {"params": {"grid_rescale": 0}}, "wanet.grid_rescale must be > 0"),
        ("wanet", {"params": {"noise": "dynamic"}}, "wanet.noise must be one of static"),
        ("wanet", {"params": {"grid_path": "/nonexistent.npy"}}, "wanet.grid_path not found"),
        ("wanet", {"rate": 0.4}, r"rate x \(1 \+ cross_ratio\)"),
    ],
)
def test_bad_parameters_are_refused(name, kwargs, message):
    with pytest.raises(BdguardError, match=message):
        _attack(name, **kwargs)
