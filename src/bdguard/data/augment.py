"""Batched augmentation on the training device: random crop with zero padding and horizontal flip.

Everything works on a whole uint8 batch at once with one generator, so a run is reproducible under a seed
and never touches PIL or per-sample Python code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and take one random crop of the original size per image."""
    if padding == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


@dataclass(frozen=True)
class Augment:
    """The training augmentation: crop with padding, then an optional flip."""

    padding: int = 4
    flip: bool = True

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = random_crop(images, self.padding, generator)
        return random_flip(images, generator) if self.flip else images


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [0, 1]; models normalise internally."""
    return images.float().div_(255.0)
