"""`bdguard datasets|attacks|defenses|models`: what the registries hold."""

from __future__ import annotations

import dataclasses
import sys
import typing

from rich import box
from rich.console import Console
from rich.table import Table

from bdguard.attacks import ATTACKS
from bdguard.data import dataset_status
from bdguard.defenses import DEFENSES
from bdguard.detectors import DETECTORS
from bdguard.models import MODELS

# a terminal gets its own width; a pipe or file 120 columns, which one setting per line keeps readable
_console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def _value(value: object) -> str:
    """A default as a person writes it: 16/255 rather than 0.06274509803921569, 0.1 rather than 0.1000001."""
    if not isinstance(value, float):
        return str(value)
    short, steps = f"{value:g}", value * 255
    if len(short) > 6 and 0 < value < 1 and abs(steps - round(steps)) < 1e-9:  # a step of an 8-bit pixel value
        return f"{round(steps)}/255"
    return short


def _params(cls: type) -> str:
    """One setting per line: name=default, and the choices where the setting takes one of a few."""
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    hints = typing.get_type_hints(cls) if fields else {}
    parts = []
    for f in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        shown = f" ({'|'.join(map(str, choices))})" if choices else ""
        parts.append(f"{f.name}={_value(default)}{shown}")
    return "\n".join(parts) or "-"


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_lines=False)
    for column in columns:  # the settings, one a line, get the room they need
        table.add_column(column, overflow="fold", min_width=34 if column.startswith("parameters") else None)
    return table


def list_datasets() -> int:
    table = _table("data set", "offline here", "where from", "description")
    for row in dataset_status():
        table.add_row(row["name"], "yes" if row["available"] else "no", row["where"], row["description"])
    _console.print(table)
    return 0


def list_attacks() -> int:
    table = _table("attack", "labels", "rate means", "parameters (defaults)", "presets")
    for name in ATTACKS:
        cls = ATTACKS.get(name)
        labels = "clean-label" if cls.clean_label else "poison-label"
        rate = "of the target class" if cls.clean_label else "of the whole set"
        if not cls.has_trigger:
            labels, rate = "-", "-"
        table.add_row(name, labels, rate, _params(cls.Params), ", ".join(cls.presets) or "-")
    _console.print(table)
    return 0


def list_defenses() -> int:
    table = _table("defense", "stage", "parameters (defaults)", "presets", "description")
    for name in DEFENSES:
        cls = DEFENSES.get(name)
        table.add_row(name, cls.stage, _params(cls.Params), ", ".join(cls.presets) or "-", cls.description)
    _console.print(table)
    return 0


def list_detectors() -> int:
    table = _table("detector", "reads", "parameters (defaults)", "description")
    for name in DETECTORS:
        cls = DETECTORS.get(name)
        reads = "a trained model (--model, or trains one)" if cls.uses_model else "trains its own network"
        table.add_row(name, reads, _params(cls.Params), cls.description)
    _console.print(table)
    return 0


SOURCES = {  # the model sources of MODELS, as `bdguard models` shows them
    "torchvision": "any classification model of torchvision.models (option weights: a torchvision weights name)",
    "timm": "any model of timm.create_model, pip install 'bdguard[timm]' (option pretrained: true)",
}


def list_models() -> int:
    table = _table("model", "description")
    for name in MODELS:
        doc = (MODELS.get(name).__doc__ or "").strip().splitlines()
        table.add_row(name, doc[0] if doc else "")
    for prefix in sorted(MODELS.sources):
        table.add_row(f"{prefix}:NAME", SOURCES.get(prefix, ""))
    _console.print(table)
    return 0
