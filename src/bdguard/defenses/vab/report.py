"""What the detector achieved, measured against the ground truth: for logs, metrics and plots only.

Nothing here feeds back into training; the poison and cross masks are read nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdguard.data.base import PoisonedSet
from bdguard.io import write_text
from bdguard.training.metrics import detection_metrics

HIST_BINS = 40


def split_metrics(normalised: torch.Tensor, suspicious: torch.Tensor, poisoned: PoisonedSet) -> dict[str, Any]:
    """`detection_metrics` of the split `suspicious`, with the threshold-free score -e (low entropy = suspicious)."""
    return detection_metrics(-normalised, suspicious, poisoned.poison_mask, poisoned.cross_mask)


def stage_b_diagnostics(weight: torch.Tensor, pseudo: torch.Tensor, poisoned: PoisonedSet) -> dict[str, Any]:
    """Mean suppression weight 1 - q_label on clean vs poisoned credible samples, and how the pseudo-labels of
    the suspicious samples fall: poisoned ones given the attacker's label, clean ones given their true class."""
    poison = poisoned.poison_mask.to(weight.device)
    seen_c = ~weight.isnan()
    seen_s = pseudo >= 0
    labels = poisoned.train.labels.to(pseudo.device)
    truth = poisoned.original_labels.to(pseudo.device)

    def mean(values: torch.Tensor) -> float | None:
        return float(values.float().mean()) if values.numel() else None

    return {
        "suppression_weight_clean": mean(weight[seen_c & ~poison]),
        "suppression_weight_poisoned": mean(weight[seen_c & poison]),
        "pseudo_attacker_label_poisoned": mean(pseudo[seen_s & poison] == labels[seen_s & poison]),
        "pseudo_accuracy_clean": mean(pseudo[seen_s & ~poison] == truth[seen_s & ~poison]),
    }


def write_suspicious_csv(path: Path, normalised: torch.Tensor, suspicious: torch.Tensor) -> None:
    """index,normalised_entropy,suspicious (yes/no): one row per training sample, in the data set's order."""
    score = np.char.mod("%.6f", normalised.detach().float().cpu().numpy())
    flag = np.where(suspicious.cpu().numpy(), "yes", "no")
    index = np.arange(score.size).astype(str)
    rows = np.char.add(np.char.add(np.char.add(np.char.add(index, ","), score), ","), flag)
    write_text(path, "index,normalised_entropy,suspicious\n" + "".join(np.char.add(rows, "\n")))


def plot_entropy_hist(path: Path, snapshots: Mapping[int, dict[str, Any]], poisoned: PoisonedSet) -> None:
    """One panel per key scoring round: normalised entropy of clean, poisoned (and cross) samples, each group
    as shares of itself, so a small poisoned group stays visible."""
    # imported here: matplotlib is slow to import and only the end of a run draws
    from bdguard.plotting import new_figure, write_figure

    poison = poisoned.poison_mask.cpu().numpy()
    cross = poisoned.cross_mask.cpu().numpy()
    groups = [("clean", ~poison & ~cross, "tab:blue"), ("poisoned", poison, "tab:red"), ("cross", cross, "tab:green")]
    rounds = sorted(snapshots)
    figure = new_figure(3.2 * len(rounds), 2.8)
    axes = figure.subplots(1, len(rounds), squeeze=False)[0]
    bins = np.linspace(0.0, 1.0, HIST_BINS + 1)
    for ax, number in zip(axes, rounds, strict=True):
        shot = snapshots[number]
        values = shot["normalised"].float().cpu().numpy()
        for name, mask, colour in groups:
            if mask.any():
                weights = np.full(int(mask.sum()), 1.0 / mask.sum())
                # one filled outline per group, not a patch per bin: drawing stays fast
                ax.hist(
                    values[mask], bins=bins, weights=weights, histtype="stepfilled", alpha=0.5, color=colour, label=name
                )
        ax.axvline(shot["tau"], color="black", linestyle="--", linewidth=1, label=f"tau {shot['tau']:g}")
        ax.set_title(f"round {number}: {shot['label']}", fontsize=9)
        ax.set_xlabel("normalised entropy")
    axes[0].set_ylabel("share of group")
    axes[0].legend(fontsize=7)
    write_figure(figure, path)
