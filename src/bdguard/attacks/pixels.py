"""Pixel helpers the attacks share: uint8 truncation, PIL-exact blending, trigger images read from files, and
where and what a stamped patch is (BadNets, LC and Trojan)."""

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


def mask_blend(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x + m (p - x) = (1 - m) x + m p on float images: a pattern laid over `x` where the mask is on (IAD's trigger,
    Neural Cleanse's reverse-engineered one); mask and pattern broadcast against `x`."""
    return x + mask * (pattern - x)


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
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BdguardError(f"cannot read {what} {path}: {exc}") from None
    tensor = torch.from_numpy(array.copy())
    if tensor.dim() == 3:
        return tensor.permute(2, 0, 1).contiguous()
    return tensor.expand(channels, *tensor.shape).contiguous()


# The four RGB values of the reference patch, (row, col) = (4,4), (4,5), (5,4), (5,5) of a 32x32 frame.
REFERENCE_PATCH = ((180, 249, 112), (155, 50, 126), (234, 82, 68), (187, 201, 219))


def patch_origin(
    position: str, margin: int, patch: tuple[int, int], image: tuple[int, int], what: str = "badnets"
) -> tuple[int, int]:
    """Top-left (row, col) of a patch of size `patch` placed at `position` in an image of size `image`; `what` names
    the attack in error messages."""
    (ph, pw), (h, w) = patch, image
    corners = {
        "top-left": (margin, margin),
        "top-right": (margin, w - pw - margin),
        "bottom-left": (h - ph - margin, margin),
        "bottom-right": (h - ph - margin, w - pw - margin),
        "center": ((h - ph) // 2, (w - pw) // 2),
    }
    if position in corners:
        row, col = corners[position]
    else:
        try:
            row, col = (int(v) for v in position.split(","))
        except ValueError:
            raise BdguardError(
                f"{what}.position must be one of {', '.join(corners)} or 'row,col', got {position!r}"
            ) from None
    if ph > h or pw > w:
        raise BdguardError(f"{what} patch {ph}x{pw} is larger than the {h}x{w} image")
    if not (0 <= row <= h - ph and 0 <= col <= w - pw):
        raise BdguardError(f"{what} patch {ph}x{pw} at ({row},{col}) does not fit in the {h}x{w} image")
    return row, col


def pattern_patch(pattern: str, size: int, channels: int, seed: int, what: str = "badnets") -> torch.Tensor:
    """A generated (C, size, size) uint8 patch; `what` names the attack in error messages."""
    if pattern == "reference":
        if size != 2:
            raise BdguardError(f"{what} pattern 'reference' is the 2x2 reference patch: set patch_size=2")
        rgb = torch.tensor(REFERENCE_PATCH, dtype=torch.uint8).T.reshape(3, 2, 2)
        if channels == 3:
            return rgb
        return rgb.float().mean(0, keepdim=True).round().to(torch.uint8).expand(channels, 2, 2).clone()
    if pattern == "checkerboard":
        grid = torch.arange(size)
        cell = ((grid[:, None] + grid[None, :]) % 2 == 0).to(torch.uint8) * 255
        return cell.expand(channels, size, size).clone()
    if pattern == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (channels, size, size), generator=generator, dtype=torch.uint8)
    value = 255 if pattern == "white" else 0
    return torch.full((channels, size, size), value, dtype=torch.uint8)
