"""The Beneficiary's two kinds of epoch: stage A (vab.md 7.3, AttentionMix on the credible set C) and stage B
(vab.md 8, C labelled and S unlabelled, both kinds of target suppressed by the Victim).

As in the reference code, the no-grad passes (attention features, pseudo-labels) run in train mode and mixed
batches go through the network in two halves, so BatchNorm sees the same batches as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdguard.data.augment import Augment
from bdguard.data.base import ImageSet
from bdguard.defenses.vab.attention_mix import attention_map, attention_mix
from bdguard.defenses.vab.config import VabParams
from bdguard.defenses.vab.runtime import Runtime, cycle_batches
from bdguard.defenses.vab.suppression import pseudo_targets, soft_cross_entropy, suppress, victim_beliefs
from bdguard.models import BackdoorModel
from bdguard.progress import progress_bar
from bdguard.training.trainer import batch_indices, steps_per_epoch

PROGRESS_EVERY = 20  # reading a loss syncs the device: show it every this many steps


@dataclass
class Beneficiary:
    model: BackdoorModel
    optimizer: torch.optim.Optimizer
    augment: Augment | None
    batch_size: int
    num_classes: int
    params: VabParams
    runtime: Runtime

    def views(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independently augmented float views of a uint8 batch."""
        if self.augment is None:
            x = self.runtime.inputs(images)
            return x, x
        first = self.runtime.inputs(self.augment(images, generator))
        return first, self.runtime.inputs(self.augment(images, generator))

    def mixed_loss(
        self, x1: torch.Tensor, x2: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AttentionMix over both views (partners drawn among all 2B images), then the soft cross-entropy of the
        mixed batch, fed in two halves. Returns the loss and the mixed-region share."""
        half = x1.shape[0]
        with torch.no_grad(), self.runtime.autocast():
            features = torch.cat([self.model.features(x1), self.model.features(x2)])
        attention = attention_map(features, tuple(x1.shape[-2:]), self.params.upsample)
        partner = torch.randperm(2 * half, generator=generator, device=x1.device)
        mixed, mixed_targets, region = attention_mix(
            torch.cat([x1, x2]), attention, targets, self.params.mix_threshold, partner
        )
        mixed = self.runtime.layout(mixed)
        with self.runtime.autocast():
            logits = torch.cat([self.model(mixed[:half]), self.model(mixed[half:])])
        return soft_cross_entropy(logits, mixed_targets), region

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def stage_a_epoch(
    ben: Beneficiary, data: ImageSet, credible: torch.Tensor, generator: torch.Generator, label: str
) -> dict[str, float | None]:
    """One pass over C in batches of B, each sample as two views, mixed, with its given label."""
    ben.model.train()
    n = credible.numel()
    if n == 0:
        return {"loss": None, "mixed_region": None}
    loss_sum = torch.zeros((), device=ben.runtime.device)
    region_sum = torch.zeros((), device=ben.runtime.device)
    steps = steps_per_epoch(n, ben.batch_size)
    with progress_bar(label, steps, ben.runtime.quiet) as bar:
        for step, batch in enumerate(batch_indices(n, ben.batch_size, generator)):
            chosen = credible[batch]
            x1, x2 = ben.views(data.images[chosen], generator)
            onehot = F.one_hot(data.labels[chosen], ben.num_classes).float()
            loss, region = ben.mixed_loss(x1, x2, torch.cat([onehot, onehot]), generator)
            ben.step(loss)
            loss_sum += loss.detach()
            region_sum += region
            _show(bar, step, loss_sum)
    return {"loss": float(loss_sum) / steps, "mixed_region": float(region_sum) / steps}


@dataclass
class StageBResult:
    metrics: dict[str, float | None]
    suppression_weight: torch.Tensor  # (N,) 1 - q_label of the credible samples seen (NaN elsewhere)
    pseudo_label: torch.Tensor  # (N,) the pseudo-label of the suspicious samples seen (-1 elsewhere)


def stage_b_epoch(
    ben: Beneficiary,
    victim: torch.nn.Module,
    data: ImageSet,
    credible: torch.Tensor,
    suspicious: torch.Tensor,
    alpha: float,
    generator: torch.Generator,
    label: str,
) -> StageBResult:
    """floor(|C| / B) + 1 iterations over C (batch B) in lock-step with S (batch B_u, so S is traversed about once);
    loss = L_mix (suppressed, AttentionMixed labelled targets) + alpha * L_u (suppressed pseudo-labels)."""
    params, runtime = ben.params, ben.runtime
    ben.model.train()
    victim.eval()
    n_c, n_s = credible.numel(), suspicious.numel()
    num_iter = n_c // ben.batch_size + 1
    labelled = cycle_batches(n_c, ben.batch_size, generator) if n_c else None
    unlabelled = cycle_batches(n_s, max(1, n_s // num_iter), generator) if n_s else None
    weight = torch.full((len(data),), float("nan"), device=runtime.device)
    pseudo = torch.full((len(data),), -1, dtype=torch.long, device=runtime.device)
    sums = torch.zeros(3, device=runtime.device)  # loss, L_mix, L_u
    region_sum = torch.zeros((), device=runtime.device)
    with progress_bar(label, num_iter, runtime.quiet) as bar:
        for step in range(num_iter):
            loss = torch.zeros((), device=runtime.device)
            if unlabelled is not None:
                chosen_u = suspicious[next(unlabelled)]
                images_u = data.images[chosen_u]
                u1, u2 = ben.views(images_u, generator)
                with torch.no_grad(), runtime.autocast():
                    probs = [F.softmax(ben.model(u).float(), dim=1) for u in (u1, u2)]
                    beliefs_u = victim_beliefs(victim(runtime.inputs(images_u)), params.temperature)
                guessed = pseudo_targets(*probs)
                targets_u = suppress(guessed, beliefs_u)
                with runtime.autocast():
                    logits_u = torch.cat([ben.model(u1), ben.model(u2)])
                loss_u = soft_cross_entropy(logits_u, torch.cat([targets_u, targets_u]))
                loss = loss + alpha * loss_u
                sums[2] += loss_u.detach()
                pseudo[chosen_u] = guessed.argmax(dim=1)
            if labelled is not None:
                chosen = credible[next(labelled)]
                images = data.images[chosen]
                x1, x2 = ben.views(images, generator)
                with torch.no_grad(), runtime.autocast():
                    beliefs = victim_beliefs(victim(runtime.inputs(images)), params.temperature)
                targets = suppress(F.one_hot(data.labels[chosen], ben.num_classes).float(), beliefs)
                loss_mix, region = ben.mixed_loss(x1, x2, torch.cat([targets, targets]), generator)
                loss = loss + loss_mix
                sums[1] += loss_mix.detach()
                region_sum += region
                weight[chosen] = targets.sum(dim=1)  # one-hot minus beliefs, clipped: 1 - q_label at the label
            ben.step(loss)
            sums[0] += loss.detach()
            _show(bar, step, sums[0])
    means = (sums / num_iter).tolist()
    metrics = {
        "loss": means[0],
        "loss_mix": means[1] if n_c else None,
        "loss_u": means[2] if n_s else None,
        "mixed_region": float(region_sum) / num_iter if n_c else None,
    }
    return StageBResult(metrics, weight, pseudo)


def _show(bar, step: int, loss_sum: torch.Tensor) -> None:
    if step % PROGRESS_EVERY == 0:
        bar.update(1, loss=float(loss_sum) / (step + 1))
    else:
        bar.update(1)
