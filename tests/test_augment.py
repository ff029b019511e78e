import torch

from bdguard.data.augment import Augment, random_crop, random_flip


def _images(n=64, c=3, h=8, w=8):
    return torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = _images()
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(x.shape[0]):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], win) for win in windows)
    # with 25 possible shifts and 64 images, some image must have moved
    assert not torch.equal(out, x)


def test_flip_mirrors_about_half_the_images():
    x = _images(n=400)
    out = random_flip(x, torch.Generator().manual_seed(2))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_augment_is_deterministic_under_a_seed():
    x = _images()
    aug = Augment(padding=4, flip=True)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_flip_keeps_orientation():
    x = torch.zeros((10, 1, 8, 8), dtype=torch.uint8)
    x[:, :, :, 0] = 255  # a bright left column stays left when only cropping by zero pixels
    out = Augment(padding=0, flip=False)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
