"""Blended (Chen et al., 2017): blend a trigger image into the whole image and relabel it to the target.

`x' = trunc(x + alpha * (t - x))` per pixel and channel: (1 - alpha) * x + alpha * t, evaluated in float32 in the
order PIL's `Image.blend` uses, so that the reference code's images are reproduced byte for byte (the literal
(1 - alpha) * x + alpha * t in float32 differs from it by one on about 2 % of (x, t) pairs at alpha 0.1).

Literature default: alpha = 0.2 (the common benchmark value) with a uniform random-noise trigger image drawn from
the attack seed. `preset=reference` reproduces the V&B reference code (docs/methods/blended.md 3): alpha = 0.1. Its
trigger, the Hello-Kitty image, is not part of the package: pass it by path with `image=...` (for example
../shared/data/triggers/hello_kitty.png), with or without the preset. Any image file is converted to the data set's
channel count (RGB for three channels, grey otherwise) and resized to its size with PIL bicubic, as the reference
does.

Poison-label: `rate` is the fraction of the whole training set; poisoned labels become the target (all2one) or
(y + 1) mod K (all2all). Results are written back to uint8 by truncation: clamped to [0, 255], then floored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdguard.attacks.base import Attack
from bdguard.attacks.pixels import blend, read_image
from bdguard.attacks.registry import ATTACKS
from bdguard.config import check_range


@dataclass
class BlendedParams:
    alpha: float = 0.2
    image: str | None = None  # path to the trigger image; None = uniform noise drawn from the attack seed

    def __post_init__(self) -> None:
        check_range("blended.alpha", self.alpha, 0.0, 1.0)


@ATTACKS.register
class Blended(Attack):
    name = "blended"
    Params = BlendedParams
    presets = {"reference": {"alpha": 0.1}}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c, h, w = self.image_shape
        if self.params.image is not None:
            self.trigger = read_image(self.params.image, c, "blended.image", (h, w))
        else:
            generator = torch.Generator().manual_seed(self.config.seed)
            self.trigger = torch.randint(0, 256, (c, h, w), generator=generator, dtype=torch.uint8)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return blend(images, self.trigger, self.params.alpha)
