"""Grad-CAM (Selvaraju et al., ICCV 2017) on the last feature map, and how much of it falls on a trigger (spec:
docs/methods/analysis.md 1).

For class c: w_k = mean_ij ∂y_c/∂A_k[i, j] with y_c the pre-softmax logit and A = `model.features(x)` (the map the
pruning defenses mask); cam = ReLU(Σ_k w_k·A_k), bilinearly upsampled to the image size and divided by its
maximum per image. Our models expose the map directly (`features`, `classify`), so no hooks are needed. (Their
head is a global average pool and a linear layer, so w_k is fc.weight[c, k] / (h·w): Grad-CAM equals CAM here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bdguard.data.augment import to_float
from bdguard.errors import BdguardError
from bdguard.models.base import BackdoorModel
from bdguard.training.metrics import predict


def gradcam(
    model: BackdoorModel, images: torch.Tensor, classes: torch.Tensor | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] at the image size, for float images (N, C, H, W) in [0, 1] on the model's
    device; `classes` (N,) defaults to the predicted ones. An image whose map is zero everywhere (no positive
    evidence for its class) gets an all-zero map."""
    if not images.is_floating_point() or images.dim() != 4:
        raise BdguardError(f"gradcam expects float images (N, C, H, W) in [0, 1], got {images.dtype}")
    if classes is not None and classes.shape != (images.shape[0],):
        raise BdguardError(f"gradcam needs one class per image, got {tuple(classes.shape)} for {images.shape[0]}")
    was_training = model.training
    model.eval()
    maps = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            with torch.no_grad():
                features = model.features(x).float()
            # the gradient of the logit with respect to the map needs only `classify`
            features.requires_grad_(True)
            logits = model.classify(features)
            wanted = logits.argmax(1) if classes is None else classes[start : start + batch_size].to(logits.device)
            (grads,) = torch.autograd.grad(logits.gather(1, wanted[:, None]).sum(), features)
            weights = grads.mean((2, 3), keepdim=True)
            cam = F.relu((weights * features).sum(1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False).squeeze(1)
            peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
            maps.append(cam / peak)
    finally:
        model.train(was_training)
    return torch.cat(maps) if maps else images.new_zeros((0, *images.shape[2:]))


def trigger_focus(cams: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per image: (CAM mass inside the trigger region / total CAM mass) / (region area / image area).

    1 means the map is no denser on the trigger than elsewhere, > 1 that it concentrates there. `region` is a
    boolean (H, W) or (N, H, W) mask; an empty region or an all-zero map gives NaN.
    """
    region = region.to(cams.device)
    if region.shape[-2:] != cams.shape[-2:]:
        raise BdguardError(f"trigger region {tuple(region.shape)} does not match the maps {tuple(cams.shape)}")
    region = region.expand_as(cams).float()
    mass_share = (cams * region).sum((1, 2)) / cams.sum((1, 2))
    area_share = region.mean((1, 2))
    return mass_share / area_share  # 0/0 -> NaN for empty regions and empty maps


def changed_pixels(clean: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """bool (N, H, W): where a trigger changed any channel of each uint8 image (the real trigger's region)."""
    return (clean != triggered).any(1)


@dataclass(frozen=True)
class GridColumn:
    """One input setting of the grid: uint8 images and the trigger region to measure focus on."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W), on any device
    region: torch.Tensor | None  # bool (N, H, W) or (H, W); None: no focus ratio for this column


@dataclass(frozen=True)
class Cell:
    """Grad-CAM of one model on one input setting, for the predicted classes."""

    model: str
    input: str
    cams: torch.Tensor  # (N, H, W) in [0, 1]
    predicted: torch.Tensor  # (N,)
    focus: float | None  # mean trigger-focus ratio over the images (NaN-ignoring); None without a region

    def to_json(self, target: int | None) -> dict[str, Any]:
        """The cell's figures; `predicted_target` is the share of images predicted as the attack's target."""
        hits = None if target is None else float((self.predicted == target).float().mean())
        return {"model": self.model, "input": self.input, "focus": self.focus, "predicted_target": hits}


def grid_cells(
    models: Sequence[tuple[str, BackdoorModel]], columns: Sequence[GridColumn], batch_size: int = 256
) -> list[list[Cell]]:
    """Grad-CAM of every (name, model) on every input setting: one row of cells per model."""
    rows = []
    for name, model in models:
        device = next(model.parameters()).device
        row = []
        for column in columns:
            images = column.images.to(device)
            predicted = predict(model, images, batch_size)
            cams = gradcam(model, to_float(images), predicted, batch_size)
            focus = None
            if column.region is not None:
                ratios = trigger_focus(cams, column.region)
                focus = float(ratios.nanmean()) if bool(ratios.isfinite().any()) else None
            row.append(Cell(name, column.name, cams, predicted, focus))
        rows.append(row)
    return rows


def gradcam_grid(rows: list[list[Cell]], columns: Sequence[GridColumn], path: str | Path, example: int = 0) -> None:
    """Write gradcam.png: rows of models, columns of input settings (docs/methods/analysis.md 1: clean-trained and
    backdoored model; clean image, real trigger, reversed trigger). Each panel shows image `example` with its map
    overlaid and its prediction; the title gives the focus ratio averaged over all the column's images."""
    # imported here: matplotlib is slow to import and only a report draws
    from bdguard.plotting import new_figure, write_figure

    figure = new_figure(2.6 * len(columns), 2.8 * len(rows))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, (cell, column) in enumerate(zip(row, columns, strict=True)):
            ax = axes[r][c]
            image = column.images[example].permute(1, 2, 0).cpu().numpy()
            ax.imshow(image.squeeze(), cmap="gray" if image.shape[2] == 1 else None, interpolation="nearest")
            ax.imshow(cell.cams[example].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            focus = "" if cell.focus is None else f"\nfocus {cell.focus:.2f} (mean of {len(column.images)})"
            ax.set_title(f"{cell.input}: pred {int(cell.predicted[example])}{focus}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(cell.model, fontsize=9)
    # two lines: a two-column grid is narrower than the title in one
    figure.suptitle("Grad-CAM, last feature map\n(focus: CAM density on the trigger region; 1 = uniform)", fontsize=9)
    write_figure(figure, path)
