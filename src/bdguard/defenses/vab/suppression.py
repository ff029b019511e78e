"""Stage B's targets (docs/methods/vab.md 4): hard pseudo-labels from two views, suppression by the Victim's beliefs,
and the unlearning loss of `stage_b=unlearn`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_targets(*probs: torch.Tensor) -> torch.Tensor:
    """One-hot argmax of the mean of the views' class probabilities; exact ties share the mass equally."""
    mean = torch.stack(probs).mean(dim=0)
    hits = (mean == mean.amax(dim=1, keepdim=True)).to(mean.dtype)
    return hits / hits.sum(dim=1, keepdim=True)


def victim_beliefs(victim_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(victim_logits.float() / temperature, dim=1)


def of_labels(beliefs: torch.Tensor, labels: torch.Tensor, suppressed: torch.Tensor | None) -> torch.Tensor:
    """The beliefs of the samples whose label is `suppressed` (bool (K,)), zero for the others (None: all kept):
    `suppress_labels=attacked`, where only the labels an attack poisoned have their credible targets suppressed
    (the Victim, trained on its own flags, is sure of whole easy classes too; docs/methods/vab.md 4)."""
    if suppressed is None:
        return beliefs
    return beliefs * suppressed.to(beliefs.device)[labels].unsqueeze(1).to(beliefs.dtype)


def suppress(targets: torch.Tensor, beliefs: torch.Tensor) -> torch.Tensor:
    """clip(targets - beliefs, 0, 1): what the Victim (the backdoor expert) already predicts is taken out.
    Not renormalised on purpose: a sample the Victim is sure of weighs (almost) nothing."""
    return (targets - beliefs).clamp(0.0, 1.0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets_k log softmax(logits)_k; targets need not sum to 1."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def unlearning_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log(1 - softmax(logits)_label): pushes the given label down, bounded below by 0 (unlike
    gradient ascent on the cross-entropy, it stops pulling once the label is unlikely and never diverges)."""
    logits = logits.float()
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()
