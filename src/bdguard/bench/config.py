"""A bench suite: which attacks meet which defenses over which seeds, and every setting of their runs.

A suite is a plain TOML (or YAML) file, filled into `BenchConfig` by the same machinery as every other config
(`bdguard.config`): unknown keys and bad values are refused with their names. The shipped suites live in
`bench/suites/` (`smoke`, `cpu`, `cifar-cpu`, `paper`, `demo`); `--suite` takes one of their names or a copy's path.

Per cell (attack A, defense D, seed k) the runs' settings are, in this order: the shared sections (`data`,
`attack`, `train`, `probe`), then `[by_attack.A]` (attack options: target, mode, rate, params) and
`[by_defense.D]` (the defense's params and `train` settings for its cells: the whole run for a training-time
defense, the fine-tuning for a post-training one), then the seed: k is the training seed, the attack seed (which
samples are poisoned, generated triggers) and the probe seed of the cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from bdguard.attacks import ATTACKS, AttackConfig
from bdguard.config import RootConfig, check_seed, from_dict, load_file, merge, to_dict
from bdguard.data import DataConfig
from bdguard.defenses import DEFENSES, DefenseConfig, build_defense
from bdguard.detectors import DETECTORS, DetectorConfig, build_detector
from bdguard.errors import BdguardError
from bdguard.models.base import check_model_options
from bdguard.runs.repair import ProbeConfig
from bdguard.training import TrainConfig

SUITE_SUFFIXES = (".toml", ".yaml", ".yml")


@dataclass
class SharedAttack:
    """The attack settings every attack of the suite shares (each may override them in `by_attack`)."""

    target: int = 0
    mode: Literal["all2one", "all2all"] = "all2one"
    rate: float = 0.1


@dataclass
class AttackSettings:
    """`[by_attack.NAME]`: one attack's own settings; unset ones come from the shared `[attack]`."""

    target: int | None = None
    mode: Literal["all2one", "all2all"] | None = None
    rate: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DefenseSettings:
    """`[by_defense.NAME]`: the defense's params, and `train` settings over the shared `[train]` for its cells.
    With `defense`, NAME is a variant of that registered defense (e.g. `linf-prune-oracle`: linf-prune with
    trigger = "oracle"), listed in `defenses` and named in the tables like any other."""

    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    defense: str | None = None


@dataclass
class DetectorSettings:
    """`[by_detector.NAME]`: the detector's params, and `train` settings over the shared `[train]` for the network
    it trains (vab, abl)."""

    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchConfig(RootConfig):
    name: str = "custom"
    description: str = ""
    attacks: list[str] = field(default_factory=lambda: ["badnets"])
    defenses: list[str] = field(default_factory=lambda: ["none"])
    seeds: list[int] = field(default_factory=lambda: [0])
    detectors: list[str] = field(default_factory=list)  # poisoned-sample detectors run on every poisoned set
    gallery: bool = True  # a poisoning gallery (bdguard poison) per attack, for the report
    analyze: bool = False  # Grad-CAM and activation norms (bdguard analyze) of every cell's model with a trigger
    data: DataConfig = field(default_factory=DataConfig)
    attack: SharedAttack = field(default_factory=SharedAttack)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    by_attack: dict[str, AttackSettings] = field(default_factory=dict)
    by_defense: dict[str, DefenseSettings] = field(default_factory=dict)
    by_detector: dict[str, DetectorSettings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, names in (("attacks", self.attacks), ("defenses", self.defenses), ("seeds", self.seeds)):
            if not names:
                raise BdguardError(f"the suite's {kind} list is empty")
            if len(set(names)) != len(names):
                raise BdguardError(f"the suite's {kind} list repeats an entry: {list(names)}")
        if len(set(self.detectors)) != len(self.detectors):
            raise BdguardError(f"the suite's detectors list repeats an entry: {list(self.detectors)}")
        for seed in self.seeds:
            check_seed("seeds", seed)
        # unknown names and bad options fail here, before any run starts
        for name in {*self.attacks, *self.by_attack}:
            ATTACKS.get(name)
        for name in {*self.defenses, *self.by_defense}:
            DEFENSES.get(self.defense_name(name))
        check_model_options(self.train.model, self.train.model_kwargs)
        for attack in self.attacks:
            config = self.attack_config(attack, self.seeds[0])
            ATTACKS.get(attack).parse_params(config.params)
        for name in {*self.detectors, *self.by_detector}:
            DETECTORS.get(name)
        for detector in self.detectors:
            build_detector(self.detector_config(detector))
            self.detector_train_config(detector, self.seeds[0])
        for defense in self.defenses:
            build_defense(self.defense_config(defense))
            train = self.train_config(defense, self.seeds[0])
            check_model_options(train.model, train.model_kwargs)

    def attack_config(self, attack: str, seed: int) -> AttackConfig:
        own = self.by_attack.get(attack, AttackSettings())
        shared = self.attack
        return AttackConfig(
            name=attack,
            target=shared.target if own.target is None else own.target,
            mode=shared.mode if own.mode is None else own.mode,
            rate=shared.rate if own.rate is None else own.rate,
            seed=seed,
            params=dict(own.params),
        )

    def defense_name(self, cell: str) -> str:
        """The registered defense a cell name runs: its own, or the one its variant names."""
        own = self.by_defense.get(cell)
        return cell if own is None or own.defense is None else own.defense

    def defense_config(self, defense: str) -> DefenseConfig:
        params = dict(self.by_defense.get(defense, DefenseSettings()).params)
        return DefenseConfig(name=self.defense_name(defense), params=params)

    def train_config(self, defense: str, seed: int) -> TrainConfig:
        return self._train(self.by_defense.get(defense, DefenseSettings()).train, f"by_defense.{defense}", seed)

    def _train(self, own: dict[str, Any], section: str, seed: int) -> TrainConfig:
        """The shared [train], then a section's own `train` settings, then the seed."""
        return from_dict(TrainConfig, merge(to_dict(self.train), {**own, "seed": seed}), prefix=f"{section}.train.")

    def detector_config(self, detector: str) -> DetectorConfig:
        return DetectorConfig(name=detector, params=dict(self.by_detector.get(detector, DetectorSettings()).params))

    def detector_train_config(self, detector: str, seed: int) -> TrainConfig:
        """The network a detector trains itself (vab's Victim, abl's isolation network)."""
        return self._train(self.by_detector.get(detector, DetectorSettings()).train, f"by_detector.{detector}", seed)

    def probe_config(self, seed: int) -> ProbeConfig:
        return ProbeConfig(size=self.probe.size, source=self.probe.source, seed=seed)


def suite_names() -> list[str]:
    folder = resources.files("bdguard.bench") / "suites"
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml"))


def read_suite(suite: str) -> dict[str, Any]:
    """The settings of a shipped suite (by name) or of a suite file (by path), as a dict."""
    path = Path(suite).expanduser()
    if path.suffix in SUITE_SUFFIXES or path.exists():
        return load_file(path)
    if suite not in suite_names():
        known = ", ".join(suite_names())
        raise BdguardError(f"unknown suite {suite!r}; known: {known} (or the path of a .toml/.yaml suite file)")
    with resources.as_file(resources.files("bdguard.bench") / "suites" / f"{suite}.toml") as shipped:
        return load_file(shipped)


def load_suite(suite: str, overrides: dict[str, Any] | None = None) -> BenchConfig:
    """`read_suite` with `overrides` (a nested dict, e.g. from the command line's flags) merged over it."""
    return BenchConfig.from_dict(merge(read_suite(suite), overrides or {}))
