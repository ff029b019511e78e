"""hf:<path>: Hugging Face data sets as users keep them (save_to_disk, parquet files), built here from the synthetic
set so that what bdguard reads can be checked against what was written."""

import datasets
import numpy as np
import pytest
from PIL import Image

from bdguard.data import DataConfig, load_dataset
from bdguard.errors import BdguardError
from bdguard.io import read_json
from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic():
    return load_dataset(DataConfig(dataset="synthetic"))


def _table(images, labels, classes, **extra) -> datasets.Dataset:
    """A data set of PNG-encoded images and a ClassLabel column, as `datasets` builds one from PIL images."""
    pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    features = {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))}
    columns = {"img": pictures, "label": labels.tolist()}
    for name, (feature, values) in extra.items():
        features[name], columns[name] = feature, values
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (600 train, 100 test images) saved with save_to_disk, the same as parquet files, and the
    synthetic arrays they hold."""
    root = tmp_path_factory.mktemp("hf")
    bundle = _synthetic()
    train, test = bundle.train.subset(np.arange(600)), bundle.test.subset(np.arange(100))
    splits = {
        "train": _table(train.images, train.labels, bundle.classes),
        "test": _table(test.images, test.labels, bundle.classes),
    }
    datasets.DatasetDict(splits).save_to_disk(str(root / "dict"))
    for name, split in splits.items():
        split.to_parquet(str(root / "parquet" / f"{name}-00000.parquet"))
    return root, bundle.classes, train, test


@pytest.mark.parametrize("layout", ["dict", "parquet"])
def test_a_saved_data_set_loads_as_written_and_is_cached(saved, layout, tmp_path):
    root, classes, train, test = saved
    config = DataConfig(dataset=f"hf:{root / layout}", cache_dir=str(tmp_path))
    bundle = load_dataset(config)
    assert bundle.classes == classes and bundle.name == f"hf:{root / layout}"
    assert bundle.train.images.equal(train.images) and bundle.train.labels.equal(train.labels)  # PNG is lossless
    assert bundle.test.images.equal(test.images) and bundle.test.labels.equal(test.labels)
    again = load_dataset(config)
    assert again.extra["from_cache"] and again.train.images.equal(bundle.train.images)


def test_one_split_is_split_80_20_by_class(tmp_path):
    bundle = _synthetic()
    _table(bundle.test.images, bundle.test.labels, bundle.classes).save_to_disk(str(tmp_path / "one"))
    loaded = load_dataset(DataConfig(dataset=f"hf:{tmp_path / 'one'}", cache_dir=str(tmp_path / "cache")))
    assert (len(loaded.train), len(loaded.test)) == (400, 100)
    assert np.bincount(loaded.test.labels.numpy()).tolist() == [10] * 10  # stratified
    rows = {image.numpy().tobytes() for image in bundle.test.images}
    assert all(image.numpy().tobytes() in rows for image in loaded.train.images)


def test_columns_are_found_by_their_features_or_named(tmp_path):
    bundle = _synthetic()
    images, labels = bundle.test.images[:100], bundle.test.labels[:100]
    words = [bundle.classes[i].upper() for i in labels.tolist()]
    copy = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images.flip(3)]
    table = _table(
        images, labels, bundle.classes, mirror=(datasets.Image(), copy), word=(datasets.Value("string"), words)
    )
    table.save_to_disk(str(tmp_path / "two"))
    name = f"hf:{tmp_path / 'two'}"

    def load(**columns):
        return load_dataset(DataConfig(dataset=name, cache_dir=str(tmp_path / "cache"), **columns))

    with pytest.raises(
        BdguardError, match=r"several Image columns \(img, mirror\); choose with --set data.image_column=NAME"
    ):
        load()
    mirrored = load(image_column="mirror")
    assert {image.numpy().tobytes() for image in mirrored.train.images} <= {
        image.numpy().tobytes() for image in images.flip(3)
    }
    by_word = load(image_column="img", label_column="word")  # string labels: their sorted values are the classes
    assert by_word.classes == tuple(sorted(set(words)))
    with pytest.raises(BdguardError, match="has no column 'picture' .*its columns: img, label, mirror, word"):
        load(image_column="picture")
    with pytest.raises(BdguardError, match="column 'word' holds .*not images"):
        load(image_column="word")
    with pytest.raises(BdguardError, match="data set 'synthetic' has no columns to choose"):
        load_dataset(DataConfig(dataset="synthetic", image_column="img"))


def test_a_set_without_labels_is_refused_in_one_line(tmp_path, capsys):
    pictures = [Image.fromarray(np.zeros((16, 16, 3), np.uint8)) for _ in range(20)]
    datasets.Dataset.from_dict({"img": pictures}, features=datasets.Features({"img": datasets.Image()})).save_to_disk(
        str(tmp_path / "unlabelled")
    )
    argv = ["train", "--dataset", f"hf:{tmp_path / 'unlabelled'}", "--out", str(tmp_path / "run")]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "has no ClassLabel column (columns: img); name it with --set data.label_column")
    code, _, err = run_cli(capsys, "train", "--dataset", f"hf:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "is not a folder (save the data set with save_to_disk, or pass --download")


def test_train_and_detect_on_a_hugging_face_set_from_the_command_line(saved, tmp_path, capsys):
    root, *_ = saved
    argv = ["--dataset", f"hf:{root / 'dict'}", "--attack", "badnets", "--set", "badnets.patch_size=4"]
    argv += ["--arch", "small-cnn", "--epochs", "2", "--batch-size", "64", "--threads", "1", "--quiet"]
    assert run_cli(capsys, "train", *argv, "--out", str(tmp_path / "train"))[0] == 0
    results = read_json(tmp_path / "train" / "results.json")
    assert results["dataset"] == f"hf:{root / 'dict'}" and results["train_size"] == 600 and results["ba"] > 0.5
    code, _, err = run_cli(capsys, "train", *argv, "--set", "data.label_column=nope", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "has no column 'nope' (data.label_column)")
