"""Networks of torchvision and timm behind the one model interface: the cut at the map their head reads, model files
that reload through safetensors alone, and one-line refusals (unknown names, a missing extra, a network without a
feature map for a method that reads one)."""

import builtins
import json

import pytest
import torch
from safetensors.torch import save_file

from bdguard.errors import BdguardError
from bdguard.models import ModelMeta, build_model, load_model, save_model
from bdguard.models.base import sized_model
from cli_helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = [0.5], [0.25]  # one input channel: the adapter widens nothing, it narrows the first convolution


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:test_resnet"])
def test_the_cut_computes_what_the_whole_network_does_and_the_mask_acts_on_the_map(name):
    model = build_model(name, 7, 1, MEAN, STD).eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.net(model.normalise(x))  # the network's own forward, uncut
        features = model.features(x)
        assert features.shape[:2] == (3, model.feature_channels) and model.has_feature_map
        assert torch.allclose(model(x), whole, rtol=1e-4, atol=1e-7 * whole.abs().max()) and whole.shape == (3, 7)
        assert model.head_weight().shape[1] == model.feature_channels  # the layer that reads the pooled map
        model.feature_mask[:5] = 0  # pruning: channels of the map the head no longer reads
        masked = model.features(x)
        assert (masked[:, :5] == 0).all() and torch.equal(masked[:, 5:], features[:, 5:])
        assert not torch.equal(model(x), whole)
    assert model.architecture == name and model.in_channels == 1 and model.num_classes == 7


def test_a_network_without_a_feature_map_classifies_and_refuses_the_map():
    for name in ("timm:test_vit", "torchvision:densenet121"):  # tokens; a pool inside the forward
        model = build_model(name, 4, 3, [0.5] * 3, [0.25] * 3).eval()
        side = 160 if "vit" in name else 32
        assert not model.has_feature_map and model(torch.rand(2, 3, side, side)).shape == (2, 4)
        with pytest.raises(BdguardError, match="has none"):
            model.features(torch.rand(2, 3, side, side))
        assert not sized_model(name, {}).has_feature_map  # known before any data loads


def test_vab_and_pruning_refuse_a_vision_transformer_in_one_line(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--epochs", "1", "--threads", "1", "--quiet"]
    code, _, err = run_cli(
        capsys, "train", *argv, "--arch", "timm:test_vit", "--defense", "vab", "--out", str(tmp_path)
    )
    assert_one_line_error(code, err, "defense vab reads the model's last convolutional feature map")
    model = build_model("timm:test_vit", 10, 3, [0.5] * 3, [0.25] * 3)
    meta = ModelMeta("timm:test_vit", {}, 10, [f"class{i}" for i in range(10)], [3, 16, 16], [0.5] * 3, [0.25] * 3, "x")
    save_model(model, tmp_path / "vit.safetensors", meta)
    code, _, err = run_cli(capsys, "repair", "--model", str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "defense linf-prune reads the model's last convolutional feature map")


def _meta(name: str, **changes) -> ModelMeta:
    fields = {"architecture": name, "arch_kwargs": {}, "num_classes": 10, "classes": [str(i) for i in range(10)]}
    fields |= {"input_shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "dataset": "cifar10"}
    return ModelMeta(**{**fields, **changes})


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:test_resnet"])
def test_an_adapted_model_file_reloads_from_safetensors_alone(name, tmp_path):
    model = build_model(name, 10, 3, [0.5] * 3, [0.25] * 3).eval()
    model.feature_mask[3] = 0
    path = tmp_path / "m.safetensors"
    save_model(model, path, _meta(name))
    loaded, meta = load_model(path)
    x = torch.rand(2, 3, 32, 32)
    model = model.to(memory_format=torch.channels_last)  # as loaded: the same arithmetic
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and loaded.feature_mask[3] == 0
    assert meta.architecture == name == loaded.architecture
    # the network's own state-dict keys, behind "net.": a user's weights for it load with that prefix
    assert any(key.startswith("net.") for key in loaded.state_dict())


def test_a_hand_made_model_file_with_a_wrong_name_or_shape_is_refused(tmp_path):
    model = build_model("torchvision:resnet18", 10, 3, [0.5] * 3, [0.25] * 3)
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    sidecar = path.with_suffix(".json")

    def describe(meta: ModelMeta) -> None:
        sidecar.write_text(json.dumps(meta.to_dict()))

    describe(_meta("torchvision:resnet81"))
    with pytest.raises(BdguardError, match="did you mean 'torchvision:resnet18'"):
        load_model(path)
    describe(_meta("torchvision:resnet34"))
    with pytest.raises(BdguardError, match="missing keys"):
        load_model(path)
    describe(_meta("torchvision:resnet18", num_classes=5, classes=[str(i) for i in range(5)]))
    with pytest.raises(BdguardError, match=r"shape mismatches \(2\): net.fc.weight \(10, 512\) != \(5, 512\)"):
        load_model(path)
    # the weights come from the file: a sidecar naming pretrained weights reloads offline, without downloading them
    describe(_meta("torchvision:resnet18", arch_kwargs={"weights": "IMAGENET1K_V1"}))
    assert load_model(path)[0].num_classes == 10


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("timm:resnet81", "timm has no model 'resnet81'"),
        ("torchvision:mobilenet_v3_smal", "did you mean 'torchvision:mobilenet_v3_small'"),
        ("torchvision:", "names no model"),
        ("keras:resnet18", "unknown model source 'keras'"),
    ],
)
def test_unknown_ecosystem_names_are_one_line(arch, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--arch", arch, "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "x").exists()


def test_images_too_small_for_the_network_are_one_line_before_training(tmp_path, capsys):
    """SqueezeNet pools a 16x16 image down to nothing: said once, naming the size, not a traceback mid-epoch."""
    argv = ["train", "--dataset", "synthetic", "--arch", "torchvision:squeezenet1_1", "--out", str(tmp_path / "x")]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "torchvision:squeezenet1_1 cannot take synthetic's 16x16 images")
    assert "Output size is too small" in err and "epoch" not in err


def test_without_timm_its_models_name_the_extra(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    code, _, err = run_cli(
        capsys, "train", "--dataset", "synthetic", "--arch", "timm:test_resnet", "--out", str(tmp_path)
    )
    assert_one_line_error(code, err, "pip install 'bdguard[timm]'")


def test_named_torchvision_weights_are_checked_before_anything_is_fetched():
    with pytest.raises(BdguardError, match="has no weights 'NOPE'; its weights: IMAGENET1K_V1"):
        build_model("torchvision:resnet18", 10, 3, [0.5] * 3, [0.25] * 3, weights="NOPE")
