"""Figures the HTML report draws from a run folder's records (the runs' own PNGs are embedded as they are):
the training curve of metrics.jsonl, and V&B's detector over its scoring rounds (detector.jsonl) beside its ROC
curve (suspicious.csv's final entropy against poison_mask.npy, the ground truth only reports may read)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from bdguard.plotting import new_figure

TRUTH = "poison_mask.npy"  # which training samples were poisoned: ground truth, read by reports only


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi="figure")
    return buffer.getvalue()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curve(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """BA, ASR and RA (and the V&B Victim's ASR) after every epoch; None when there is nothing to draw."""
    rows = [row for row in rows if "epoch" in row and row.get("ba") is not None]
    if not rows:
        return None
    figure = new_figure(5.0, 3.0)
    ax = figure.subplots()
    epochs = [row["epoch"] for row in rows]
    series = (("ba", "BA", "-"), ("asr", "ASR", "-"), ("ra", "RA", "-"), ("victim_asr", "V&B Victim ASR", "--"))
    for key, label, style in series:
        values = [row.get(key) for row in rows]
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
    rounds_file, scores_file, truth_file = (folder / name for name in ("detector.jsonl", "suspicious.csv", TRUTH))
    if not rounds_file.exists():
        return None
    rounds = read_jsonl(rounds_file)
    roc = None
    if scores_file.exists() and truth_file.exists():
        # imported here: scikit-learn is slow to import and only this figure needs it
        from sklearn.metrics import roc_auc_score, roc_curve

        table = np.genfromtxt(scores_file, delimiter=",", skip_header=1, usecols=(1,), dtype=float)
        truth = np.load(truth_file, allow_pickle=False)
        if table.shape == truth.shape and 0 < truth.sum() < truth.size:
            fpr, tpr, _ = roc_curve(truth, -table)  # low entropy = suspicious
            roc = (fpr, tpr, roc_auc_score(truth, -table))
    figure = new_figure(8.0 if roc else 4.5, 3.0)
    axes = figure.subplots(1, 2 if roc else 1, squeeze=False)[0]
    ax = axes[0]
    number = [row["round"] for row in rounds]
    for key, label in (("tpr", "TPR"), ("fpr", "FPR"), ("auroc", "AUROC")):
        values = [row.get(key) for row in rounds]
        ax.plot(number, [np.nan if v is None else v for v in values], marker="o", label=label)
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
