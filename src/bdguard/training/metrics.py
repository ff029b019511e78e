"""Benign accuracy (BA), attack success rate (ASR) and robust accuracy (RA).

BA: accuracy on the whole clean test set. ASR: the share of triggered test images (whose true class is
not the target, for all-to-one) classified as the attacker's target. RA: the share of the same images
classified as their true class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bdguard.data.augment import to_float
from bdguard.data.base import ImageSet
from bdguard.training.runtime import autocast

if TYPE_CHECKING:  # attacks import the training package: a runtime import would be circular
    from bdguard.data.base import TriggeredSet


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512, amp: bool = True) -> torch.Tensor:
    """Predicted classes for uint8 images, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        with autocast(device, amp):
            out.append(model(batch).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        return float("nan")
    return int((predictions == labels.to(predictions.device)).sum()) / labels.numel()


def evaluate(
    model: torch.nn.Module, clean: ImageSet, triggered: TriggeredSet | None, batch_size: int = 512, amp: bool = True
) -> dict[str, float | None]:
    """BA on `clean`; ASR and RA on `triggered` (None when there is no attack)."""
    result: dict[str, float | None] = {"ba": accuracy(predict(model, clean.images, batch_size, amp), clean.labels)}
    if triggered is None:
        result.update(asr=None, ra=None)
    else:
        pred = predict(model, triggered.images, batch_size, amp)
        result.update(asr=accuracy(pred, triggered.targets), ra=accuracy(pred, triggered.labels))
    return result


@dataclass(frozen=True)
class Evaluator:
    """`evaluate` bound to fixed sets: a callable model -> {"ba", "asr", "ra"} whose sets can also be read
    (post-training defenses trace BA/ASR curves on them without re-running the whole network per point)."""

    clean: ImageSet
    triggered: TriggeredSet | None
    batch_size: int = 512
    amp: bool = True

    def __call__(self, model: torch.nn.Module) -> dict[str, float | None]:
        return evaluate(model, self.clean, self.triggered, self.batch_size, self.amp)


def _share(part: torch.Tensor, whole: torch.Tensor) -> float | None:
    total = int(whole.sum())
    return int((part & whole).sum()) / total if total else None


def detection_metrics(
    scores: torch.Tensor, flagged: torch.Tensor, poison: torch.Tensor, cross: torch.Tensor | None = None
) -> dict[str, float | int | None]:
    """How a poisoned-sample detector did against the ground truth `poison` (bool (N,)): |flagged|, |kept|, TPR =
    |flagged & poison| / |poison|, FPR on the clean samples, precision, the residual poison rate of what is kept,
    and AUROC/AUPRC of the continuous `scores` (higher = more suspicious; never of the hard flags). Cross samples
    (WaNet's noise, IAD's cross mode: trigger-like, label kept) count as clean and are also reported on their own.
    The threshold-free figures are None when the set holds only one kind; every rate is None when nothing was
    poisoned (no attack: there is nothing to measure a detector against, only the count it flagged)."""
    # imported here: scikit-learn is slow to import and only detectors report
    from sklearn.metrics import average_precision_score, roc_auc_score

    flagged, poison = flagged.detach().bool().cpu(), poison.detach().bool().cpu()
    cross = torch.zeros_like(poison) if cross is None else cross.detach().bool().cpu()
    truth, values = poison.numpy(), scores.detach().float().cpu().numpy()
    both_kinds = 0 < truth.sum() < truth.size
    if not poison.any():
        rates = ("tpr", "fpr", "precision", "residual", "auroc", "auprc", "cross_in_suspicious")
        return {"suspicious": int(flagged.sum()), "credible": int((~flagged).sum()), **dict.fromkeys(rates)}
    return {
        "suspicious": int(flagged.sum()),
        "credible": int((~flagged).sum()),
        "tpr": _share(flagged, poison),
        "fpr": _share(flagged, ~poison),
        "precision": _share(poison, flagged),
        "residual": _share(poison, ~flagged),
        "auroc": float(roc_auc_score(truth, values)) if both_kinds else None,
        "auprc": float(average_precision_score(truth, values)) if both_kinds else None,
        "cross_in_suspicious": _share(flagged, cross),
    }
