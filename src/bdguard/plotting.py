"""What every figure of bdguard is drawn with: a matplotlib figure rendered by Agg whatever the backend, written
atomically, and images and class names as captions show them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bdguard.io import write_with

NAME_CHARS = 14  # longer class names are cut so captions stay within their column


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure of `width` x `height` inches, for the reports that draw with axes."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever backend the caller's matplotlib has chosen
    return figure


def write_figure(figure: Figure, path: str | Path) -> None:
    """Save as PNG through a temporary file, so a reader never sees half an image."""
    write_with(path, lambda handle: figure.savefig(handle, format="png", dpi="figure"))


def class_name(classes: Sequence[str], label: torch.Tensor | int) -> str:
    name = classes[int(label)]
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "\u2026"


def pixels(image: torch.Tensor, factor: int) -> np.ndarray:
    """(C, H, W) uint8 -> RGB (H, W, 3) upscaled by `factor` with nearest neighbours; one channel becomes grey.

    Colours are computed here, not by a matplotlib colour map, so every image pixel lands in the PNG unchanged.
    """
    array = image.cpu().numpy().transpose(1, 2, 0)
    if array.shape[2] == 1:
        array = array.repeat(3, axis=2)
    return array.repeat(factor, axis=0).repeat(factor, axis=1)
