"""AttentionMix (docs/methods/vab.md 2): blend each image with a partner inside the region its own attention marks, and
mix the labels by how much attention mass moves.

Images are floats in [0, 1] (the models normalise inside); mixing there equals mixing normalised images because
the two blend weights sum to 1 (up to eps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def attention_map(features: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """(N, D, h, w) feature maps -> (N, 1, H, W) attention: sum of squares over channels, upsampled to the image
    size, min-max normalised per sample (so the weakest cell is 0)."""
    raw = features.float().pow(2).sum(1, keepdim=True)
    # align_corners only exists for the interpolating modes
    up = F.interpolate(raw, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    low = up.amin(dim=(1, 2, 3), keepdim=True)
    high = up.amax(dim=(1, 2, 3), keepdim=True)
    return (up - low) / (high - low + EPS)


def attention_mix(
    images: torch.Tensor, attention: torch.Tensor, targets: torch.Tensor, threshold: float, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix image i with image partner[i] inside i's region M_i = {attention_i >= threshold}.

    images (N, C, H, W), attention (N, 1, H, W) in [0, 1], targets (N, K), partner: a permutation of 0..N-1.
    Returns the mixed images, the mixed targets and the share of pixels inside the regions (a tensor, read lazily).
    With W_i = i's attention mass inside M_i, V_i = the partner's mass there, rho = W/(W+V), sigma = V/(W+V):
    pixels in M_i become rho * x_i + sigma * x_partner, and the target (1 - W sigma) t_i + W sigma t_partner.
    """
    region = attention >= threshold
    mask = region.to(attention.dtype)
    other = attention[partner]
    own = (attention * mask).sum(dim=(1, 2, 3)) / (attention.sum(dim=(1, 2, 3)) + EPS)
    theirs = (other * mask).sum(dim=(1, 2, 3)) / (other.sum(dim=(1, 2, 3)) + EPS)
    rho = own / (own + theirs + EPS)
    sigma = theirs / (own + theirs + EPS)
    blended = rho.view(-1, 1, 1, 1) * images + sigma.view(-1, 1, 1, 1) * images[partner]
    mixed = torch.where(region, blended, images)
    # label weights lambda1 = 1 - W, lambda2 = W rho, lambda3 = W - lambda2 (so that they sum to 1)
    taken = own - own * rho
    mixed_targets = (1.0 - taken).unsqueeze(1) * targets + taken.unsqueeze(1) * targets[partner]
    return mixed, mixed_targets, mask.mean()
