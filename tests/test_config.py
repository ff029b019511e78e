from dataclasses import dataclass, field
from typing import Literal

import pytest

from bdguard.config import from_dict, load_file, parse_assignments, to_dict
from bdguard.errors import BdguardError
from bdguard.runs.train import RunConfig


@dataclass
class Inner:
    rate: float = 0.1
    names: tuple[str, ...] = ("a",)


@dataclass
class Outer:
    count: int = 1
    flag: bool = False
    mode: Literal["x", "y"] = "x"
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_strings_are_converted_by_field_type():
    cfg = from_dict(
        Outer, {"count": "3", "flag": "yes", "mode": "y", "path": "none", "inner": {"rate": "0.5", "names": "p,q"}}
    )
    assert cfg == Outer(count=3, flag=True, mode="y", path=None, inner=Inner(rate=0.5, names=("p", "q")))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"count": "three"}, "count must be an integer"),
        ({"flag": "maybe"}, "flag must be true or false"),
        ({"mode": "z"}, "mode must be one of x, y"),
        ({"colour": 1}, "unknown setting 'colour'"),
        ({"inner": {"rat": 1}}, "unknown setting 'inner.rat'"),
        ({"inner": 3}, "inner must be a table"),
        ({"inner": {"rate": "nan"}}, "inner.rate must be a finite number"),
        ({"inner": {"rate": "inf"}}, "inner.rate must be a finite number"),
        ({"inner": {"rate": float("-inf")}}, "inner.rate must be a finite number"),
        ({"count": "100000000000000000000"}, "count is too large"),
        ({"count": -(2**63)}, "count is too large"),
    ],
)
def test_bad_values_are_refused_with_the_name(data, message):
    with pytest.raises(BdguardError, match=message):
        from_dict(Outer, data)


def test_run_config_from_toml_and_yaml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[attack]\nname = "badnets"\nrate = 0.05\n[attack.params]\npatch_size = 4\n[train]\nepochs = 2\n')
    yaml = tmp_path / "run.yaml"
    yaml.write_text("attack:\n  name: badnets\n  rate: 0.05\n  params: {patch_size: 4}\ntrain:\n  epochs: 2\n")
    a, b = (RunConfig.from_dict(load_file(p)) for p in (toml, yaml))
    assert a == b
    assert a.attack.rate == 0.05 and a.attack.params == {"patch_size": 4} and a.train.epochs == 2
    assert to_dict(a)["train"]["milestones"] == [0.5, 0.75]


def test_range_checks_in_post_init():
    with pytest.raises(BdguardError, match=r"attack rate must be in \[0.0, 1.0\], got 1.5"):
        RunConfig.from_dict({"attack": {"rate": 1.5}})
    with pytest.raises(BdguardError, match="train.epochs"):
        RunConfig.from_dict({"train": {"epochs": 0}})


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[attack\n")
    with pytest.raises(BdguardError, match="cannot parse config file"):
        load_file(bad)
    with pytest.raises(BdguardError, match="not found"):
        load_file(tmp_path / "missing.toml")


def test_parse_assignments():
    assert parse_assignments(["a=1", "b.c = x=y"]) == {"a": "1", "b.c": "x=y"}
    with pytest.raises(BdguardError, match="key=value"):
        parse_assignments(["novalue"])


def test_deeply_nested_config_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(BdguardError, match="nested too deeply"):
        load_file(deep)
    toml = tmp_path / "deep.toml"
    toml.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(BdguardError, match="nested too deeply"):
        load_file(toml)
    fine = tmp_path / "fine.toml"
    fine.write_text("[train]\nlr = 0.1\n")
    assert load_file(fine) == {"train": {"lr": 0.1}}
