"""A bench's results table: one row per cell from its run's results.json, and mean ± std over seeds.

results.csv (and the `cells` of results.json) has the columns of `COLUMNS`; fractions stay fractions. `ba`, `asr`
and `ra` are the cell's own: a post-training cell measures them on the test set minus its probe images, a
training cell on the whole test set; `*_before` is the repaired model before repair, on the post-training cell's
evaluation set. `tpr`, `fpr`, `auroc`,
`backdoor_flagged` and `pruned_fraction` are the defense's `DefenseResult` (defenses/base.py): its poisoned-sample
detector (V&B's last split, ABL's isolation), its verdict on the model (Neural Cleanse's, also linf-prune's with its
reversed trigger), its share of pruned units. `seconds` is the run's own wall
time (its results.json's, which sums the invocations of a resumed run), the figure the report shows too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from bdguard.io import write_text
from bdguard.results import DetectionResult, RunResult, Scores
from bdguard.stats import mean_std

COLUMNS = (
    "attack",
    "defense",
    "seed",
    "status",
    "ba",
    "asr",
    "ra",
    "ba_before",
    "asr_before",
    "ra_before",
    "tpr",
    "fpr",
    "auroc",
    "backdoor_flagged",
    "pruned_fraction",
    "dataset",
    "model",
    "epochs",
    "seconds",
    "folder",
    "error",
)
TIMING = ("seconds",)  # the columns that differ between two runs of the same grid
SUMMARISED = ("ba", "asr", "ra", "ba_before", "asr_before", "tpr", "fpr", "auroc", "pruned_fraction", "seconds")


def cell_row(attack: str, defense: str, seed: int, result: RunResult, folder: str) -> dict:
    """The table's row of a finished cell, from its run's results.json."""
    before = result.before or Scores()
    row = dict.fromkeys(COLUMNS)
    row.update(
        attack=attack,
        defense=defense,
        seed=seed,
        status="done",
        ba=result.scores.ba,
        asr=result.scores.asr,
        ra=result.scores.ra,
        ba_before=before.ba,
        asr_before=before.asr,
        ra_before=before.ra,
        tpr=result.detector_value("tpr"),
        fpr=result.detector_value("fpr"),
        auroc=result.detector_value("auroc"),
        backdoor_flagged=result.backdoor_flagged,
        pruned_fraction=result.pruned_fraction,
        dataset=result.dataset,
        model=result.model,
        epochs=result.epochs,
        seconds=result.seconds,
        folder=folder,
    )
    return row


DETECTION_COLUMNS = (
    "attack",
    "detector",
    "seed",
    "status",
    "auroc",
    "auprc",
    "tpr",
    "fpr",
    "precision",
    "flagged",
    "poisoned",
    "samples",
    "seconds",
    "folder",
    "error",
)


def detection_row(attack: str, detector: str, seed: int, result: DetectionResult, folder: str) -> dict:
    """The detection table's row of a finished detection, from its results.json."""
    row = dict.fromkeys(DETECTION_COLUMNS)
    row.update({key: result.metric(key) for key in ("auroc", "auprc", "tpr", "fpr", "precision")})
    row.update(
        attack=attack,
        detector=detector,
        seed=seed,
        status="done",
        flagged=result.flagged,
        poisoned=result.poisoned,
        samples=result.samples,
        seconds=result.seconds,
        folder=folder,
    )
    return row


def failed_row(columns: Iterable[str], folder: str, error: str, **keys: Any) -> dict:
    """The row of a step that failed: its keys (attack, defense or detector, seed), the folder and the error."""
    row = dict.fromkeys(columns)
    row.update(keys, status="failed", folder=folder, error=error)
    return row


def summarise_seeds(rows: Iterable[dict]) -> list[dict]:
    """Per (attack, defense), over its finished seeds: `<metric>_mean` and `<metric>_std` (the sample standard
    deviation; None for a single seed) of every metric in SUMMARISED, and `seeds`, how many there were."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault((row["attack"], row["defense"]), []).append(row)
    summary = []
    for (attack, defense), members in groups.items():
        entry: dict[str, Any] = {"attack": attack, "defense": defense, "seeds": len(members)}
        for key in SUMMARISED:
            mean, std = mean_std([row[key] for row in members if row[key] is not None])
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean, std
        summary.append(entry)
    return summary


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_csv(path, rows: list[dict], columns: Iterable[str]) -> None:
    columns = list(columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(key)) for key in columns])
    write_text(path, buffer.getvalue())


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
