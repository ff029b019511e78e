"""Per-channel activation norms of the last feature map, and how a trigger shifts them (docs/methods/analysis.md 2).

For channel k of the feature map A (N images, K channels, H x W) and image x:
    l1 = sum_ij |A_k[i,j]|,  l2 = sqrt(sum_ij A_k[i,j]^2),  linf = max_ij |A_k[i,j]|.
Every statistic is a (K, N) tensor: one row per channel, one column per image. Norms are computed in float32
(sums of squares overflow in half precision), in eval mode and without gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bdguard.data.augment import to_float
from bdguard.models.base import BackdoorModel

NORMS = ("1", "2", "inf")
EPS = 1e-8  # keeps rel and z finite for channels that never fire on clean images


@torch.no_grad()
def feature_maps(model: BackdoorModel, images: torch.Tensor, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The float32 feature maps (n, K, h, w) of uint8 images, batch by batch, with the model in eval mode."""
    was_training = model.training
    model.eval()
    device = model.feature_mask.device
    try:
        for start in range(0, images.shape[0], batch_size):
            yield model.features(to_float(images[start : start + batch_size].to(device))).float()
    finally:
        model.train(was_training)


def channel_norms(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, K, H, W) feature maps -> {"1", "2", "inf"}: (K, N) per-image l1, l2 and linf norms of every channel."""
    flat = maps.float().abs().flatten(2)  # |A|, so the norms are also right for maps that can be negative
    norms = {"1": flat.sum(2), "2": flat.pow(2).sum(2).sqrt(), "inf": flat.amax(2)}
    return {p: value.T.contiguous() for p, value in norms.items()}


def activation_stats(model: BackdoorModel, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The three norms of `channel_norms` plus "avg", the signed spatial mean (the global-average-pooled feature
    that `classify` reads, and Fine-Pruning's mean activation), each (K, N) on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in (*NORMS, "avg")}
    for maps in feature_maps(model, images, batch_size):
        for p, value in channel_norms(maps).items():
            parts[p].append(value.cpu())
        parts["avg"].append(maps.mean(dim=(2, 3)).T.cpu())
    k = model.feature_channels
    return {key: torch.cat(values, 1) if values else torch.empty(k, 0) for key, values in parts.items()}


@torch.no_grad()
def pooled_features(model: BackdoorModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, K) global-average-pooled feature maps of uint8 images, on the model's device: all that `classify`
    reads, so predictions under any channel mask follow from them without another pass through the network."""
    pooled = [maps.mean(dim=(2, 3)) for maps in feature_maps(model, images, batch_size)]
    return torch.cat(pooled) if pooled else torch.empty(0, model.feature_channels, device=model.feature_mask.device)


def auroc(clean: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """Per-channel ROC-AUC of telling triggered from clean images by the value alone: the probability that a
    triggered image's value exceeds a clean one's (ties count 1/2). Above 0.5: the trigger raises the value.

    Exact Mann-Whitney form, vectorised over channels: each triggered value counts the clean values below it, and
    half of those equal to it, in the channel's sorted clean values; (K, N) and (K, M) -> (K,).
    """
    n, m = clean.shape[1], triggered.shape[1]
    ordered = clean.double().sort(dim=1).values
    triggered = triggered.double().to(ordered.device).contiguous()
    below = torch.searchsorted(ordered, triggered, side="left")
    up_to = torch.searchsorted(ordered, triggered, side="right")
    u = (below + up_to).sum(1).double() / 2  # pairs (clean, triggered) in which the triggered value is larger
    return (u / (n * m)).float().cpu()


def clean_summary(clean: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and (population) std of one statistic over clean images: (K, N) -> two (K,) tensors."""
    clean = clean.float()
    return {"mean_clean": clean.mean(1), "std_clean": clean.std(1, correction=0)}


def shift_summary(clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, torch.Tensor]:
    """How a trigger moves one statistic, per channel, from (K, N) clean and (K, M) triggered values:
    the clean summary, mean and std of the triggered values, diff = mean_trig - mean_clean,
    rel = diff / mean_clean, z = diff / std_clean, and auroc. Every entry is a (K,) float32 tensor."""
    summary = clean_summary(clean)
    triggered = triggered.float()
    diff = triggered.mean(1) - summary["mean_clean"]
    return {
        **summary,
        "mean_trig": triggered.mean(1),
        "std_trig": triggered.std(1, correction=0),
        "diff": diff,
        "rel": diff / (summary["mean_clean"] + EPS),
        "z": diff / (summary["std_clean"] + EPS),
        "auroc": auroc(clean, triggered),
    }
