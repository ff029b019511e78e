"""Pixel helpers the attacks share: uint8 truncation, PIL-exact blending, trigger images read from files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bdguard.errors import BdguardError


def truncate_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Float pixel values to uint8 as the reference's casts do: clamp to [0, 255], then truncate."""
    # The cast truncates toward zero, which is the floor on the clamped, non-negative values.
    return values.clamp(0, 255).to(torch.uint8)


def blend(images: torch.Tensor, trigger: torch.Tensor, alpha: float) -> torch.Tensor:
    """trunc(x + alpha * (t - x)) with PIL `Image.blend`'s float32 arithmetic; `trigger` broadcasts over `images`."""
    x = images.float()
    weight = torch.tensor(alpha, dtype=torch.float32, device=images.device)
    out = trigger.to(images.device, torch.float32) - x
    return truncate_to_uint8(out.mul_(weight).add_(x))


def read_image(path: str, channels: int, what: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as (C, H, W) uint8 in the data set's channel count, resized with PIL bicubic to `size`."""
    if not Path(path).is_file():
        raise BdguardError(f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            # Convert first, then resize: the reference's order.
            img = img.convert("RGB" if channels == 3 else "L")
            if size is not None:
                img = img.resize((size[1], size[0]), Image.BICUBIC)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise BdguardError(f"cannot read {what} {path}: {exc}") from None
    tensor = torch.from_numpy(array.copy())
    if tensor.dim() == 3:
        return tensor.permute(2, 0, 1).contiguous()
    return tensor.expand(channels, *tensor.shape).contiguous()
