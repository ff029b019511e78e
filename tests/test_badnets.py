from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdguard.attacks import AttackConfig, build_attack
from bdguard.data.base import ImageSet
from bdguard.errors import BdguardError

SHARED_PATCH = Path(__file__).resolve().parents[2] / "shared/data/triggers/badnets_patch_2x2.png"


def _data(n=200, c=3, size=32, classes=10):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return ImageSet(images, labels)


def _badnets(image_shape=(3, 32, 32), **kwargs):
    params = kwargs.pop("params", {})
    return build_attack(AttackConfig(name="badnets", params=params, **kwargs), 10, image_shape)


def test_default_is_a_3x3_checkerboard_in_the_bottom_right_corner():
    data = _data()
    out = _badnets().apply(data.images)
    corner = out[:, :, 29:, 29:]
    expected = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(corner, expected.expand_as(corner))
    untouched = torch.ones(32, 32, dtype=torch.bool)
    untouched[29:, 29:] = False
    assert torch.equal(out[:, :, untouched], data.images[:, :, untouched])


def test_position_margin_and_size():
    out = _badnets(
        (1, 10, 10), params={"patch_size": 4, "position": "top-left", "margin": 1, "pattern": "white"}
    ).apply(torch.zeros((2, 1, 10, 10), dtype=torch.uint8))
    assert out[:, :, 1:5, 1:5].eq(255).all() and int(out.sum()) == 2 * 16 * 255
    out = _badnets((1, 8, 8), params={"position": "2,5", "pattern": "white", "patch_size": 1}).apply(
        torch.zeros((1, 1, 8, 8), dtype=torch.uint8)
    )
    assert out[0, 0].nonzero().tolist() == [[2, 5]]


def test_reference_preset_matches_the_shipped_trigger_png():
    data = _data(n=20)
    ours = _badnets(params={"preset": "reference"}).apply(data.images)
    assert ours[0, :, 4, 4].tolist() == [180, 249, 112] and ours[0, :, 5, 5].tolist() == [187, 201, 219]
    if not SHARED_PATCH.exists():
        pytest.skip(f"{SHARED_PATCH} not here")
    from_png = _badnets(params={"patch_image": str(SHARED_PATCH)}).apply(data.images)
    assert torch.equal(ours, from_png)


def test_full_frame_patch_image_pastes_only_nonzero_entries(tmp_path):
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    frame[1, 2] = (10, 0, 30)  # the zero green channel must leave the image's green alone
    Image.fromarray(frame).save(tmp_path / "p.png")
    images = torch.full((1, 3, 8, 8), 99, dtype=torch.uint8)
    out = _badnets((3, 8, 8), params={"patch_image": str(tmp_path / "p.png")}).apply(images)
    assert out[0, :, 1, 2].tolist() == [10, 99, 30]
    assert int((out != images).sum()) == 2


def test_poisoned_count_labels_and_mask():
    data = _data(n=1000)
    attack = _badnets(rate=0.1, target=3, seed=5)
    poisoned = attack.poison(data)
    mask = poisoned.poison_mask
    assert int(mask.sum()) == 100
    assert (poisoned.train.labels[mask] == 3).all()
    assert torch.equal(poisoned.train.labels[~mask], data.labels[~mask])
    assert torch.equal(poisoned.train.images[~mask], data.images[~mask])
    assert torch.equal(poisoned.train.images[mask][:, :, 29:, 29:], attack.apply(data.images[mask])[:, :, 29:, 29:])
    assert torch.equal(poisoned.original_labels, data.labels)
    assert poisoned.manifest["poisoned"] == 100 and poisoned.manifest["rate_meaning"].endswith("whole training set")
    # the same seed gives the same samples, another seed others
    assert torch.equal(_badnets(rate=0.1, target=3, seed=5).poison(data).poison_mask, mask)
    assert not torch.equal(_badnets(rate=0.1, target=3, seed=6).poison(data).poison_mask, mask)


def test_images_of_another_shape_are_refused():
    with pytest.raises(BdguardError, match=r"built for \(3, 32, 32\) images"):
        _badnets().poison(_data(n=10, size=28))


def test_all2all_shifts_labels_by_one():
    data = _data(n=100)
    poisoned = _badnets(rate=0.5, mode="all2all").poison(data)
    mask = poisoned.poison_mask
    assert torch.equal(poisoned.train.labels[mask], (data.labels[mask] + 1) % 10)


def test_test_set_excludes_the_target_class():
    data = _data(n=100)
    triggered = _badnets(target=2).test_set(data)
    assert len(triggered) == 90
    assert (triggered.labels != 2).all() and (triggered.targets == 2).all()
    all2all = _badnets(mode="all2all").test_set(data)
    assert len(all2all) == 100 and torch.equal(all2all.targets, (all2all.labels + 1) % 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"params": {"patch_size": 40}}, "larger than the 32x32 image"),
        ({"params": {"position": "30,30"}}, "does not fit"),
        ({"params": {"position": "middle"}}, "badnets.position must be one of"),
        ({"params": {"colour": "red"}}, "unknown setting 'badnets.colour'"),
        ({"params": {"patch_image": "/nonexistent.png"}}, "not found"),
        ({"params": {"preset": "paper"}}, "no preset 'paper'"),
        ({"target": 10}, "not a class"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(BdguardError, match=message):
        _badnets(**kwargs)


def test_a_decompression_bomb_as_patch_image_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # 64x64 is then "a bomb", as 20000x20000 is by default
    with pytest.raises(BdguardError, match="cannot read badnets.patch_image .*decompression bomb"):
        _badnets(params={"patch_image": str(tmp_path / "huge.png")})
