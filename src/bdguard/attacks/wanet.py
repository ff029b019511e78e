"""WaNet (Nguyen & Tran, 2021): a smooth, nearly invisible warp of the whole image as the trigger.

The warping grid (1, H, W, 2), last axis (x, y) in [-1, 1] as `grid_sample` expects, is built once:
- from the attack seed (default): `u ~ U(-1, 1)^(2 x k x k)`, `noise = bicubic_upsample(u / mean|u|)` to H x W
  (align_corners=True), `grid = clamp((identity + s * noise / size) * grid_rescale, -1, 1)`, where the identity
  has channel 0 = column coordinate x and channel 1 = row coordinate y, both `linspace(-1, 1)`, and `size` is W
  for the x channel and H for the y channel (the original code divides both by the height; the two agree on
  square images, and dividing each axis by its own length keeps the displacement the same in pixels on both).
  `grid_rescale` multiplies the whole grid, as in the original WaNet code; 1 leaves it unchanged.
- or from a file, `grid_path`: a .npy float array of shape (1, H, W, 2), used as it is (k, s and grid_rescale
  then do not apply), e.g. ../shared/data/triggers/wanet_grid_k4_s0.5.npy, the reference code's exact grid for
  32 x 32 images.
Triggered image: `trunc(grid_sample(x, grid, bilinear, zero padding, align_corners=True))` on the float pixel
values in [0, 255]; results are written back to uint8 by truncation (clamped to [0, 255], then floored), as the
reference does. Because of that truncation and float32 rounding inside `grid_sample`, even the identity grid
(s = 0) lowers some pixels by one.

Poisoning: one seeded permutation of all indices; its first round(rate x N) samples are warped with the grid and
relabelled (target for all2one, (y + 1) mod K for all2all; `rate` is the fraction of the whole training set),
the next round(cross_ratio x rate x N) are noise ("cross") samples that keep their labels and are warped with
`clamp(grid + U(-1, 1)^(H x W x 2) / size, -1, 1)`, a grid drawn per sample (from the same seeded stream) once,
when the set is poisoned (`noise="static"`, as the reference code does; the original WaNet's fresh noise for every
training batch is out of scope here, since the poisoned set is computed once and stored). Test images are warped
with the clean grid only.

Defaults are the literature's (WaNet on CIFAR-10): k = 4, s = 0.5, grid_rescale = 1, cross_ratio = 2.
`preset=reference` pins the V&B reference code's values (docs/methods/wanet.md 3), which are the same; pass
`grid_path=.../wanet_grid_k4_s0.5.npy` for its exact grid. The reference fixes its noise set at 20 % of the whole
set whatever the rate, which is cross_ratio = 2 at its rate of 0.1 (use cross_ratio = 0.2 / rate at other rates).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from bdguard.attacks.base import Attack
from bdguard.attacks.pixels import truncate_to_uint8
from bdguard.attacks.registry import ATTACKS
from bdguard.config import check_range
from bdguard.data.base import ImageSet, PoisonedSet
from bdguard.errors import BdguardError

# Grid values per chunk of noise samples (about 32 MB of float32 per grid tensor), bounding memory on large images.
_CHUNK_VALUES = 1 << 22


@dataclass
class WaNetParams:
    k: int = 4  # control grid size
    s: float = 0.5  # warping strength
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0  # noise samples per poisoned sample
    grid_path: str | None = None  # .npy grid (1, H, W, 2); overrides k, s and grid_rescale
    noise: Literal["static"] = "static"  # noise grids drawn once when poisoning

    def __post_init__(self) -> None:
        check_range("wanet.k", self.k, 1)
        check_range("wanet.s", self.s, 0.0)
        check_range("wanet.cross_ratio", self.cross_ratio, 0.0)
        if self.grid_rescale <= 0:
            raise BdguardError(f"wanet.grid_rescale must be > 0, got {self.grid_rescale}")


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(1, H, W, 2) grid that samples every pixel at its own position: channel 0 = x (column), 1 = y (row)."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((cols, rows), dim=-1)[None]


def seeded_grid(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int) -> torch.Tensor:
    """The WaNet warping grid (1, H, W, 2) drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    control = control / control.abs().mean()
    noise = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    size = torch.tensor([width, height], dtype=torch.float32)
    return ((identity_grid(height, width) + s * noise / size) * grid_rescale).clamp(-1, 1)


def load_grid(path: str, height: int, width: int) -> torch.Tensor:
    """A stored grid (.npy, no pickles) checked to be a finite float array of shape (1, H, W, 2)."""
    if not Path(path).is_file():
        raise BdguardError(f"wanet.grid_path not found: {path}")
    try:
        with open(path, "rb") as f:
            array = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BdguardError(f"cannot read wanet.grid_path {path} as a .npy array: {exc}") from None
    if array.shape != (1, height, width, 2) or not np.issubdtype(array.dtype, np.floating):
        raise BdguardError(
            f"wanet.grid_path {path} must hold a float array of shape (1, {height}, {width}, 2) for "
            f"{height}x{width} images, got {array.dtype} {array.shape}"
        )
    if not np.isfinite(array).all():
        raise BdguardError(f"wanet.grid_path {path} holds non-finite values")
    return torch.from_numpy(array.astype(np.float32))


def warp(images: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) sampled at `grids` (N, H, W, 2), bilinear, truncated back to uint8."""
    out = F.grid_sample(images.float(), grids, mode="bilinear", padding_mode="zeros", align_corners=True)
    return truncate_to_uint8(out)


@ATTACKS.register
class WaNet(Attack):
    name = "wanet"
    Params = WaNetParams
    presets = {"reference": {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0, "noise": "static"}}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        self.check_cross_ratio(p.cross_ratio)
        _, h, w = self.image_shape
        if p.grid_path is not None:
            self.grid = load_grid(p.grid_path, h, w)
        else:
            self.grid = seeded_grid(h, w, p.k, p.s, p.grid_rescale, self.config.seed)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return warp(images, self.grid.to(images.device).expand(images.shape[0], -1, -1, -1))

    def _apply_noisy(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise samples: each warped with the grid plus its own uniform noise of up to one pixel."""
        _, h, w = self.image_shape
        size = torch.tensor([w, h], dtype=torch.float32)
        chunk = max(1, _CHUNK_VALUES // (2 * h * w))
        out = torch.empty_like(images)
        # Drawn on the CPU from the seeded generator, so the set does not depend on the device.
        for start in range(0, images.shape[0], chunk):
            part = images[start : start + chunk]
            noise = torch.rand(part.shape[0], h, w, 2, generator=generator) * 2 - 1
            grids = (self.grid + noise / size).clamp(-1, 1)
            out[start : start + chunk] = warp(part, grids.to(images.device))
        return out

    def poison(self, train: ImageSet) -> PoisonedSet:
        def noisy(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return self._apply_noisy(train.images[index], generator)

        return self.poison_with_cross(train, self.params.cross_ratio, noisy)
