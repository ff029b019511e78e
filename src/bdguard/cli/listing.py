"""`bdguard datasets|attacks|defenses|models`: what the registries hold."""

from __future__ import annotations

import dataclasses
import sys

from rich import box
from rich.console import Console
from rich.table import Table

from bdguard.attacks import ATTACKS
from bdguard.data import dataset_status
from bdguard.defenses import DEFENSES
from bdguard.detectors import DETECTORS
from bdguard.models import MODELS

# a pipe or file gets wide lines rather than rich's 80-column default
_console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _params(cls: type) -> str:
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    parts = []
    for f in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        parts.append(f"{f.name}={default}")
    return ", ".join(parts) or "-"


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
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
        rate = "fraction of the target class" if cls.clean_label else "fraction of the whole set"
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


def list_models() -> int:
    table = _table("model", "description")
    for name in MODELS:
        doc = (MODELS.get(name).__doc__ or "").strip().splitlines()
        table.add_row(name, doc[0] if doc else "")
    _console.print(table)
    return 0
