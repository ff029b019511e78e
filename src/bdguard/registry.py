"""Name -> class/function registries, one per kind (data sets, models, attacks, defenses)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from difflib import get_close_matches
from typing import Generic, TypeVar

from bdguard.errors import BdguardError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from a public name to an object, filled by the `register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, item):
        """`@REGISTRY.register` on a class registers it under its `name` attribute (attacks, defenses, detectors,
        data sets: the name is written once, on the class); `REGISTRY.register("name")` returns a decorator that
        registers any object under that name (model builders, which are functions too)."""
        if isinstance(item, str):
            return lambda obj: self._add(item, obj)
        return self._add(item.name, item)

    def _add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(sorted(self._items))
            raise BdguardError(f"unknown {self.kind} {name!r}{hint}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_modules(package: str, path: list[str]) -> None:
    """Import every module and sub-package of `package` (`path` is its `__path__`), so that each registers what it
    defines: a new attack, defense, detector, data set or model is one new file, with no import line to add."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
