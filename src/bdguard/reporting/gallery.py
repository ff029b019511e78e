"""The trigger gallery: clean training images beside their poisoned versions, the amplified difference, and a
triggered test image, so a user sees what the attack did even when the trigger is invisible.

Pure functions of tensors and class names; `poison_gallery` picks the rows from a poisoned set, `gallery_figure`
draws any rows, `new_figure` starts a plot and `write_figure` stores a figure atomically, so other reports can
reuse each part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bdguard.data.base import ImageSet, PoisonedSet, TriggeredSet
from bdguard.plotting import class_name, pixels

CROSS_ROWS = 2  # noise/cross rows shown in addition, when the attack makes any
# Layout in pixels at DPI: images are placed pixel for pixel (no axes, no layout engine: fast, and exact).
DPI = 100
PANEL = 160  # small images are upscaled by a whole factor (nearest) to at least this size
GAP = 16
CAPTION = 32  # two lines of 8-point text above each image
TITLE = 64  # three lines of 9-point text
DIFFERENCE_RULE = "|poisoned - clean|, max over channels, scaled per image so its maximum is 255"


@dataclass(frozen=True)
class Examples:
    """Training samples before and after poisoning, one gallery row each."""

    clean: torch.Tensor  # uint8 (R, C, H, W)
    poisoned: torch.Tensor  # uint8 (R, C, H, W)
    labels: torch.Tensor  # int64 (R,): clean labels
    new_labels: torch.Tensor  # int64 (R,): labels as the attacker left them
    indices: torch.Tensor  # int64 (R,): positions in the training set
    kinds: tuple[str, ...]  # "poisoned" or "cross" per row

    def __len__(self) -> int:
        return self.clean.shape[0]


def amplified_difference(clean: torch.Tensor, poisoned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, |poisoned - clean| taken as the max over channels and scaled so its maximum becomes 255.

    Takes uint8 (N, C, H, W) batches; returns the uint8 maps (N, H, W) and each image's largest raw difference (N,),
    so a caption can tell how much was amplified. An unchanged image gives an all-zero map.
    """
    diff = (poisoned.to(torch.int16) - clean.to(torch.int16)).abs().amax(dim=1)
    peak = diff.flatten(1).amax(dim=1)
    scaled = diff.float() * (255.0 / peak.clamp_min(1).float())[:, None, None]
    return scaled.round().to(torch.uint8), peak


def _pick(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    order = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[order].sort().values


def pick_examples(
    train: ImageSet, poisoned: PoisonedSet, rows: int, cross_rows: int = CROSS_ROWS, seed: int = 0
) -> Examples:
    """A seeded choice of up to `rows` poisoned samples and up to `cross_rows` noise/cross samples."""
    generator = torch.Generator().manual_seed(seed)
    poison = _pick(poisoned.poison_mask.cpu().nonzero().squeeze(1), rows, generator)
    cross = _pick(poisoned.cross_mask.cpu().nonzero().squeeze(1), cross_rows, generator)
    chosen = torch.cat([poison, cross])
    where = chosen.to(train.device)
    return Examples(
        clean=train.images[where].cpu(),
        poisoned=poisoned.train.images[where].cpu(),
        labels=train.labels[where].cpu(),
        new_labels=poisoned.train.labels[where].cpu(),
        indices=chosen,
        kinds=("poisoned",) * poison.numel() + ("cross",) * cross.numel(),
    )


def pick_triggered(triggered: TriggeredSet, count: int, seed: int = 0) -> TriggeredSet:
    """A seeded choice of `count` triggered test images (for all2one they already exclude the target class)."""
    generator = torch.Generator().manual_seed(seed)
    index = _pick(torch.arange(len(triggered)), count, generator).to(triggered.images.device)
    return TriggeredSet(triggered.images[index].cpu(), triggered.labels[index].cpu(), triggered.targets[index].cpu())


def gallery_title(manifest: dict[str, Any], classes: Sequence[str]) -> str:
    """Attack, rate and its meaning, target (or the all2all rule), counts, and the difference rule."""
    if manifest["mode"] == "all2all":
        target = "all2all (label y -> y+1 mod K)"
    else:
        index, name = manifest["target"], classes[manifest["target"]]
        target = f"target {index}" if name == str(index) else f"target {index} ({name})"
    counts = f"{manifest['poisoned']} poisoned"
    if manifest["cross"]:
        counts += f", {manifest['cross']} noise/cross"
    return (
        f"{manifest['attack']}: rate {manifest['rate']:g} ({manifest['rate_meaning']}), {target}\n"
        f"{counts} of {manifest['total']} training images\n"
        f"difference panel: {DIFFERENCE_RULE}"
    )


def _heat(diff: torch.Tensor, factor: int) -> np.ndarray:
    """(H, W) uint8 difference map -> RGB through the inferno colour map (black = unchanged), upscaled."""
    rgb = colormaps["inferno"](diff.cpu().numpy(), bytes=True)[..., :3]
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def gallery_figure(
    examples: Examples, classes: Sequence[str], title: str, triggered: TriggeredSet | None = None
) -> Figure:
    """Rows of clean | poisoned | amplified difference | triggered test image, with class names in captions.

    Grey images are shown grey, the difference as a heat map (black = unchanged). `triggered` supplies the last
    column (one image per row; fewer leave the rest blank). With no rows at all the figure says so, so a run with
    nothing poisoned still gets a readable picture.
    """
    test_rows = 0 if triggered is None else len(triggered)
    rows = max(len(examples), test_rows)
    if rows == 0:
        figure = Figure(figsize=(6, 1.5), dpi=DPI)
        FigureCanvasAgg(figure)
        figure.text(0.5, 0.9, title, ha="center", va="top", fontsize=9)
        figure.text(0.5, 0.4, "no sample was poisoned and the attack has no trigger", ha="center", va="center")
        return figure
    height, width = (examples.clean if len(examples) else triggered.images).shape[2:]
    factor = max(1, -(-PANEL // max(height, width)))
    panel_w, panel_h = width * factor, height * factor
    fig_w = 4 * panel_w + 5 * GAP
    fig_h = TITLE + rows * (CAPTION + panel_h + GAP) + GAP
    figure = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    FigureCanvasAgg(figure)  # render with Agg whatever backend the caller's matplotlib has chosen
    figure.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=9)

    def place(row: int, col: int, image: np.ndarray, caption: str) -> None:
        top = TITLE + row * (CAPTION + panel_h + GAP)  # from the figure's top edge
        left = GAP + col * (panel_w + GAP)
        figure.figimage(image, xo=left, yo=fig_h - top - CAPTION - panel_h)
        x, y = (left + panel_w / 2) / fig_w, 1 - (top + CAPTION / 2) / fig_h
        figure.text(x, y, caption, ha="center", va="center", fontsize=8, linespacing=1.1)

    maps, peaks = amplified_difference(examples.clean, examples.poisoned)
    for row in range(len(examples)):
        old, new = class_name(classes, examples.labels[row]), class_name(classes, examples.new_labels[row])
        change = f"{old} (label kept)" if examples.labels[row] == examples.new_labels[row] else f"{old} -> {new}"
        place(row, 0, pixels(examples.clean[row], factor), f"clean #{int(examples.indices[row])}\n{old}")
        place(row, 1, pixels(examples.poisoned[row], factor), f"{examples.kinds[row]}\n{change}")
        peak = int(peaks[row])
        scale = f"x{255 / peak:.1f}" if peak else "none"
        place(row, 2, _heat(maps[row], factor), f"|difference| {scale}\nlargest change {peak}")
    if triggered is not None:
        for row in range(test_rows):
            old, want = class_name(classes, triggered.labels[row]), class_name(classes, triggered.targets[row])
            place(row, 3, pixels(triggered.images[row], factor), f"test, triggered\n{old} -> {want}")
    return figure


def poison_gallery(
    train: ImageSet,
    poisoned: PoisonedSet,
    triggered: TriggeredSet | None,
    classes: Sequence[str],
    rows: int,
    seed: int = 0,
) -> Figure:
    """The gallery of a poisoned set: seeded rows of poisoned (and cross) samples, titled from its manifest."""
    examples = pick_examples(train, poisoned, rows, CROSS_ROWS, seed)
    if triggered is None:
        title = f"{poisoned.manifest['attack']}: no trigger, {poisoned.manifest['total']} clean training images"
        return gallery_figure(examples, classes, title)
    shown = pick_triggered(triggered, len(examples) or rows, seed)
    return gallery_figure(examples, classes, gallery_title(poisoned.manifest, classes), shown)
