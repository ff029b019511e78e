"""Figures the HTML report draws from a run folder's records (the runs' own PNGs are embedded as they are):
the training curve of metrics.jsonl, and V&B's detector over its scoring rounds (detector.jsonl) beside its ROC
curve (suspicious.csv's final entropy against poison_mask.npy, the ground truth only reports may read)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from bdguard.plotting import new_figure
from bdguard.reporting.files import read_jsonl, regular_file

TRUTH = "poison_mask.npy"  # which training samples were poisoned: ground truth, read by reports only


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi="figure")
    return buffer.getvalue()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def training_curve(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """BA, ASR and RA (and the V&B Victim's ASR) after every epoch; None when there is nothing to draw."""
    rows = [row for row in rows if _number(row.get("epoch")) and _number(row.get("ba"))]
    if not rows:
        return None
    figure = new_figure(5.0, 3.0)
    ax = figure.subplots()
    epochs = [row["epoch"] for row in rows]
    series = (("ba", "BA", "-"), ("asr", "ASR", "-"), ("ra", "RA", "-"), ("victim_asr", "V&B Victim ASR", "--"))
    for key, label, style in series:
        values = [row.get(key) if _number(row.get(key)) else None for row in rows]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else 100 * v for v in values], style, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return png_bytes(figure)


def detector_curves(folder: Path) -> bytes | None:
    """V&B's detector: TPR, FPR and AUROC per scoring round, and the ROC curve of the final entropy scores."""
    rounds = [row for row in read_jsonl(folder, folder / "detector.jsonl") if _number(row.get("round"))]
    if not rounds:
        return None
    roc = _final_roc(folder)
    figure = new_figure(8.0 if roc else 4.5, 3.0)
    axes = figure.subplots(1, 2 if roc else 1, squeeze=False)[0]
    ax = axes[0]
    number = [row["round"] for row in rounds]
    for key, label in (("tpr", "TPR"), ("fpr", "FPR"), ("auroc", "AUROC")):
        ax.plot(number, [row[key] if _number(row.get(key)) else np.nan for row in rounds], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("scoring round")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("detector per scoring round", fontsize=9)
    ax.legend(fontsize=7)
    if roc:
        fpr, tpr, auc = roc
        axes[1].plot(fpr, tpr, label=f"AUROC {auc:.3f}")
        axes[1].plot([0, 1], [0, 1], ":", color="gray")
        axes[1].set_xlabel("false positive rate")
        axes[1].set_ylabel("true positive rate")
        axes[1].set_title("ROC of the final entropy score", fontsize=9)
        axes[1].legend(fontsize=7, loc="lower right")
    return png_bytes(figure)


def _final_roc(folder: Path) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The ROC curve of suspicious.csv's final entropy against the ground truth, when both are there and sound."""
    scores_file, truth_file = regular_file(folder, folder / "suspicious.csv"), regular_file(folder, folder / TRUTH)
    if scores_file is None or truth_file is None:
        return None
    # imported here: scikit-learn is slow to import and only this figure needs it
    from sklearn.metrics import roc_auc_score, roc_curve

    try:
        table = np.genfromtxt(scores_file, delimiter=",", skip_header=1, usecols=(1,), dtype=float)
        truth = np.load(truth_file, allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if table.shape != truth.shape or not np.isfinite(table).all() or truth.dtype != bool:
        return None
    if not 0 < truth.sum() < truth.size:
        return None
    fpr, tpr, _ = roc_curve(truth, -table)  # low entropy = suspicious
    return fpr, tpr, float(roc_auc_score(truth, -table))
