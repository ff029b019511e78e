"""What a pruning run leaves in its folder: pruning.json (the choice and one row per channel), curve.jsonl (BA, ASR,
RA and the probe figures against the pruned fraction), curve.png and norms.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdguard.defenses.base import Figure
from bdguard.io import write_json, write_jsonl

STAT_NAMES = {"1": "l1", "2": "l2", "inf": "linf", "avg": "avg"}  # column prefixes in pruning.json
CURVE_KEYS = (("ba", "BA", "-"), ("asr", "ASR", "-"), ("ra", "RA", "-"), ("probe_acc", "probe acc", "--"))


def channel_rows(
    summaries: dict[str, dict[str, torch.Tensor]], score: torch.Tensor, order: torch.Tensor, k: int
) -> list[dict[str, Any]]:
    """One row per channel: index, rank (0 = pruned first), pruned flag, score, and every summary statistic
    as `<l1|l2|linf|avg>_<mean_clean|std_clean|mean_trig|std_trig|diff|rel|z|auroc>`."""
    channels = score.numel()
    rank = torch.empty(channels, dtype=torch.long)
    rank[order.cpu()] = torch.arange(channels)
    columns = {
        f"{STAT_NAMES[key]}_{name}": values.tolist()
        for key, summary in summaries.items()
        for name, values in summary.items()
    }
    scores = score.tolist()
    return [
        {
            "index": c,
            "rank": int(rank[c]),
            "pruned": bool(rank[c] < k),
            "score": scores[c],
            **{name: column[c] for name, column in columns.items()},
        }
        for c in range(channels)
    ]


def curve_summary(curve: list[dict[str, Any]]) -> dict[str, float]:
    """The curve's headline figures (docs/methods/linf-pruning.md 8), for reports only: the lowest ASR whose BA is at
    most 2 and 5 points below the unpruned model's (row 0), and the area under the ASR curve over the fractions covered
    (trapezoids; 0.6 x the mean ASR when it covers 0 to 60%)."""
    if curve[0]["asr"] is None:
        return {}
    start = curve[0]["ba"]
    summary = {
        f"asr_at_ba_drop_{points}": min(row["asr"] for row in curve if start - row["ba"] <= points / 100)
        for points in (2, 5)
    }
    pairs = zip(curve, curve[1:], strict=False)
    summary["asr_area"] = sum((b["fraction"] - a["fraction"]) * (a["asr"] + b["asr"]) / 2 for a, b in pairs)
    return summary


PRUNING_FIGURES = (
    Figure("curve.png", "pruning: BA, ASR and RA (test minus probe) and the probe figures against the pruned fraction"),
    Figure("norms.png", "per-channel activation norms, clean vs triggered"),
)


def write_pruning_report(
    folder: Path,
    summary: dict[str, Any],
    table: list[dict[str, Any]],
    curve: list[dict[str, Any]],
    summaries: dict[str, dict[str, torch.Tensor]],
) -> None:
    write_json(folder / "pruning.json", {**summary, "per_channel": table})
    write_jsonl(folder / "curve.jsonl", curve)
    title = f"{summary['defense']}: {summary['order']}"
    plot_curve(folder / "curve.png", curve, summary["pruned_fraction"], title)
    plot_norms(folder / "norms.png", summaries, title)


def plot_curve(path: Path, curve: list[dict[str, Any]], chosen: float, title: str) -> None:
    """BA, ASR, RA (test minus probe, real trigger) and the probe figures against the pruned fraction."""
    from bdguard.plotting import new_figure, write_figure

    figure = new_figure(6.0, 3.6)
    ax = figure.subplots()
    x = [100 * row["fraction"] for row in curve]
    keys = (*CURVE_KEYS, ("probe_asr", "probe ASR (scoring trigger)", "--"))
    for key, label, style in keys:
        values = [row.get(key) for row in curve]
        if any(v is not None for v in values):
            ax.plot(x, [math.nan if v is None else 100 * v for v in values], style, label=label, linewidth=1.2)
    ax.axvline(100 * chosen, color="black", linestyle=":", linewidth=1, label=f"chosen {100 * chosen:.1f}%")
    ax.set_xlabel("pruned (%)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    write_figure(figure, path)


def plot_norms(path: Path, summaries: dict[str, dict[str, torch.Tensor]], title: str) -> None:
    """Per norm: clean (and triggered) per-channel means by channel index, and the histogram across channels of
    rel (the trigger's relative shift), or of the clean mean when there is no trigger."""
    from bdguard.plotting import new_figure, write_figure

    norms = [key for key in ("1", "2", "inf") if key in summaries]
    figure = new_figure(4.0 * len(norms), 5.6)
    axes = figure.subplots(2, len(norms), squeeze=False)
    for column, key in enumerate(norms):
        summary, name = summaries[key], STAT_NAMES[key]
        top, bottom = axes[0][column], axes[1][column]
        index = range(summary["mean_clean"].numel())
        top.plot(index, summary["mean_clean"].numpy(), label="clean", linewidth=1)
        if "mean_trig" in summary:
            top.plot(index, summary["mean_trig"].numpy(), label="triggered", linewidth=1)
        top.set_title(f"{name}: mean per channel", fontsize=9)
        top.set_xlabel("channel")
        top.legend(fontsize=7)
        shown = "rel" if "rel" in summary else "mean_clean"
        values = summary[shown].numpy()
        # dead channels give rel ~ 1e8: clipped into the end bins, they do not flatten the rest
        low, high = np.percentile(values, [1, 99])
        bottom.hist(values.clip(low, high), bins=40, color="tab:gray")
        bottom.set_title(f"{name}: {shown} across channels (1-99th percentile)", fontsize=9)
        bottom.set_ylabel("channels")
    figure.suptitle(title, fontsize=9)
    write_figure(figure, path)
