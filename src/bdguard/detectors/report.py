"""What `bdguard detect` draws: the score histogram (by ground truth where there is one) and the most suspicious
images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

HIST_BINS = 50
GALLERY_COLUMNS = 8


def plot_score_hist(path: Path, scores: torch.Tensor, flagged: torch.Tensor, poison: torch.Tensor | None) -> None:
    """Scores as shares of each group (clean / poisoned where the truth is known, else all samples), with the
    lowest flagged score marked."""
    # imported here: matplotlib is slow to import and only the end of a run draws
    from bdguard.plotting import new_figure, write_figure

    values = scores.float().cpu().numpy()
    bins = np.linspace(values.min(), values.max() + 1e-9, HIST_BINS + 1)
    if poison is None:
        groups = [("all samples", np.ones(values.size, dtype=bool), "tab:gray")]
    else:
        truth = poison.cpu().numpy()
        groups = [("clean", ~truth, "tab:blue"), ("poisoned", truth, "tab:red")]
    figure = new_figure(5.0, 3.0)
    ax = figure.subplots()
    for name, mask, colour in groups:
        if mask.any():
            weights = np.full(int(mask.sum()), 1.0 / mask.sum())
            ax.hist(
                values[mask], bins=bins, weights=weights, histtype="stepfilled", alpha=0.5, color=colour, label=name
            )
    flags = flagged.cpu().numpy()
    if flags.any():
        cut = float(values[flags].min())
        ax.axvline(cut, color="black", linestyle="--", linewidth=1, label=f"flagged from {cut:.3g}")
    ax.set_xlabel("suspicion score (higher = more suspicious)")
    ax.set_ylabel("share of group")
    ax.legend(fontsize=7)
    write_figure(figure, path)


def plot_most_suspicious(
    path: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    classes: Sequence[str],
    count: int,
    poison: torch.Tensor | None,
    files: Sequence[str] | None = None,
) -> None:
    """The `count` highest-scoring images with index (or, for a set read from files, file name), given label and
    score (and, where known, whether poisoned)."""
    from bdguard.plotting import class_name, new_figure, pixels, write_figure

    order = scores.float().argsort(descending=True)[:count].cpu()
    rows = -(-order.numel() // GALLERY_COLUMNS)
    figure = new_figure(1.3 * GALLERY_COLUMNS, 1.5 * rows)
    axes = figure.subplots(rows, GALLERY_COLUMNS, squeeze=False)
    factor = max(1, 64 // images.shape[-1])
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, order.tolist(), strict=False):
        ax.imshow(pixels(images[index], factor), interpolation="nearest")
        truth = "" if poison is None else (" P" if bool(poison[index]) else " clean")
        name = f"#{index}" if files is None else _short(files[index])
        caption = f"{name}{truth}\n{class_name(classes, labels[index])} {float(scores[index]):.3g}"
        ax.set_title(caption, fontsize=6, color="tab:red" if truth == " P" else "black")
    write_figure(figure, path)


def _short(file: str, width: int = 18) -> str:
    """A file's name, its end kept where it is too long for a gallery caption."""
    name = file.rsplit("/", 1)[-1]
    return name if len(name) <= width else "…" + name[-(width - 1) :]
