"""bdguard.models: the features/classify interface, the feature mask, and safetensors model files."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bdguard.models.io as model_io
from bdguard.errors import BdguardError
from bdguard.models import MODELS, BackdoorModel, ModelMeta, build_model, load_model, save_model

MEAN = {1: (0.13,), 3: (0.49, 0.48, 0.45)}
STD = {1: (0.31,), 3: (0.25, 0.24, 0.26)}


def make(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> BackdoorModel:
    torch.manual_seed(0)
    return build_model(name, num_classes, in_channels, MEAN[in_channels], STD[in_channels], **kwargs).eval()


def meta_for(name: str, in_channels: int = 3, size: int = 32, num_classes: int = 10, **kwargs) -> ModelMeta:
    return ModelMeta(
        architecture=name,
        arch_kwargs=kwargs,
        num_classes=num_classes,
        classes=[f"class{i}" for i in range(num_classes)],
        input_shape=[in_channels, size, size],
        mean=list(MEAN[in_channels]),
        std=list(STD[in_channels]),
        dataset="toy",
        extra={"attack": {"name": "badnets", "rate": 0.1}, "epochs": 3},
    )


def images(n: int, in_channels: int, size: int) -> torch.Tensor:
    return torch.rand(n, in_channels, size, size, generator=torch.Generator().manual_seed(1))


CASES = [(name, c, s) for name in MODELS.names() for c in (1, 3) for s in (28, 32)] + [
    ("small-cnn", 1, 8),
    ("small-cnn", 3, 8),
]


def test_all_architectures_registered():
    assert MODELS.names() == ["alexnet", "preact-resnet18", "resnet18", "resnet20", "small-cnn"]


@pytest.mark.parametrize("name,in_channels,size", CASES)
def test_interface(name, in_channels, size):
    model = make(name, in_channels, num_classes=7)
    x = images(3, in_channels, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        assert logits.shape == (3, 7)
        assert feats.dim() == 4 and feats.shape[:2] == (3, model.feature_channels)
        assert torch.equal(logits, model.classify(feats))
        # the feature map is taken after the final activation
        assert (feats >= 0).all() and (feats > 0).any()
    assert {"mean", "std", "feature_mask"} <= set(model.state_dict())


@pytest.mark.parametrize(
    "name,size,shape",
    [
        ("resnet18", 32, (512, 4, 4)),
        ("preact-resnet18", 32, (512, 4, 4)),
        ("resnet20", 32, (64, 8, 8)),
        ("alexnet", 32, (256, 8, 8)),
        ("small-cnn", 28, (128, 7, 7)),
        ("small-cnn", 8, (128, 2, 2)),
    ],
)
def test_feature_map_shapes(name, size, shape):
    with torch.no_grad():
        assert make(name).features(images(2, 3, size)).shape[1:] == shape


def test_resnet20_width_and_param_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 250_000 <= count(make("resnet20")) <= 300_000
    assert make("resnet20", width=2).feature_channels == 128
    # width 4: the 64-192-384-256-256 convolutions and two fully connected layers of
    # docs/methods/linf-pruning.md section 9
    assert [m.out_channels for m in make("alexnet").modules() if isinstance(m, nn.Conv2d)] == [64, 192, 384, 256, 256]
    assert [m.out_features for m in make("alexnet").modules() if isinstance(m, nn.Linear)] == [256, 10]
    assert make("alexnet", width=2).feature_channels == 128
    assert 11_000_000 <= count(make("resnet18")) <= 11_300_000
    assert 11_000_000 <= count(make("preact-resnet18")) <= 11_300_000


@pytest.mark.parametrize("name", MODELS.names())
def test_feature_mask_zeroes_exactly_one_channel(name):
    model = make(name)
    x = images(4, 3, 32)
    with torch.no_grad():
        before = model.features(x)
        logits_before = model(x)
        k = int(before.sum(dim=(0, 2, 3)).argmax())  # a channel that is active, so zeroing it is visible
        model.feature_mask[k] = 0
        after = model.features(x)
        assert (after[:, k] == 0).all()
        others = [c for c in range(model.feature_channels) if c != k]
        assert torch.equal(after[:, others], before[:, others])
        assert not torch.equal(model(x), logits_before)
        assert torch.equal(model(x), model.classify(after))


def test_normalisation_happens_inside():
    model = make("small-cnn", 3)
    plain = build_model("small-cnn", 10, 3, (0.0,) * 3, (1.0,) * 3).eval()
    state = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    plain.load_state_dict(state, strict=False)
    x = images(2, 3, 28)
    normalised = (x - torch.tensor(MEAN[3]).view(1, 3, 1, 1)) / torch.tensor(STD[3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(normalised), atol=1e-5)
        assert not torch.allclose(model(x), plain(x), atol=1e-3)


def test_bad_inputs_refused():
    model = make("small-cnn", 1)
    with pytest.raises(BdguardError, match="float images"):
        model((images(2, 1, 28) * 255).to(torch.uint8))
    with pytest.raises(BdguardError, match=r"\(N, 1, H, W\)"):
        model(images(2, 3, 28))
    with pytest.raises(BdguardError, match="one value per input channel"):
        build_model("small-cnn", 10, 3, (0.5,), (0.5,))
    with pytest.raises(BdguardError, match="std"):
        build_model("small-cnn", 10, 1, (0.5,), (0.0,))


def test_build_errors():
    with pytest.raises(BdguardError, match="unknown model 'resnet-18'.*did you mean 'resnet18'"):
        build_model("resnet-18", 10, 3, MEAN[3], STD[3])
    with pytest.raises(BdguardError, match="no option width; its options: none"):
        build_model("resnet18", 10, 3, MEAN[3], STD[3], width=2)
    with pytest.raises(BdguardError, match="width must be a positive integer"):
        build_model("resnet20", 10, 3, MEAN[3], STD[3], width=0)
    # --set gives strings: the builder's annotation types them, and refuses what is not one
    assert build_model("alexnet", 10, 3, MEAN[3], STD[3], width="2").feature_channels == 128
    with pytest.raises(BdguardError, match="width must be an integer"):
        build_model("alexnet", 10, 3, MEAN[3], STD[3], width="two")


# ---- model files ---------------------------------------------------------------------------------------------------


def perturbed(model: BackdoorModel) -> BackdoorModel:
    """Non-default buffers too, so a round trip that dropped BN statistics or the mask would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.feature_mask[[1, 5]] = 0
    return model


@pytest.mark.parametrize("name,in_channels,size,kwargs", [("resnet20", 3, 32, {"width": 2}), ("small-cnn", 1, 28, {})])
def test_round_trip(tmp_path, name, in_channels, size, kwargs):
    model = perturbed(make(name, in_channels, **kwargs))
    meta = meta_for(name, in_channels, size, **kwargs)
    path = tmp_path / "out" / "model.safetensors"
    save_model(model, path, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]

    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format"] == "bdguard-model" and sidecar["format_version"] == 1
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["bdguard"]) == sidecar

    loaded, loaded_meta = load_model(path)
    assert loaded_meta == meta and loaded_meta.extra == meta.extra
    assert not loaded.training
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in loaded.parameters() if p.dim() == 4)
    x = images(3, in_channels, size)
    model = model.to(memory_format=torch.channels_last)  # as loaded: the same arithmetic
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.feature_mask, model.feature_mask) and loaded.feature_mask[5] == 0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # without the sidecar the header metadata is enough
    path.with_suffix(".json").unlink()
    assert load_model(path)[1] == meta


def test_sidecar_wins_over_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(make("small-cnn"), path, meta_for("small-cnn"))
    data = json.loads(path.with_suffix(".json").read_text())
    data["dataset"] = "edited by hand"
    path.with_suffix(".json").write_text(json.dumps(data))
    assert load_model(path)[1].dataset == "edited by hand"


def test_save_refuses_meta_that_does_not_match(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(BdguardError, match="shape mismatches.*fc.weight"):
        save_model(make("small-cnn"), path, meta_for("small-cnn", num_classes=5))
    with pytest.raises(BdguardError, match="missing keys"):
        save_model(make("small-cnn"), path, meta_for("resnet20"))
    with pytest.raises(BdguardError, match="meta.mean"):
        save_model(make("small-cnn", 1), path, dataclasses.replace(meta_for("small-cnn", 1), mean=[0.9]))
    with pytest.raises(BdguardError, match=".safetensors"):
        save_model(make("small-cnn"), tmp_path / "m.pt", meta_for("small-cnn"))
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(make("small-cnn"), path, meta_for("small-cnn"))
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(perturbed(make("small-cnn")), path, meta_for("small-cnn"))
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def _touch(path: str) -> None:
    Path(path).write_text("unpickled!")


class SideEffect:
    """Unpickling this writes a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_side_effect_pickle_works(tmp_path):
    # the check below is only meaningful if unpickling SideEffect really leaves a marker
    pickle.loads(pickle.dumps(SideEffect(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "pickle", "pickle-protocol-0"])
def test_pickles_are_never_unpickled(tmp_path, monkeypatch, kind):
    marker = tmp_path / "marker"
    payload = {**make("small-cnn").state_dict(), "evil": SideEffect(marker)}
    path = tmp_path / "model.pt"
    if kind == "torch-zip":
        torch.save(payload, path)
    elif kind == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(SideEffect(marker), protocol=0 if kind.endswith("0") else 5))

    def forbidden(*args, **kwargs):
        raise AssertionError("model loading must never unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(BdguardError) as info:
        load_model(path)
    if kind != "pickle-protocol-0":  # protocol 0 has no magic byte; it is refused as not safetensors
        assert "is a pickled PyTorch file; bdguard never unpickles" in str(info.value)  # tmp_path holds "pickle"
    assert not marker.exists()


@pytest.mark.parametrize("cut", ["half", "one-byte-short", "empty", "header-only"])
def test_truncated_file_refused(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    save_model(make("small-cnn"), path, meta_for("small-cnn"))
    data = path.read_bytes()
    path.write_bytes(
        {"half": data[: len(data) // 2], "one-byte-short": data[:-1], "empty": b"", "header-only": data[:8]}[cut]
    )
    with pytest.raises(BdguardError, match="not a valid safetensors file"):
        load_model(path)


def test_missing_file_refused(tmp_path):
    with pytest.raises(BdguardError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(BdguardError, match="is a folder"):
        load_model(tmp_path)


def _saved_with_sidecar(tmp_path, architecture: str) -> tuple[Path, dict]:
    """A saved model and its sidecar's metadata, for a test to rewrite the sidecar."""
    path = tmp_path / "m.safetensors"
    save_model(make(architecture), path, meta_for(architecture))
    return path, json.loads(path.with_suffix(".json").read_text())


def test_deeply_nested_metadata_refused(tmp_path):
    path, meta = _saved_with_sidecar(tmp_path, "small-cnn")
    for nested in ("[" * 200_000 + "]" * 200_000, "[" * 40 + "]" * 40):  # beyond the parser's stack; past our limit
        path.with_suffix(".json").write_text(json.dumps({**meta, "extra": "X"}).replace('"X"', nested))
        with pytest.raises(BdguardError, match="nested too deeply"):
            load_model(path)


def test_an_absurd_architecture_in_the_metadata_is_refused_before_allocation(tmp_path):
    path, meta = _saved_with_sidecar(tmp_path, "resnet20")
    path.with_suffix(".json").write_text(json.dumps({**meta, "arch_kwargs": {"width": 100000}}))
    with pytest.raises(BdguardError, match="parameters .* is refused"):
        load_model(path)


def test_model_files_get_the_same_mode_as_every_output(tmp_path):
    import os

    path = tmp_path / "m.safetensors"
    save_model(make("small-cnn"), path, meta_for("small-cnn"))
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o666 & ~umask}


def _write_raw(path: Path, tensors: dict, meta: ModelMeta | None) -> None:
    metadata = {"bdguard": json.dumps(meta.to_dict())} if meta else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_weight_mismatches_refused(tmp_path):
    state = make("small-cnn").state_dict()
    path = tmp_path / "m.safetensors"
    _write_raw(path, {k: v for k, v in state.items() if k != "fc.bias"}, meta_for("small-cnn"))
    with pytest.raises(BdguardError, match=r"missing keys \(1\): fc\.bias"):
        load_model(path)
    _write_raw(path, {**state, "head.weight": torch.zeros(2)}, meta_for("small-cnn"))
    with pytest.raises(BdguardError, match=r"unexpected keys \(1\): head\.weight"):
        load_model(path)
    _write_raw(path, state, meta_for("small-cnn", num_classes=4))
    with pytest.raises(BdguardError, match=r"shape mismatches \(2\): fc\.weight \(10, 128\) != \(4, 128\)"):
        load_model(path)
    for dtype in (torch.int8, torch.bool):
        _write_raw(path, {**state, "fc.weight": state["fc.weight"].to(dtype)}, meta_for("small-cnn"))
        with pytest.raises(BdguardError, match=rf"type mismatches \(1\): fc\.weight {dtype} where"):
            load_model(path)
    _write_raw(
        path,
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
        meta_for("small-cnn"),
    )
    with pytest.raises(BdguardError, match=r"non-finite values \(\d+\): "):
        load_model(path)


def test_metadata_problems_refused(tmp_path):
    state = make("small-cnn").state_dict()
    path = tmp_path / "m.safetensors"
    _write_raw(path, state, None)
    with pytest.raises(BdguardError, match="no bdguard metadata and no sidecar .*m.json"):
        load_model(path)

    sidecar = path.with_suffix(".json")
    good = meta_for("small-cnn").to_dict()
    for change, message in [
        ({"architecture": "resnet99"}, "unknown model 'resnet99'"),
        ({"format": "other"}, "format is 'other'"),
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"mean": [0.5]}, "mean must be 3 finite numbers"),
        ({"classes": ["a"]}, "classes must have num_classes entries"),
        ({"arch_kwargs": {"width": 2}}, "no option width"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"extra": {"defense": "none"}}, "extra.defense must be an object"),
    ]:
        sidecar.write_text(json.dumps({**good, **change}))
        with pytest.raises(BdguardError, match=message):
            load_model(path)
    sidecar.write_text("{not json")
    with pytest.raises(BdguardError, match="cannot read model metadata"):
        load_model(path)
    sidecar.write_text(json.dumps(good))
    assert load_model(path)[1] == meta_for("small-cnn")
