import json

import numpy as np
import pytest
import torch
from PIL import Image

from bdguard.attacks import AttackConfig, build_attack
from bdguard.cli.main import main
from bdguard.data import DataConfig, load_dataset
from bdguard.reporting.gallery import CAPTION, GAP, TITLE, Examples, amplified_difference, gallery_figure
from cli_helpers import assert_one_line_error, run_cli

POISON = ["poison", "--dataset", "synthetic", "--quiet"]
BADNETS = [*POISON, "--attack", "badnets", "--rate", "0.1", "--target", "3", "--set", "patch_size=4"]


def _load(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    masks = [np.load(folder / name, allow_pickle=False) for name in ("poison_mask.npy", "cross_mask.npy")]
    return manifest, *masks


def _assert_gallery_png(path, min_width):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.shape[1] >= min_width and pixels.shape[0] >= min_width, pixels.shape
    assert pixels.std() > 20, "gallery looks blank"


@pytest.fixture(scope="module")
def badnets_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("poison") / "badnets"
    assert main([*BADNETS, "--seed", "5", "--out", str(out)]) == 0
    return out


def test_manifest_counts_match_masks_and_rate(badnets_run):
    manifest, poison, cross = _load(badnets_run)
    assert poison.dtype == bool and cross.dtype == bool and poison.shape == cross.shape == (2000,)
    assert manifest["poisoned"] == poison.sum() == round(0.1 * 2000)
    assert manifest["cross"] == cross.sum() == 0 and manifest["total"] == 2000
    assert manifest["poisoned_indices"] == np.flatnonzero(poison).tolist()
    assert manifest["cross_indices"] == []
    assert sum(manifest["poisoned_per_class"]) == manifest["poisoned"]
    assert manifest["attack"] == "badnets" and manifest["params"]["patch_size"] == 4 and manifest["seed"] == 5
    assert manifest["rate_meaning"] == "fraction of the whole training set"
    assert manifest["target"] == 3 and manifest["target_class"] == "class3"
    assert manifest["dataset"] == "synthetic" and manifest["image_shape"] == [3, 16, 16]
    assert {"torch", "command"} <= set(manifest["environment"])


def test_manifest_labels_match_the_data(badnets_run):
    manifest, poison, _ = _load(badnets_run)
    labels = load_dataset(DataConfig(dataset="synthetic")).train.labels
    index = torch.tensor(manifest["poisoned_indices"])
    assert manifest["poisoned_original_labels"] == labels[index].tolist()
    assert manifest["poisoned_labels"] == [3] * manifest["poisoned"]
    assert manifest["poisoned_per_class"] == torch.bincount(labels[torch.from_numpy(poison)], minlength=10).tolist()


def test_gallery_is_a_png_with_content(badnets_run):
    # 4 columns of 16x16 images upscaled to 160 pixels
    _assert_gallery_png(badnets_run / "gallery.png", min_width=4 * 160)


def test_attack_seed_flags_agree_and_a_folder_takes_one_poisoning(badnets_run, tmp_path, capsys):
    out = tmp_path / "again"
    assert main([*BADNETS, "--attack-seed", "5", "--out", str(out)]) == 0
    again, poison, _ = _load(out)
    first, first_poison, _ = _load(badnets_run)
    assert again["seed"] == 5 and again["poisoned_indices"] == first["poisoned_indices"]
    assert np.array_equal(poison, first_poison)
    files = {path.name: path.read_bytes() for path in out.iterdir()}
    code, _, err = run_cli(capsys, *BADNETS, "--attack-seed", "1", "--out", str(out))
    assert_one_line_error(code, err, "holds a poisoned set of other settings: attack.seed: 5 -> 1")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == files  # the refusal changed nothing
    assert main([*BADNETS, "--seed", "5", "--out", str(out)]) == 0  # the same poisoning again: a retry


def test_wanet_on_one_channel_digits(tmp_path, capsys):
    out = tmp_path / "wanet"
    code, stdout, _ = run_cli(
        capsys, "poison", "--dataset", "digits", "--attack", "wanet", "--quiet", "--out", str(out)
    )
    assert code == 0 and "wanet: 144 poisoned, 287 cross of 1437" in stdout
    manifest, poison, cross = _load(out)
    assert manifest["image_shape"] == [1, 8, 8]
    assert manifest["poisoned"] == poison.sum() == round(0.1 * 1437)
    assert manifest["cross"] == cross.sum() == round(2 * 0.1 * 1437)
    assert not (poison & cross).any()
    assert manifest["cross_indices"] == np.flatnonzero(cross).tolist()
    assert sum(manifest["cross_per_class"]) == manifest["cross"]
    labels = load_dataset(DataConfig(dataset="digits")).train.labels
    assert manifest["poisoned_original_labels"] == labels[torch.tensor(manifest["poisoned_indices"])].tolist()
    _assert_gallery_png(out / "gallery.png", min_width=4 * 160)


def test_difference_is_non_zero_only_inside_the_badnets_patch():
    attack = build_attack(AttackConfig(name="badnets", params={"patch_size": 3}), 10, (3, 16, 16))
    clean = torch.randint(1, 255, (5, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    maps, peaks = amplified_difference(clean, attack.apply(clean))
    patch = attack.mask.any(dim=0)
    assert (maps[:, ~patch] == 0).all()
    # pixels in 1..254 against a black-and-white patch: every patch pixel changes, the largest change becomes 255
    assert (maps[:, patch] > 0).all() and (maps.flatten(1).amax(1) == 255).all()
    assert (peaks > 0).all()
    unchanged, none = amplified_difference(clean, clean)
    assert (unchanged == 0).all() and (none == 0).all()


def test_gallery_figure_shows_grey_images_exactly_and_the_patch_in_the_difference():
    attack = build_attack(AttackConfig(name="badnets", params={"patch_size": 3}), 10, (1, 8, 8))
    clean = torch.randint(1, 255, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.tensor([1, 2])
    examples = Examples(
        clean, attack.apply(clean), labels, torch.zeros(2, dtype=torch.int64), labels, ("poisoned",) * 2
    )
    figure = gallery_figure(examples, [str(i) for i in range(10)], "title")
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    size, factor = 160, 20  # 8x8 images upscaled 20 times
    top = TITLE + CAPTION

    def panel(column):
        left = GAP + column * (size + GAP)
        return pixels[top : top + size, left : left + size]

    # the clean image, grey (R = G = B) and upscaled by nearest neighbours
    want = clean[0, 0].numpy().repeat(factor, 0).repeat(factor, 1)
    assert all((panel(0)[..., c] == want).all() for c in range(3))
    # the difference panel lights up exactly the 3x3 patch in the bottom-right corner
    lit = panel(2).sum(axis=2)[factor // 2 :: factor, factor // 2 :: factor] > 30
    expected = np.zeros((8, 8), dtype=bool)
    expected[5:, 5:] = True
    assert (lit == expected).all()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([*POISON, "--attack", "badnet", "--out", "x"], "did you mean 'badnets'"),
        ([*POISON, "--attack", "badnets", "--rate", "2", "--out", "x"], "attack rate must be in"),
        ([*POISON, "--attack", "badnets", "--set", "colour=red", "--out", "x"], "unknown setting 'badnets.colour'"),
        ([*POISON, "--attack", "badnets"], "--out"),
        ([*POISON, "--attack", "badnets", "--rows", "0", "--out", "x"], "gallery rows must be in"),
        ([*POISON, "--attack", "badnets", "--out", "afile"], "is not a folder"),
        ([*POISON, "--attack", "badnets", "--out", "trained"], "holds a training run"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "checkpoint.pt").write_bytes(b"")
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x").exists()
