"""memory:<name>: a data set handed over by Python code in this process (`bdguard.api` turns a caller's torch
Dataset into one), so that the API runs exactly the commands' code; there is nothing to find on disk or cache."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from bdguard.data.sources import DATASETS, DatasetSource, RawSplits
from bdguard.errors import BdguardError

_HELD: dict[str, tuple[RawSplits, bool]] = {}
_NUMBERS = itertools.count()


@contextmanager
def held(raw: RawSplits, flip: bool, label: str = "dataset") -> Iterator[str]:
    """The data set name (`memory:LABEL-N`) under which `raw` loads while the block runs."""
    name = f"{label}-{next(_NUMBERS)}"
    _HELD[name] = (raw, flip)
    try:
        yield f"memory:{name}"
    finally:
        del _HELD[name]


@DATASETS.register
class MemorySource(DatasetSource):
    name = "memory"
    description = "memory:<name>: a data set handed to bdguard.api by Python code (not for the command line)"
    flip = False
    cacheable = False  # already decoded
    argument = "<name>"

    @classmethod
    def takes_arg(cls) -> bool:
        return True

    @property
    def bundle_name(self) -> str:
        return f"memory:{self.arg}"

    def _held(self) -> tuple[RawSplits, bool]:
        if self.arg not in _HELD:
            raise BdguardError(f"memory:{self.arg} is no data set held by this process (memory: is for bdguard.api)")
        return _HELD[self.arg]

    def locate(self) -> str | None:
        return None if self.arg not in _HELD else f"memory:{self.arg}"

    def identity(self) -> str:
        return f"memory|{self.arg}"

    def class_names(self) -> tuple[str, ...] | None:
        return self._held()[0].classes

    def load(self) -> RawSplits:
        raw, self.flip = self._held()  # whether a flip keeps the label is the caller's to say
        return raw

    def status(self) -> tuple[bool, str]:
        return False, "from Python only: bdguard.api"
