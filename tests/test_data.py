"""Tests of the data layer: every source on tiny data made here, the cache, the errors, and the real archives."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdguard.data import DATASETS, DataConfig, cache, dataset_status, load_dataset
from bdguard.data.sources import cifar10, fashion_mnist
from bdguard.data.sources.imagefolder import ImageFolderSource
from bdguard.errors import BdguardError

REAL_CIFAR = Path(os.environ.get("BDGUARD_DATA", "data")) / "cifar10-jpeg.tar.xz"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test caches under tmp_path and sees no user data folder."""
    monkeypatch.setenv("BDGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BDGUARD_DATA", raising=False)


def color(label: int) -> tuple[int, int, int]:
    """A colour per class, far from every other, so a decoded image tells which class folder it came from."""
    return (40 + 50 * (label % 4), 40 + 60 * (label // 4 % 3), 200 - 15 * label)


def write_image(path: Path, rgb, size=(8, 8), mode="RGB", fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, rgb)
    (image.convert(mode) if mode != "RGB" else image).save(path, format=fmt)


def jpeg_bytes(rgb, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_class_tree(root: Path, classes: list[str], per_class: int, **kwargs) -> None:
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.png", color(label), **kwargs)


def count_loads(monkeypatch, source_class) -> list[int]:
    """Make `source_class.load` count its calls (the decoding the cache must avoid)."""
    calls = []
    original = source_class.load

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(source_class, "load", counted)
    return calls


# --- synthetic and digits ---------------------------------------------------------------------------------------


def test_synthetic_shapes_dtypes_labels_and_determinism(tmp_path):
    bundle = load_dataset(DataConfig("synthetic"))
    assert bundle.train.images.shape == (2000, 3, 16, 16) and bundle.test.images.shape == (500, 3, 16, 16)
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.labels.dtype == torch.int64
    assert bundle.train.labels.bincount().tolist() == [200] * 10
    assert bundle.test.labels.bincount().tolist() == [50] * 10
    assert bundle.num_classes == 10 and bundle.flip and len(bundle.mean) == 3
    again = load_dataset(DataConfig("synthetic"))
    assert torch.equal(bundle.train.images, again.train.images) and torch.equal(bundle.test.labels, again.test.labels)
    assert not (tmp_path / "cache").exists()  # generated, never cached
    # The prototypes are left-right symmetric, so a flip keeps the label: flipped test images still lie nearest
    # to their own class mean.
    means = torch.stack([bundle.train.images[bundle.train.labels == k].float().mean(0) for k in range(10)])
    flipped = bundle.test.images.flip(-1).float()
    nearest = torch.cdist(flipped.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == bundle.test.labels).float().mean() > 0.9


def test_train_size_keeps_a_fixed_subset_of_the_training_images_only():
    full = load_dataset(DataConfig("synthetic"))
    part = load_dataset(DataConfig("synthetic", train_size=100))
    assert len(part.train) == 100 and len(part.test) == len(full.test)
    # the same rows every time, each one a row of the full set, statistics unchanged
    again = load_dataset(DataConfig("synthetic", train_size=100))
    assert torch.equal(part.train.images, again.train.images) and torch.equal(part.train.labels, again.train.labels)
    rows = {bytes(image.numpy()) for image in full.train.images}
    assert all(bytes(image.numpy()) in rows for image in part.train.images)
    assert (part.mean, part.std) == (full.mean, full.std)
    assert not torch.equal(part.train.images, full.train.images[:100])  # drawn, not the first rows
    with pytest.raises(BdguardError, match="larger than the training set"):
        load_dataset(DataConfig("synthetic", train_size=len(full.train) + 1))
    with pytest.raises(BdguardError, match="train_size must be a positive integer"):
        DataConfig("synthetic", train_size=0)


def test_synthetic_is_learnable_by_a_small_cnn(one_thread):
    bundle = load_dataset(DataConfig("synthetic"))
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    x_train = (bundle.train.images.float() / 255 - mean) / std
    x_test = (bundle.test.images.float() / 255 - mean) / std
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for index in torch.randperm(len(x_train)).split(128):
            loss = torch.nn.functional.cross_entropy(model(x_train[index]), bundle.train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == bundle.test.labels).float().mean().item()
    assert accuracy > 0.9


def test_digits():
    bundle = load_dataset(DataConfig("digits"))
    assert len(bundle.train) + len(bundle.test) == 1797
    assert len(bundle.test) == 360  # 20%, stratified
    assert bundle.image_shape == (1, 8, 8) and bundle.num_classes == 10 and not bundle.flip
    assert bundle.train.images.max() == 255 and bundle.train.images.min() == 0
    assert set(bundle.test.labels.tolist()) == set(range(10))
    assert torch.equal(load_dataset(DataConfig("digits")).test.images, bundle.test.images)


# --- imagefolder ------------------------------------------------------------------------------------------------


def test_imagefolder_auto_split_labels_from_folder_names(tmp_path):
    classes = ["zebra", "apple", "mango"]
    make_class_tree(tmp_path / "set", classes, per_class=10)
    bundle = load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}"))
    assert bundle.classes == ("apple", "mango", "zebra")  # alphabetical
    assert len(bundle.train) == 24 and len(bundle.test) == 6
    assert bundle.test.labels.bincount().tolist() == [2, 2, 2]  # stratified
    assert bundle.image_shape == (3, 8, 8) and bundle.name == f"imagefolder:{tmp_path / 'set'}"
    for split in (bundle.train, bundle.test):
        for image, label in zip(split.images, split.labels, strict=True):
            folder_label = classes.index(bundle.classes[label])
            assert image[:, 0, 0].tolist() == list(color(folder_label))


def test_imagefolder_names_each_training_image_by_its_file_through_subsets_and_the_cache(tmp_path):
    classes = ["zebra", "apple", "mango"]
    make_class_tree(tmp_path / "set", classes, per_class=10)
    config = DataConfig(f"imagefolder:{tmp_path / 'set'}", cache_dir=str(tmp_path / "cache"))
    decoded, cached = load_dataset(config), load_dataset(config)
    assert not decoded.extra["from_cache"] and cached.extra["from_cache"]
    assert cached.train.files == decoded.train.files and len(decoded.train.files) == 24
    subset = load_dataset(dataclasses.replace(config, train_size=7))
    for bundle in (decoded, cached, subset):
        for image, file in zip(bundle.train.images, bundle.train.files, strict=True):
            assert image[:, 0, 0].tolist() == list(color(classes.index(file.split("/")[0])))
    assert len(subset.train.files) == 7 and set(subset.train.files) < set(decoded.train.files)
    picked = decoded.train.subset(torch.tensor([False, True] * 12))
    assert picked.files == decoded.train.files[1::2]
    assert load_dataset(DataConfig("synthetic")).train.files is None  # a generated set has no files


def test_imagefolder_uses_its_train_and_test_folders(tmp_path):
    make_class_tree(tmp_path / "set" / "train", ["b", "a"], per_class=3)
    make_class_tree(tmp_path / "set" / "test", ["b", "a"], per_class=1)
    bundle = load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}"))
    assert len(bundle.train) == 6 and len(bundle.test) == 2
    assert bundle.classes == ("a", "b") and bundle.test.labels.tolist() == [0, 1]
    assert bundle.test.images[1, :, 0, 0].tolist() == list(color(0))  # folder "b" was written with colour 0


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    make_class_tree(tmp_path / "set", ["a", "b"], per_class=5)
    write_image(tmp_path / "set" / "b" / "big.png", color(1), size=(20, 12))
    with pytest.raises(BdguardError, match="--image-size"):
        load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}"))
    bundle = load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}", image_size=16))
    assert bundle.image_shape == (3, 16, 16)
    assert len(bundle.train) + len(bundle.test) == 11


def test_imagefolder_grayscale_stays_one_channel(tmp_path):
    make_class_tree(tmp_path / "gray", ["a", "b"], per_class=5, mode="L")
    bundle = load_dataset(DataConfig(f"imagefolder:{tmp_path / 'gray'}"))
    assert bundle.image_shape == (1, 8, 8) and len(bundle.mean) == 1
    # One colour image makes the whole set RGB.
    write_image(tmp_path / "gray" / "a" / "colour.png", (255, 0, 0))
    assert load_dataset(DataConfig(f"imagefolder:{tmp_path / 'gray'}")).image_shape == (3, 8, 8)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    for label, value in enumerate((30000, 1000)):
        for i in range(5):
            path = tmp_path / "set" / "ab"[label] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)
    bundle = load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}"))
    assert bundle.image_shape == (1, 8, 8)
    values = {int(bundle.train.labels[i]): int(bundle.train.images[i].max()) for i in range(len(bundle.train))}
    assert values == {0: round(30000 / 257), 1: round(1000 / 257)}  # 117 and 4, not 255 and 255


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: make_class_tree(root, ["a"], per_class=10), "a classifier needs at least two classes; found 1"),
        (lambda root: make_class_tree(root, ["a", "b"], per_class=5, size=(1, 1)), "images are 1x1; the models need"),
        (lambda root: (root / "a").mkdir(parents=True) or (root / "a" / "x.png").write_bytes(b"junk"), "x.png"),
        (lambda root: root.mkdir() or (root / "loose.png").write_bytes(b"junk"), "class sub-folders"),
        (lambda root: (root / "a").mkdir(parents=True), "holds no images"),
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("a file"), "not a folder"),
    ],
    ids=["one-class", "one-pixel", "unreadable-image", "no-class-folders", "empty-class", "missing", "file"],
)
def test_imagefolder_bad_input(tmp_path, setup, message):
    setup(tmp_path / "set")
    with pytest.raises(BdguardError, match=message):
        load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}"))


def test_imagefolder_needs_a_path_and_enough_images_to_split(tmp_path):
    with pytest.raises(BdguardError, match="imagefolder:<path>"):
        load_dataset(DataConfig("imagefolder"))
    make_class_tree(tmp_path / "set", ["a", "b"], per_class=1)
    with pytest.raises(BdguardError, match="80/20"):
        load_dataset(DataConfig(f"imagefolder:{tmp_path / 'set'}"))


# --- cache ------------------------------------------------------------------------------------------------------


def test_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    make_class_tree(tmp_path / "set", ["a", "b"], per_class=5)
    calls = count_loads(monkeypatch, ImageFolderSource)
    config = DataConfig(f"imagefolder:{tmp_path / 'set'}")
    first = load_dataset(config)
    second = load_dataset(config)
    assert len(calls) == 1
    assert not first.extra["from_cache"] and second.extra["from_cache"]
    assert Path(second.extra["cache"]).parent == tmp_path / "cache"
    assert torch.equal(first.train.images, second.train.images) and first.classes == second.classes
    assert first.mean == second.mean and first.source == second.source
    # Another --image-size decodes to other arrays, so it is another entry.
    assert load_dataset(DataConfig(config.dataset, image_size=8)).extra["cache"] != first.extra["cache"]
    assert len(calls) == 2
    # A changed folder is another identity: decoded again.
    write_image(tmp_path / "set" / "a" / "new.png", color(0))
    assert len(load_dataset(config).train) + len(load_dataset(config).test) == 11
    assert len(calls) == 3


def _edit_meta(entry: Path, **changes) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / "train_images.npy").write_bytes((entry / "train_images.npy").read_bytes()[:200]),
        lambda entry: (entry / "test_labels.npy").unlink(),
        lambda entry: (entry / "meta.json").write_text("{not json"),
        lambda entry: np.save(entry / "test_images.npy", np.zeros((1, 3, 8, 8), np.uint8)),
        # a build killed mid-write: its temporary file left, meta.json gone
        lambda entry: [(entry / ".train_images.npy.k1ll.tmp").write_bytes(b"half"), (entry / "meta.json").unlink()],
        # hand-edited entries of the right shapes and types: a label out of range, a class dropped, a negative std
        lambda entry: np.save(entry / "train_labels.npy", np.load(entry / "train_labels.npy") + 7),
        lambda entry: _edit_meta(entry, classes=["a"]),
        lambda entry: _edit_meta(entry, std=[-1.0, 0.1, 0.1]),
    ],
    ids=["truncated", "missing-array", "corrupt-meta", "wrong-shape", "killed-build", "label-range", "classes", "std"],
)
def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, damage):
    make_class_tree(tmp_path / "set", ["a", "b"], per_class=5)
    calls = count_loads(monkeypatch, ImageFolderSource)
    config = DataConfig(f"imagefolder:{tmp_path / 'set'}")
    first = load_dataset(config)
    damage(Path(first.extra["cache"]))
    rebuilt = load_dataset(config)
    assert len(calls) == 2 and not rebuilt.extra["from_cache"]
    assert torch.equal(first.train.images, rebuilt.train.images)
    assert torch.equal(first.test.images, rebuilt.test.images)
    assert load_dataset(config).extra["from_cache"] and len(calls) == 2
    assert not list(Path(first.extra["cache"]).glob(".*.tmp"))  # what a killed build left is cleaned up


def test_a_change_behind_a_linked_class_folder_is_seen(tmp_path, monkeypatch):
    make_class_tree(tmp_path / "elsewhere", ["b"], per_class=5)
    make_class_tree(tmp_path / "set", ["a"], per_class=5)
    (tmp_path / "set" / "b").symlink_to(tmp_path / "elsewhere" / "b")
    (tmp_path / "set" / "a" / "loop").symlink_to(tmp_path / "set")  # a link loop: counted once, never followed
    calls = count_loads(monkeypatch, ImageFolderSource)
    config = DataConfig(f"imagefolder:{tmp_path / 'set'}")
    first = load_dataset(config)
    write_image(tmp_path / "elsewhere" / "b" / "new.png", color(1))
    second = load_dataset(config)
    assert len(calls) == 2 and len(second.train) + len(second.test) == len(first.train) + len(first.test) + 1


def test_a_second_builder_waits_for_the_first_and_reads_its_entry(tmp_path, monkeypatch):
    make_class_tree(tmp_path / "set", ["a", "b"], per_class=5)
    calls = count_loads(monkeypatch, ImageFolderSource)
    config = DataConfig(f"imagefolder:{tmp_path / 'set'}")
    entry = Path(load_dataset(config).extra["cache"])
    meta = (entry / "meta.json").read_text()
    (entry / "meta.json").unlink()  # the entry is missing again, as for two processes starting at once
    result = {}
    with cache.building(entry):  # "the first builder", still writing
        waiting = threading.Thread(target=lambda: result.setdefault("bundle", load_dataset(config)))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # blocked on the lock: it must not unlink the first's files
        (entry / "meta.json").write_text(meta)  # the first builder finishes its entry
    waiting.join(timeout=60)
    assert result["bundle"].extra["from_cache"] and len(calls) == 1


def test_cached_tensors_can_be_edited_without_touching_the_cache(tmp_path):
    make_class_tree(tmp_path / "set", ["a", "b"], per_class=5)
    config = DataConfig(f"imagefolder:{tmp_path / 'set'}")
    load_dataset(config)
    cached = load_dataset(config)
    original = cached.train.images.clone()
    cached.train.images[:, :, :2, :2] = 255  # e.g. a poisoning step that pastes a patch in place
    assert torch.equal(load_dataset(config).train.images, original)
    meta = json.loads((Path(cached.extra["cache"]) / "meta.json").read_text())
    assert meta["classes"] == ["a", "b"] and meta["arrays"]["train_images"]["shape"] == list(original.shape)


# --- cifar10 ----------------------------------------------------------------------------------------------------


def make_cifar_archive(path: Path, prefix: str = "", per_class=(2, 1)) -> None:
    """A tiny .tar.xz in the layout of ../shared/data/cifar10-jpeg.tar.xz, plus a macOS resource-fork file."""
    with tarfile.open(path, "w:xz") as tar:
        for split, count in zip(("train", "test"), per_class, strict=True):
            for label, name in enumerate(cifar10.CLASSES):
                for i in range(count):
                    data = jpeg_bytes(color(label))
                    info = tarfile.TarInfo(f"{prefix}{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(f"{prefix}train/cat/._0000.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))


def assert_cifar_like(bundle, train: int, test: int) -> None:
    assert bundle.image_shape == (3, 32, 32) and bundle.classes == cifar10.CLASSES
    assert len(bundle.train) == train and len(bundle.test) == test
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2023, 0.1994, 0.2010) and bundle.flip
    assert bundle.train.labels.bincount(minlength=10).tolist() == [train // 10] * 10


def test_cifar10_from_a_tar_xz_and_from_its_unpacked_folder(tmp_path):
    archive = tmp_path / "tiny.tar.xz"
    make_cifar_archive(archive, prefix="cifar10-jpeg/")
    from_archive = load_dataset(DataConfig("cifar10", data_root=str(archive)))
    assert_cifar_like(from_archive, 20, 10)
    assert not (tmp_path / "cifar10-jpeg").exists()  # streamed, not extracted
    for image, label in zip(from_archive.test.images, from_archive.test.labels, strict=True):
        assert (image.float().mean((1, 2)) - torch.tensor(color(int(label)))).abs().max() < 4  # JPEG is lossy
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(unpacked, filter="data")
    from_folder = load_dataset(DataConfig("cifar10", data_root=str(unpacked / "cifar10-jpeg")))
    assert_cifar_like(from_folder, 20, 10)
    # Same files, same order (class, then file name): identical arrays either way.
    assert torch.equal(from_archive.train.images, from_folder.train.images)
    assert torch.equal(from_archive.test.labels, from_folder.test.labels)
    # A --data-root folder that holds the unpacked tree is searched as well.
    assert len(load_dataset(DataConfig("cifar10", data_root=str(unpacked))).train) == 20


def test_archive_members_outside_the_tree_are_skipped_and_reported(tmp_path, capsys, monkeypatch):
    archive = tmp_path / "tiny.tar.xz"
    make_cifar_archive(archive)
    with tarfile.open(archive, "r:xz") as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    hostile = tmp_path / "hostile.tar.xz"
    with tarfile.open(hostile, "w:xz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
        for name in ("/x/train/cat/evil.jpg", "../train/cat/evil.jpg", "train/../train/cat/evil.jpg"):
            data = jpeg_bytes(color(3))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("BDGUARD_CACHE", str(tmp_path / "cache"))
    bundle = load_dataset(DataConfig("cifar10", data_root=str(hostile)))
    assert_cifar_like(bundle, 20, 10)  # not one of the three was taken in
    assert "skipped 3 member(s) with an absolute or '..' path, e.g. /x/train/cat/evil.jpg" in capsys.readouterr().err


def test_cifar10_default_search_and_status(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(BdguardError, match="--download") as error:
        load_dataset(DataConfig("cifar10"))
    assert str(tmp_path / "data") in str(error.value) and "--data-root" in str(error.value)
    rows = {row["name"]: row for row in dataset_status()}
    named = {"imagefolder:<path>", "hf:<path>", "memory:<name>"}
    assert set(rows) == {"cifar10", "digits", "fashion-mnist", "gtsrb", "synthetic", *named}
    assert not rows["cifar10"]["available"] and "download" in rows["cifar10"]["where"]
    assert not rows["fashion-mnist"]["available"]
    assert rows["synthetic"]["available"] and rows["digits"]["available"]

    (tmp_path / "data").mkdir()
    make_cifar_archive(tmp_path / "data" / "cifar10-jpeg.tar.xz")
    rows = {row["name"]: row for row in dataset_status()}
    assert rows["cifar10"]["available"] and rows["cifar10"]["where"] == str(tmp_path / "data" / "cifar10-jpeg.tar.xz")
    assert_cifar_like(load_dataset(DataConfig("cifar10")), 20, 10)


def test_cifar10_torchvision_folder(tmp_path, monkeypatch):
    """torchvision's own reader is stubbed (real batches need its checksums); this checks NHWC -> NCHW and labels."""
    import torchvision.datasets

    rng = np.random.default_rng(0)
    splits = {True: rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), False: rng.integers(0, 256, (10, 32, 32, 3))}

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert root == str(tmp_path) and not download
            self.data = splits[train].astype(np.uint8)
            self.targets = [i % 10 for i in range(len(self.data))]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    bundle = load_dataset(DataConfig("cifar10", data_root=str(tmp_path)))
    assert_cifar_like(bundle, 20, 10)
    assert torch.equal(bundle.train.images, torch.from_numpy(splits[True]).permute(0, 3, 1, 2))
    assert bundle.test.labels.tolist() == [i % 10 for i in range(10)]


def test_cifar10_bad_input(tmp_path):
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(b"this is not xz")
    with pytest.raises(BdguardError, match="not a readable .tar.xz"):
        load_dataset(DataConfig("cifar10", data_root=str(junk)))
    truncated = tmp_path / "truncated.tar.xz"
    make_cifar_archive(tmp_path / "full.tar.xz")
    truncated.write_bytes((tmp_path / "full.tar.xz").read_bytes()[:300])
    with pytest.raises(BdguardError, match="not a readable .tar.xz"):
        load_dataset(DataConfig("cifar10", data_root=str(truncated)))
    make_class_tree(tmp_path / "other" / "train", ["x", "y"], per_class=1, size=(32, 32))
    make_class_tree(tmp_path / "other" / "test", ["x", "y"], per_class=1, size=(32, 32))
    with pytest.raises(BdguardError, match="not CIFAR-10"):
        load_dataset(DataConfig("cifar10", data_root=str(tmp_path / "other")))
    with pytest.raises(BdguardError, match="does not exist"):
        load_dataset(DataConfig("cifar10", data_root=str(tmp_path / "nowhere")))
    with pytest.raises(BdguardError, match="not CIFAR-10|no CIFAR|not found"):
        load_dataset(DataConfig("cifar10", data_root=str(tmp_path / "other" / "train")))
    with pytest.raises(BdguardError, match="--image-size 64"):
        load_dataset(DataConfig("cifar10", data_root=str(junk), image_size=64))


# --- fashion-mnist ----------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes((0, 0, 0x08, array.ndim)) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(5),
    }
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, array in arrays.items():
        write_idx(raw / f"{stem}.gz", array)
    bundle = load_dataset(DataConfig("fashion-mnist", data_root=str(tmp_path)))
    assert bundle.image_shape == (1, 28, 28) and bundle.classes[0] == "T-shirt/top" and bundle.num_classes == 10
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).to(torch.uint8))
    assert bundle.test.labels.tolist() == [0, 1, 2, 3, 4]
    # A truncated file is refused, naming it.
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0\0\0\x05" * 3 + b"x" * 9))
    with pytest.raises(BdguardError, match="t10k-images-idx3-ubyte.gz is truncated"):
        load_dataset(DataConfig("fashion-mnist", data_root=str(raw)))


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    bundle = load_dataset(DataConfig("fashion-mnist"))
    assert len(bundle.train) == 60000 and len(bundle.test) == 10000
    assert bundle.image_shape == (1, 28, 28) and bundle.flip
    assert bundle.train.labels.min() == 0 and bundle.train.labels.max() == 9
    assert bundle.test.labels.bincount().tolist() == [1000] * 10
    assert str(DEBIAN_FASHION) in bundle.source


# --- gtsrb ------------------------------------------------------------------------------------------------------


def make_gtsrb(root: Path) -> None:
    """A tiny copy of torchvision's GTSRB layout: classes 0 and 2, images of odd sizes (resized when decoded)."""
    base = root / "gtsrb"
    for class_id in (0, 2):
        for i in range(3):
            path = base / "GTSRB" / "Training" / f"{class_id:05d}" / f"00000_{i:05d}.ppm"
            write_image(path, color(class_id), (30, 40))
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, class_id in enumerate((2, 0, 2)):
        write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", color(class_id), (50, 45))
        rows.append(f"{i:05d}.ppm;50;45;5;5;45;40;{class_id}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_gtsrb_from_folder_and_archive(tmp_path):
    make_gtsrb(tmp_path / "root")
    bundle = load_dataset(DataConfig("gtsrb", data_root=str(tmp_path / "root")))
    assert bundle.image_shape == (3, 32, 32) and bundle.num_classes == 43 and not bundle.flip
    assert bundle.train.labels.tolist() == [0, 0, 0, 2, 2, 2] and bundle.test.labels.tolist() == [2, 0, 2]
    assert bundle.test.images[0, :, 16, 16].tolist() == list(color(2))
    archive = tmp_path / "gtsrb.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "root" / "gtsrb", arcname="gtsrb")
    from_archive = load_dataset(DataConfig("gtsrb", data_root=str(archive)))
    assert torch.equal(from_archive.train.images, bundle.train.images)
    assert torch.equal(from_archive.test.labels, bundle.test.labels)
    assert load_dataset(DataConfig("gtsrb", data_root=str(archive), image_size=16)).image_shape == (3, 16, 16)


# --- names, paths and parameters --------------------------------------------------------------------------------


def test_bad_names_paths_and_parameters(tmp_path):
    named = {"imagefolder", "hf", "memory"}
    assert set(DATASETS.names()) == {"cifar10", "digits", "fashion-mnist", "gtsrb", "synthetic", *named}
    with pytest.raises(BdguardError, match="did you mean 'cifar10'"):
        load_dataset(DataConfig("cifar-10"))
    with pytest.raises(BdguardError, match="takes no"):
        load_dataset(DataConfig("digits:extra"))
    with pytest.raises(BdguardError, match="does not exist"):
        load_dataset(DataConfig("gtsrb", data_root=str(tmp_path / "missing")))
    with pytest.raises(BdguardError, match="not found"):
        load_dataset(DataConfig("gtsrb", data_root=str(tmp_path)))
    for size in (0, 3, 5000, 2.5, True):
        with pytest.raises(BdguardError, match="image_size"):
            DataConfig("synthetic", image_size=size)
    with pytest.raises(BdguardError, match="non-empty"):
        DataConfig("")


# --- the real archive -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_CIFAR.is_file(), reason=f"{REAL_CIFAR} is not on this machine")
def test_real_cifar10_archive_decodes_once(monkeypatch, capsys):
    calls = count_loads(monkeypatch, cifar10.Cifar10)
    config = DataConfig("cifar10", data_root=str(REAL_CIFAR))
    start = time.perf_counter()
    bundle = load_dataset(config)
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    again = load_dataset(config)
    cached = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[cifar10-jpeg.tar.xz] decode + cache: {decoded:.1f} s, cached reload: {cached * 1000:.0f} ms")
    assert_cifar_like(bundle, 50000, 10000)
    assert bundle.test.labels.bincount().tolist() == [1000] * 10
    assert "JPEG q75" in bundle.source
    assert len(calls) == 1 and again.extra["from_cache"]
    assert torch.equal(bundle.test.images[-100:], again.test.images[-100:])
    assert os.path.getsize(Path(again.extra["cache"]) / "train_images.npy") > 50000 * 3 * 32 * 32
