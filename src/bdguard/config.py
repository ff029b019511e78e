"""Typed dataclass configs filled from dicts, TOML/YAML files and `key=value` strings.

One mechanism serves the CLI and the Python API: a config is built from a nested dict of
defaults < file < flags, every value checked against the field's type, unknown keys refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from bdguard.errors import BdguardError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", ""}
INT_LIMIT = 2**63  # what a torch int64 holds: a larger count is a typo, and torch would fail on it deep inside
MAX_DEPTH = 32  # tables nested deeper than this in a config file are refused before anything walks them
MAX_SEED = 2**32 - 1  # a seed is mixed with epoch and round numbers into torch's 64-bit generator seeds


@dataclass
class NoParams:
    """The settings of an attack, defense or detector that has none."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`, converting strings (CLI, --set) where unambiguous."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional or tp is Any:
            return None
        raise BdguardError(f"{name} must not be empty")
    tp = inner
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise BdguardError(f"{name} must be a table of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise BdguardError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise BdguardError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise BdguardError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            try:
                value = int(str(value).strip())
            except ValueError:
                raise BdguardError(f"{name} must be an integer, got {value!r}") from None
        if abs(value) >= INT_LIMIT:
            raise BdguardError(f"{name} is too large: {value}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise BdguardError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BdguardError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise BdguardError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise BdguardError(f"{name} must be a string, got {value!r}")
    if origin in (tuple, list):
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise BdguardError(f"{name} must be a list, got {value!r}")
        args = get_args(tp)
        item_type = args[0] if args else Any
        converted = [coerce(v, item_type, f"{name}[{i}]") for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise BdguardError(f"{name} must be a table of settings, got {value!r}")
        args = get_args(tp)
        if not args:
            return dict(value)
        # keys stay as given (TOML and --set keys are strings); values are checked against the value type
        return {key: coerce(item, args[1], f"{name}.{key}") for key, item in value.items()}
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # a bug in a config class, not user input


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every key and value; `__post_init__` then validates ranges."""
    if not isinstance(data, Mapping):
        raise BdguardError(f"{prefix.rstrip('.') or cls.__name__} must be a table of settings")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown and not fields:
        owner = prefix.rstrip(".") or cls.__name__
        raise BdguardError(f"unknown setting '{prefix}{unknown[0]}': {owner} takes no settings")
    if unknown:
        raise BdguardError(f"unknown setting '{prefix}{unknown[0]}'; known: {', '.join(fields)}")
    kwargs = {key: coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


class RootConfig:
    """Base of the top-level run configs: `Config.from_dict(table)` builds one, checking every key and value."""

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        return from_dict(cls, data)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def parse_assignments(pairs: list[str] | None) -> dict[str, str]:
    """['a=1', 'b.c=x'] -> {'a': '1', 'b.c': 'x'}; the values stay strings until a field's type converts them."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BdguardError(f"--set expects key=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b', creating tables on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BdguardError(f"setting {dotted!r}: {part!r} is a value, not a table")
    node[leaf] = value


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, anything else in `update` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise BdguardError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            data = _load_yaml(path.read_text(), path)
        else:
            raise BdguardError(f"config file must end in .toml, .yaml or .yml: {path}")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BdguardError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise BdguardError(f"config file {path} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise BdguardError(f"config file {path} must hold a table of settings")
    if nesting_depth(data) > MAX_DEPTH:
        raise BdguardError(f"config file {path} is nested too deeply (at most {MAX_DEPTH} levels)")
    _check_names(data, path)
    return data


def _load_yaml(text: str, path: Path) -> Any:
    """YAML without anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes, and settings
    never need them. Both checks read the event stream, which stops at the first offence (building the nested
    objects first took seconds on a 5,000-deep file)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise BdguardError(f"config file {path} uses YAML aliases (*name); write the settings out instead")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH + 1:  # the file's own table counts here, not in nesting_depth
                raise BdguardError(f"config file {path} is nested too deeply (at most {MAX_DEPTH} levels)")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text) or {}


def _check_names(data: Mapping[str, Any], path: Path) -> None:
    """Every table key is a setting's name: text (YAML would also take numbers, booleans or null)."""
    level: list[Any] = [data]
    while level:
        children: list[Any] = []
        for item in level:
            if isinstance(item, Mapping):
                bad = next((key for key in item if not isinstance(key, str)), None)
                if bad is not None:
                    raise BdguardError(f"config file {path}: setting names must be text, got {bad!r}")
                children.extend(item.values())
            elif isinstance(item, list | tuple):
                children.extend(item)
        level = children


def nesting_depth(value: Any, limit: int = MAX_DEPTH + 1) -> int:
    """How deeply tables and lists nest in `value`, counted up to `limit` (without recursion, so any depth is safe)."""
    deepest, level = 0, [value]
    while level and deepest < limit:
        children = []
        for item in level:
            if isinstance(item, Mapping):
                children.extend(item.values())
            elif isinstance(item, list | tuple):
                children.extend(item)
        if children:
            deepest += 1
        level = children
    return deepest


def with_preset(
    settings: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]], owner: str, record: bool
) -> dict[str, Any]:
    """`settings` over the preset that `settings["preset"]` names (given settings win). `owner` names the attack or
    defense in the error; with `record`, the preset's name stays among the settings (for a Params that records
    it)."""
    settings = dict(settings)
    name = settings.get("preset") if record else settings.pop("preset", None)
    if name is None:
        return settings
    if name not in presets:
        raise BdguardError(f"{owner} has no preset {name!r}; presets: {', '.join(presets) or 'none'}")
    return merge(dict(presets[name]), settings)


def check_seed(name: str, value: int) -> None:
    check_range(name, value, 0, MAX_SEED)


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Refuse a value outside [low, high] (or not finite) with the parameter's name and the allowed range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BdguardError(f"{name} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise BdguardError(f"{name} must be in [{lo}, {hi}], got {value}")
