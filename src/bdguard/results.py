"""results.json: one typed, versioned record per run folder, written by train, repair, evaluate (`RunResult`) and
detect (`DetectionResult`), and read back by the bench's tables and the report through the same classes.

`schema` numbers the layout. A results.json without it was written before the field existed, in the same layout
(schema 0), and is read alike; a newer schema than this bdguard knows is refused. Reading is strict about the numbers
a table computes with (BA, ASR, RA, seconds: a number or null, else the file is refused) and lenient about the rest: a
part of another type (a damaged or hand-edited file) reads as missing, so that it costs its own cell of a table only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bdguard.errors import BdguardError

SCHEMA = 1
DETECTOR_KEYS = ("flagged", "tpr", "fpr", "precision", "auroc", "auprc")  # a defense's detector summary
NUMBERS = ("ba", "asr", "ra", "seconds")  # what the tables compute with


def is_number(value: Any) -> bool:
    """A finite int or float read from JSON (a bool is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    return value if is_number(value) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any, default: str | None = None) -> str | None:
    return value if isinstance(value, str) else default


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass
class Scores:
    """Benign accuracy, attack success rate and robust accuracy (fractions; ASR and RA None without an attack)."""

    ba: float | None = None
    asr: float | None = None
    ra: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> Scores:
        data = _table(data)
        return cls(_number(data.get("ba")), _number(data.get("asr")), _number(data.get("ra")))


@dataclass
class Plots:
    """What the report draws for a defense (DefenseResult): per-epoch series of metrics.jsonl (key -> label), the
    JSON-lines file of its detector's scoring rounds and its scores.csv, each a file name of the run folder."""

    series: dict[str, str] = field(default_factory=dict)
    rounds: str | None = None
    scores: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Plots:
        data = _table(data)
        series = {str(key): label for key, label in _table(data.get("series")).items() if isinstance(label, str)}
        return cls(series, _file_name(data.get("rounds")), _file_name(data.get("scores")))


def _file_name(value: Any) -> str | None:
    """A plain file name (no folder part): what a record may name inside its own folder."""
    ok = isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
    return value if ok else None


def _version(data: dict[str, Any], where: str) -> int:
    schema = data.get("schema", 0)
    if _integer(schema) is None or not 0 <= schema <= SCHEMA:
        raise BdguardError(f"{where}: results schema {schema!r}, this bdguard reads up to {SCHEMA}: upgrade it")
    return schema


def _checked_numbers(data: dict[str, Any], where: str) -> None:
    for key in NUMBERS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BdguardError(f"{where}: {key} is {value!r}, not a number")


@dataclass
class RunResult:
    """A model's figures and where they came from: what `train`, `repair` and `evaluate` write.

    `scores`: BA/ASR/RA of the model (a repair's on the test set minus its probe); `before`: the repaired model's
    before repair; `detector`, `pruned_fraction`, `backdoor_flagged`, `figures`, `plots` and `details` are the
    defense's DefenseResult (`details` written under the defense's name)."""

    command: str  # train, repair or evaluate
    scores: Scores
    dataset: str
    attack: str
    defense: str
    model: str
    epochs: int | None
    seconds: float | None
    environment: dict[str, Any]
    poisoned: int | None = None  # known to a training run, not to a defender
    train_size: int | None = None
    target: int | None = None
    detector: dict[str, Any] | None = None
    pruned_fraction: float | None = None
    backdoor_flagged: bool | None = None
    figures: list[dict[str, str]] = field(default_factory=list)
    plots: Plots = field(default_factory=Plots)
    details: dict[str, Any] = field(default_factory=dict)
    before: Scores | None = None
    probe: dict[str, Any] | None = None
    eval_size: int | None = None
    model_path: str | None = None
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        data = {
            "schema": self.schema,
            "command": self.command,
            "ba": self.scores.ba,
            "asr": self.scores.asr,
            "ra": self.scores.ra,
            "dataset": self.dataset,
            "attack": self.attack,
            "defense": self.defense,
            "model": self.model,
            "epochs": self.epochs,
            "seconds": self.seconds,
            "poisoned": self.poisoned,
            "train_size": self.train_size,
            "target": self.target,
            "detector": self.detector,
            "pruned_fraction": self.pruned_fraction,
            "backdoor_flagged": self.backdoor_flagged,
            "figures": self.figures,
            "plots": {"series": self.plots.series, "rounds": self.plots.rounds, "scores": self.plots.scores},
        }
        if self.before is not None:
            data["before"] = {"ba": self.before.ba, "asr": self.before.asr, "ra": self.before.ra}
        for key in ("probe", "eval_size", "model_path"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.details:
            data[self.defense] = self.details
        data["environment"] = self.environment
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "results.json") -> RunResult:
        """The record of a results.json's table (schema 0 or later); refused with `where` when it is not one."""
        if not isinstance(data, dict) or "ba" not in data:
            raise BdguardError(f"{where} holds no model's results")
        schema = _version(data, where)
        _checked_numbers(data, where)
        detector = data.get("detector")
        defense = _text(data.get("defense"), "?")
        figures = data.get("figures")
        return cls(
            command=_text(data.get("command"), "train"),
            scores=Scores.from_json(data),
            dataset=_text(data.get("dataset"), "?"),
            attack=_text(data.get("attack"), "?"),
            defense=defense,
            model=_text(data.get("model"), "?"),
            epochs=_integer(data.get("epochs")),
            seconds=_number(data.get("seconds")),
            environment=_table(data.get("environment")),
            poisoned=_integer(data.get("poisoned")),
            train_size=_integer(data.get("train_size")),
            target=_integer(data.get("target")),
            detector={key: detector.get(key) for key in DETECTOR_KEYS} if isinstance(detector, dict) else None,
            pruned_fraction=_number(data.get("pruned_fraction")),
            backdoor_flagged=data.get("backdoor_flagged") if isinstance(data.get("backdoor_flagged"), bool) else None,
            figures=[f for f in figures if _figure(f)] if isinstance(figures, list) else [],
            plots=Plots.from_json(data.get("plots")),
            details=_table(data.get(defense)),
            before=Scores.from_json(data["before"]) if isinstance(data.get("before"), dict) else None,
            probe=data.get("probe") if isinstance(data.get("probe"), dict) else None,
            eval_size=_integer(data.get("eval_size")),
            model_path=_text(data.get("model_path")),
            schema=schema,
        )

    def detector_value(self, key: str) -> Any:
        return None if self.detector is None else self.detector.get(key)

    @property
    def command_line(self) -> str | None:
        command = self.environment.get("command")
        return str(command) if command else None


def _figure(value: Any) -> bool:
    return (
        isinstance(value, dict) and _file_name(value.get("file")) is not None and isinstance(value.get("caption"), str)
    )


@dataclass
class DetectionResult:
    """What `detect` writes: a detector's verdict on a training set and, with the ground truth, how good it is."""

    detector: str
    dataset: str
    attack: str
    samples: int
    poisoned: int | None
    threshold: str
    flagged: int
    metrics: dict[str, Any] | None  # detection_metrics against the ground truth; None without it
    model: str | None  # the model it inspected, if it inspects one
    seconds: float | None
    environment: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # the detector's own (Detection.extra)
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "command": "detect",
            "detector": self.detector,
            "dataset": self.dataset,
            "attack": self.attack,
            "samples": self.samples,
            "poisoned": self.poisoned,
            "threshold": self.threshold,
            "flagged": self.flagged,
            "metrics": self.metrics,
            "model": self.model,
            **self.extra,
            "seconds": self.seconds,
            "environment": self.environment,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "results.json") -> DetectionResult:
        if not isinstance(data, dict) or not isinstance(data.get("detector"), str):
            raise BdguardError(f"{where} holds no detection")
        schema = _version(data, where)
        _checked_numbers(data, where)
        known = {f.name for f in cls.__dataclass_fields__.values()} | {"command"}
        return cls(
            detector=data["detector"],
            dataset=_text(data.get("dataset"), "?"),
            attack=_text(data.get("attack"), "?"),
            samples=_integer(data.get("samples")) or 0,
            poisoned=_integer(data.get("poisoned")),
            threshold=_text(data.get("threshold"), ""),
            flagged=_integer(data.get("flagged")) or 0,
            metrics=data.get("metrics") if isinstance(data.get("metrics"), dict) else None,
            model=_text(data.get("model")),
            seconds=_number(data.get("seconds")),
            environment=_table(data.get("environment")),
            extra={key: value for key, value in data.items() if key not in known},
            schema=schema,
        )

    def metric(self, key: str) -> Any:
        return None if self.metrics is None else self.metrics.get(key)
