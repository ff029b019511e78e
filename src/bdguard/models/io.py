"""Model files: weights in safetensors plus the metadata to rebuild the architecture; never a pickle.

`save_model(model, "m.safetensors", meta)` writes m.safetensors (metadata also in its header under "bdguard")
and the sidecar m.json. `load_model` prefers the sidecar, so a foreign safetensors file can be described by hand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bdguard.config import MAX_DEPTH, nesting_depth
from bdguard.errors import BdguardError
from bdguard.io import atomic_path, write_text
from bdguard.models.base import INITIAL_WEIGHT_OPTIONS, BackdoorModel, build_model

HEADER_KEY = "bdguard"
RECORDS = ("attack", "defense", "train", "repair")  # what bdguard records in `extra`: each a table of settings


@dataclass
class ModelMeta:
    """What a model file needs besides its weights. Sequences are normalised to lists so JSON round-trips equal."""

    format: ClassVar[str] = "bdguard-model"
    format_version: ClassVar[int] = 1

    architecture: str
    arch_kwargs: dict[str, Any]
    num_classes: int
    classes: list[str]
    input_shape: list[int]  # (C, H, W)
    mean: list[float]
    std: list[float]
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)  # free-form: attack, defense, training config...

    def __post_init__(self) -> None:
        _require(isinstance(self.architecture, str) and self.architecture, "architecture must be a non-empty string")
        _require(isinstance(self.arch_kwargs, Mapping), "arch_kwargs must be an object")
        _require(_is_int(self.num_classes) and self.num_classes >= 1, "num_classes must be a positive integer")
        _require(
            isinstance(self.classes, list | tuple) and all(isinstance(c, str) for c in self.classes),
            "classes must be a list of strings",
        )
        _require(len(self.classes) == self.num_classes, "classes must have num_classes entries")
        _require(
            isinstance(self.input_shape, list | tuple)
            and len(self.input_shape) == 3
            and all(_is_int(v) and v >= 1 for v in self.input_shape),
            "input_shape must be three positive integers (C, H, W)",
        )
        for name in ("mean", "std"):
            values = getattr(self, name)
            _require(
                isinstance(values, list | tuple)
                and len(values) == self.input_shape[0]
                and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values),
                f"{name} must be {self.input_shape[0]} finite numbers, one per channel",
            )
        _require(all(v > 0 for v in self.std), "std must be > 0")
        _require(isinstance(self.dataset, str), "dataset must be a string")
        _require(isinstance(self.extra, Mapping), "extra must be an object")
        for key in RECORDS:
            record = self.extra.get(key)
            _require(record is None or isinstance(record, Mapping), f"extra.{key} must be an object")
        self.arch_kwargs = dict(self.arch_kwargs)
        self.classes = list(self.classes)
        self.input_shape = list(self.input_shape)
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.extra = dict(self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "format_version": self.format_version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ModelMeta:
        """Parse and validate metadata read from `source` (named in errors)."""
        if not isinstance(data, dict):
            raise BdguardError(f"{source}: model metadata must be a JSON object")
        if nesting_depth(data) > MAX_DEPTH:
            raise BdguardError(f"{source}: model metadata is nested too deeply (at most {MAX_DEPTH} levels)")
        if data.get("format") != cls.format:
            raise BdguardError(f"{source}: format is {data.get('format')!r}, expected {cls.format!r}")
        if data.get("format_version") != cls.format_version:
            raise BdguardError(
                f"{source}: format_version {data.get('format_version')!r} is not supported "
                f"(this bdguard reads version {cls.format_version})"
            )
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(body) - set(names))
        missing = [n for n in names if n not in body and n != "extra"]
        if unknown or missing:
            raise BdguardError(f"{source}: model metadata has unknown keys {unknown} and lacks keys {missing}")
        try:
            return cls(**body)
        except BdguardError as e:
            raise BdguardError(f"{source}: {e}") from None


def save_model(model: BackdoorModel, path: str | os.PathLike, meta: ModelMeta) -> None:
    """Write `path` (.safetensors, metadata in the header too) and its sidecar `path.with_suffix(".json")`, atomically.

    The metadata is checked against the model first (by building the architecture it names), so every file written
    here loads again.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BdguardError(f"model files are written as .safetensors, got {path}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_state_dict(_build(meta).state_dict(), tensors, f"model for {path}")
    for name in ("mean", "std"):
        if not torch.allclose(tensors[name].flatten().float(), torch.tensor(getattr(meta, name))):
            raise BdguardError(f"meta.{name} {getattr(meta, name)} differs from the model's {tensors[name].flatten()}")

    path.parent.mkdir(parents=True, exist_ok=True)
    meta_dict = meta.to_dict()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(meta_dict)})
    write_text(path.with_suffix(".json"), json.dumps(meta_dict, indent=2) + "\n")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[BackdoorModel, ModelMeta]:
    """Rebuild a model from a bdguard safetensors file; the model is returned in eval mode on `device`, in the
    channels_last memory format its training used (a network left in NCHW infers about 3x slower on CPU)."""
    path = Path(path)
    if path.is_dir():
        raise BdguardError(f"model file {path} is a folder; pass the .safetensors file in it")
    if not path.is_file():
        raise BdguardError(f"model file {path} does not exist")
    try:
        # safetensors parses a length-prefixed JSON header and raw tensor bytes: no code is ever executed
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError) as e:
        raise BdguardError(_why_not_safetensors(path, e)) from None

    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BdguardError(f"cannot read model metadata {sidecar}: {e}") from None
        except RecursionError:
            raise BdguardError(f"model metadata {sidecar} is nested too deeply") from None
        meta = ModelMeta.from_dict(data, str(sidecar))
    elif HEADER_KEY in header:
        try:
            data = json.loads(header[HEADER_KEY])
        except json.JSONDecodeError as e:
            raise BdguardError(f"{path}: the {HEADER_KEY!r} header metadata is not valid JSON: {e}") from None
        except RecursionError:
            raise BdguardError(f"{path}: the {HEADER_KEY!r} header metadata is nested too deeply") from None
        meta = ModelMeta.from_dict(data, f"{path} header")
    else:
        raise BdguardError(
            f"{path} has no bdguard metadata and no sidecar {sidecar}; write that JSON (format 'bdguard-model', "
            "format_version 1, architecture, arch_kwargs, num_classes, classes, input_shape, mean, std, dataset) "
            "so bdguard knows which architecture the weights belong to"
        )

    model = _build(meta)
    _check_state_dict(model.state_dict(), tensors, str(path))
    model.load_state_dict(tensors, strict=True)
    return model.to(device, memory_format=torch.channels_last).eval(), meta


MAX_PARAMETERS = 10**9  # far above any architecture bdguard trains; a sidecar asking for more is refused


def _build(meta: ModelMeta) -> BackdoorModel:
    """The architecture the metadata names, sized on the meta device first (no memory), so a sidecar that asks for
    an absurd width is refused before anything is allocated."""

    # the weights come from the file: an option that would download initial ones is moot
    options = {key: value for key, value in meta.arch_kwargs.items() if key not in INITIAL_WEIGHT_OPTIONS}

    def make() -> BackdoorModel:
        return build_model(meta.architecture, meta.num_classes, meta.input_shape[0], meta.mean, meta.std, **options)

    with torch.device("meta"):
        count = sum(p.numel() for p in make().parameters())
    if count > MAX_PARAMETERS:
        raise BdguardError(
            f"model metadata asks for a {meta.architecture} with {count:,} parameters (options {meta.arch_kwargs}); "
            f"more than {MAX_PARAMETERS:,} is refused"
        )
    return make()


def _check_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse any missing or unexpected key or shape mismatch, naming the first few (never load non-strictly)."""
    found = {
        "missing keys": [k for k in expected if k not in got],
        "unexpected keys": [k for k in got if k not in expected],
        "shape mismatches": [
            f"{k} {tuple(got[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in got and got[k].shape != v.shape
        ],
        # an int8 or bool tensor where the model keeps floats would be cast without a word
        "type mismatches": [
            f"{k} {got[k].dtype} where the model keeps {v.dtype}"
            for k, v in expected.items()
            if k in got and got[k].is_floating_point() != v.is_floating_point()
        ],
        # NaN or infinite weights give a model that answers one class whatever it sees
        "non-finite values": [
            k for k, v in got.items() if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())
        ],
    }
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
        for label, keys in found.items()
        if keys
    ]
    if problems:
        raise BdguardError(f"{source}: weights do not match the architecture: {'; '.join(problems)}")


def _why_not_safetensors(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (b"PK") or, in its legacy format, a pickle (protocol 2+ starts with 0x80)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return (
            f"{path} is a pickled PyTorch file; bdguard never unpickles model files from others (unpickling runs "
            "arbitrary code); convert it to safetensors in a trusted environment (safetensors.torch.save_file on the "
            "state dict) and describe it with a sidecar JSON"
        )
    hint = "; pass the .safetensors file, not its JSON sidecar" if path.suffix == ".json" else ""
    return f"{path} is not a valid safetensors file (truncated or corrupt?): {error}{hint}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: object, message: str) -> None:
    if not condition:
        raise BdguardError(message)
