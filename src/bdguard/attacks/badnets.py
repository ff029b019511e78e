"""BadNets (Gu et al., 2017): stamp a small fixed patch on the image and relabel it to the target.

Literature default: a 3x3 black-and-white checkerboard in the bottom-right corner.
`preset=reference` reproduces the V&B reference code (docs/methods/badnets.md 3): a 2x2 multi-coloured patch at rows
4-5, columns 4-5. A patch image can be given by path: a full-frame image of the data set's size (such as the
reference `badnets_patch_2x2.png`) is pasted with the reference rule (every non-zero pixel-channel value
overwrites the image); a smaller image is pasted whole at `position`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bdguard.attacks.base import Attack
from bdguard.attacks.pixels import patch_origin, pattern_patch, read_image
from bdguard.attacks.registry import ATTACKS
from bdguard.config import check_range


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
