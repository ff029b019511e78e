"""The Victim (docs/methods/vab.md 1): a network trained to be backdoored, whose low prediction entropy flags
poisoned samples.

One epoch on all data, then epochs on the suspicious set S only (no augmentation, the given labels); after each,
every training sample is re-scored: entropy of the softmax, smoothed over rounds, min-max normalised, and S is
the samples at or below the threshold.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bdguard import distributed
from bdguard.data.base import ImageSet
from bdguard.progress import progress_bar
from bdguard.training.runtime import Runtime, batch_indices, steps_per_epoch


def victim_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageSet,
    index: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    runtime: Runtime,
    label: str,
) -> float | None:
    """One epoch of plain cross-entropy on the samples `index` (shuffled, unaugmented); the mean loss, or None
    when there is nothing to train on. `model` is the network that trains (under torchrun, in
    DistributedDataParallel: each rank takes its part of every batch)."""
    if index.numel() == 0:
        return None
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    with progress_bar(label, steps_per_epoch(index.numel(), batch_size), runtime.quiet) as bar:
        for batch in batch_indices(index.numel(), batch_size, generator):
            part, factor = distributed.split(batch.numel())
            chosen = index[batch][part]
            x = runtime.inputs(data.images[chosen])
            with runtime.autocast():
                loss = F.cross_entropy(model(x), data.labels[chosen])
            runtime.step(optimizer, loss * factor)
            loss_sum += loss.detach() * chosen.numel()
            bar.update(1)
    return float(distributed.all_sum(loss_sum)) / index.numel()


@torch.no_grad()
def victim_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, runtime: Runtime) -> torch.Tensor:
    """The network's float logits for every image (eval mode, no augmentation), batched. A scoring round reads the
    entropy from them, and stage B its suppression beliefs: the Victim does not change in between. Under torchrun
    each rank scores its part of the images (with the main rank's BatchNorm statistics) and all get every logit."""
    distributed.sync_buffers(model)
    was_training = model.training
    model.eval()
    mine = images[distributed.part_of(images.shape[0])]
    logits = []
    for start in range(0, max(mine.shape[0], 1), batch_size):  # a rank with no images still returns (0, K)
        with runtime.autocast():
            logits.append(model(runtime.inputs(mine[start : start + batch_size])).float())
    model.train(was_training)
    return distributed.gather(torch.cat(logits))


def entropy_scores(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample prediction entropy / K; 0 log 0 counts as 0."""
    probs = F.softmax(logits.float(), dim=1)
    return -torch.xlogy(probs, probs).sum(dim=1) / probs.shape[1]


class EntropyDetector:
    """The smoothed entropy history H (un-normalised) and the split it gives."""

    def __init__(self, ema: float) -> None:
        self.ema = ema
        self.history: torch.Tensor | None = None
        self.rounds = 0

    def update(self, scores: torch.Tensor) -> torch.Tensor:
        """Fold one round of raw scores into H (weight `ema` on the new round); returns the normalised scores."""
        self.history = scores if self.history is None else self.ema * scores + (1.0 - self.ema) * self.history
        self.rounds += 1
        return self.normalised()

    def normalised(self) -> torch.Tensor:
        """H min-max scaled to [0, 1] over the whole training set; all-equal scores carry no signal: all 1."""
        if self.history is None:
            raise RuntimeError("no scoring round yet")
        low, high = self.history.min(), self.history.max()
        if high <= low:
            return torch.ones_like(self.history)
        return (self.history - low) / (high - low)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.rounds = state["history"], int(state["rounds"])


def entropy_split(normalised: torch.Tensor, tau: float) -> torch.Tensor:
    """The suspicious mask: normalised entropy at or below tau (low entropy = likely poisoned)."""
    return normalised <= tau
