"""Figures the HTML report draws from a run folder's records (the runs' own PNGs are embedded as they are):
the training curve of metrics.jsonl, and a detecting defense's detector over its scoring rounds beside the ROC
curve of its scores.csv against poison_mask.npy (the ground truth only reports may read). What to draw comes from
results.json's `plots` (DefenseResult: `series`, `rounds_file`, `scores`), never from a defense's name."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from bdguard.plotting import new_figure
from bdguard.reporting.files import read_jsonl, regular_file
from bdguard.results import is_number

TRUTH = "poison_mask.npy"  # which training samples were poisoned: ground truth, read by reports only


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi="figure")
    return buffer.getvalue()


def training_curve(rows: list[dict[str, Any]], title: str, series: dict[str, str]) -> bytes | None:
    """BA, ASR and RA after every epoch, and the defense's own `series` (metrics.jsonl key -> label) dashed; None
    when there is nothing to draw."""
    rows = [row for row in rows if is_number(row.get("epoch")) and is_number(row.get("ba"))]
    if not rows:
        return None
    figure = new_figure(5.0, 3.0)
    ax = figure.subplots()
    epochs = [row["epoch"] for row in rows]
    drawn = [("ba", "BA", "-"), ("asr", "ASR", "-"), ("ra", "RA", "-")]
    drawn += [(key, label, "--") for key, label in series.items()]
    for key, label, style in drawn:
        values = [row.get(key) if is_number(row.get(key)) else None for row in rows]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else 100 * v for v in values], style, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(figure)


def detector_curves(folder: Path, rounds_file: str | None, scores_file: str | None) -> bytes | None:
    """A detector's TPR, FPR and AUROC per scoring round (the JSON-lines `rounds_file`), and the ROC curve of its
    final scores (`scores_file`, a scores.csv) against the ground truth; each where its file is there and sound, None
    when neither is."""
    rounds = []
    if rounds_file is not None:
        rounds = [row for row in read_jsonl(folder, folder / rounds_file) if is_number(row.get("round"))]
    roc = _final_roc(folder, scores_file) if scores_file is not None else None
    if not rounds and roc is None:
        return None
    panels = bool(rounds) + (roc is not None)
    figure = new_figure(4.0 * panels + 0.5, 3.0)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if rounds:
        ax = axes.pop(0)
        number = [row["round"] for row in rounds]
        for key, label in (("tpr", "TPR"), ("fpr", "FPR"), ("auroc", "AUROC")):
            values = [row[key] if is_number(row.get(key)) else np.nan for row in rounds]
            ax.plot(number, values, marker="o", label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("scoring round")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("detector per scoring round", fontsize=9)
        ax.legend(fontsize=7)
    if roc is not None:
        fpr, tpr, auc = roc
        ax = axes.pop(0)
        ax.plot(fpr, tpr, label=f"AUROC {auc:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC of the final score", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return png_bytes(figure)


def _final_roc(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The ROC curve of a scores.csv's `score` column against the ground truth, when both are there and sound."""
    scores_file, truth_file = regular_file(folder, folder / name), regular_file(folder, folder / TRUTH)
    if scores_file is None or truth_file is None:
        return None
    # imported here: scikit-learn is slow to import and only this figure needs it
    from sklearn.metrics import roc_auc_score, roc_curve

    try:
        with scores_file.open(encoding="utf-8", newline="") as handle:
            scores = np.array([float(row["score"]) for row in csv.DictReader(handle)])
        truth = np.load(truth_file, allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error):
        return None
    if scores.shape != truth.shape or not np.isfinite(scores).all() or truth.dtype != bool:
        return None
    if not 0 < truth.sum() < truth.size:
        return None
    fpr, tpr, _ = roc_curve(truth, scores)  # higher = more suspicious
    return fpr, tpr, float(roc_auc_score(truth, scores))
