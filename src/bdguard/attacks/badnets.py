"""BadNets (Gu et al., 2017): stamp a small fixed patch on the image and relabel it to the target.

Literature default: a 3x3 black-and-white checkerboard in the bottom-right corner.
`preset=reference` reproduces the V&B reference code (vab.md 3.2): a 2x2 multi-coloured patch at rows 4-5,
columns 4-5. A patch image can be given by path: a full-frame image of the data set's size (such as the
reference `badnets_patch_2x2.png`) is pasted with the reference rule (every non-zero pixel-channel value
overwrites the image); a smaller image is pasted whole at `position`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bdguard.attacks.base import Attack
from bdguard.attacks.pixels import read_image
from bdguard.attacks.registry import ATTACKS
from bdguard.config import check_range
from bdguard.errors import BdguardError

# The four RGB values of the reference patch, (row, col) = (4,4), (4,5), (5,4), (5,5) of a 32x32 frame.
REFERENCE_PATCH = ((180, 249, 112), (155, 50, 126), (234, 82, 68), (187, 201, 219))


@dataclass
class BadNetsParams:
    patch_size: int = 3
    position: str = "bottom-right"  # a corner name, "center", or "row,col" of the patch's top-left pixel
    margin: int = 0  # distance in pixels from the named corner
    pattern: Literal["checkerboard", "white", "black", "random", "reference"] = "checkerboard"
    patch_image: str | None = None  # path to a patch image; overrides `pattern`

    def __post_init__(self) -> None:
        check_range("badnets.patch_size", self.patch_size, 1)
        check_range("badnets.margin", self.margin, 0)


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


@ATTACKS.register
class BadNets(Attack):
    name = "badnets"
    Params = BadNetsParams
    presets = {"reference": {"pattern": "reference", "patch_size": 2, "position": "4,4"}}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pattern, self.mask = self._build_trigger()

    def _build_trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trigger as a full-frame pattern and a boolean mask of the entries it overwrites."""
        c, h, w = self.image_shape
        p = self.params
        if p.patch_image is not None:
            patch = read_image(p.patch_image, c, "badnets.patch_image")
            if patch.shape[1:] == (h, w):
                return patch, patch != 0
        else:
            patch = pattern_patch(p.pattern, p.patch_size, c, self.config.seed)
        row, col = patch_origin(p.position, p.margin, tuple(patch.shape[1:]), (h, w))
        pattern = torch.zeros((c, h, w), dtype=torch.uint8)
        mask = torch.zeros((c, h, w), dtype=torch.bool)
        pattern[:, row : row + patch.shape[1], col : col + patch.shape[2]] = patch
        mask[:, row : row + patch.shape[1], col : col + patch.shape[2]] = True
        return pattern, mask

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask.to(images.device), self.pattern.to(images.device), images)
