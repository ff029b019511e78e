"""SIG (Barni et al., 2019): clean-label attack with a sinusoidal signal over the whole image.

The signal is `v(j) = delta * sin(2 pi j f / W)` for column j of a W-pixel-wide image, the same on every row and
channel (vertical stripes). Only target-class images are poisoned and labels are kept (`clean_label`), so `rate`
is the fraction of the target class and only all2one exists.

Two forms, chosen with `form`:
- "standard" (default, the literature's additive signal): `x' = trunc(clamp(x + v, 0, 255))`, delta = 20,
  f = 6.
- "reference" (`preset=reference`, the V&B reference code, docs/methods/sig.md 3): the code writes v into a uint8 array,
  so the pattern is `P(j) = trunc(v(j)) mod 256` (negative lobes wrap around to 236..255), and P is then blended
  rather than added, `x' = trunc(0.9 x + 0.1 P)` with PIL's float32 arithmetic (see `blended.blend`); delta = 20,
  f = 6. For W = 32 row 0 of P is 0, 18, 14, 249, 236, 249, 14, 18, 0, 238, 242, 7, 20, ...
Results are written back to uint8 by truncation: clamped to [0, 255], then floored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bdguard.attacks.base import Attack
from bdguard.attacks.pixels import blend, truncate_to_uint8
from bdguard.attacks.registry import ATTACKS
from bdguard.config import check_range

REFERENCE_ALPHA = 0.1  # the reference code's blend ratio, hard-coded there too


@dataclass
class SigParams:
    delta: float = 20.0
    frequency: float = 6.0
    form: Literal["standard", "reference"] = "standard"

    def __post_init__(self) -> None:
        check_range("sig.delta", self.delta, 0.0)
        check_range("sig.frequency", self.frequency, 0.0)


def sine_signal(width: int, delta: float, frequency: float) -> np.ndarray:
    """v(j) for j = 0..width-1, in float64 and in the reference's order of operations, so that its truncation
    to integers (the reference form) matches the reference's values exactly."""
    j = np.arange(width, dtype=np.float64)
    return delta * np.sin(2 * np.pi * j * frequency / width)


@ATTACKS.register
class Sig(Attack):
    name = "sig"
    Params = SigParams
    presets = {"reference": {"form": "reference", "delta": 20.0, "frequency": 6.0}}
    clean_label = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c, h, w = self.image_shape
        signal = sine_signal(w, self.params.delta, self.params.frequency)
        if self.params.form == "reference":
            # The uint8 store wraps the truncated values modulo 256 (two's complement for the negative lobes).
            row = torch.from_numpy(np.trunc(signal).astype(np.int64) % 256).to(torch.uint8)
        else:
            row = torch.from_numpy(signal).float()
        self.pattern = row.expand(c, h, w).contiguous()

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.params.form == "reference":
            return blend(images, self.pattern, REFERENCE_ALPHA)
        return truncate_to_uint8(images.float() + self.pattern.to(images.device))
