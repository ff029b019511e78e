"""The Beneficiary's two kinds of epoch: stage A (docs/methods/vab.md 3, AttentionMix on the credible set C) and stage B
(docs/methods/vab.md 4, C labelled and S unlabelled, both kinds of target suppressed by the Victim), and the label check
that takes a flagged sample back into C.

As in the reference code, the no-grad attention pass runs in train mode and, with two views, mixed batches go
through the network in two halves, so BatchNorm sees the same batches as there.

Under torchrun every rank draws the whole batch and its augmentation from the shared generator and trains on its
share (`bdguard.distributed`); AttentionMix then pairs images within a rank's share, from that rank's own generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bdguard import distributed
from bdguard.data.augment import Augment
from bdguard.data.base import ImageSet
from bdguard.defenses.vab.attention_mix import attention_map, attention_mix
from bdguard.defenses.vab.config import VabParams
from bdguard.defenses.vab.suppression import (
    of_labels,
    pseudo_targets,
    soft_cross_entropy,
    suppress,
    unlearning_loss,
    victim_beliefs,
)
from bdguard.models import BackdoorModel
from bdguard.progress import progress_bar
from bdguard.training.runtime import Runtime, batch_indices, cycle_batches, steps_per_epoch

PROGRESS_EVERY = 20  # reading a loss syncs the device: show it every this many steps

LearningRate = Callable[[float], float]  # the lr at a point of the current epoch (0: its start, 1: its end)


@dataclass
class Beneficiary:
    model: BackdoorModel
    optimizer: torch.optim.Optimizer
    augment: Augment | None
    batch_size: int
    num_classes: int
    params: VabParams
    runtime: Runtime
    network: torch.nn.Module = field(init=False)  # what trains: `model`, in DistributedDataParallel under torchrun

    def __post_init__(self) -> None:
        self.network = distributed.wrap(self.model, self.runtime.device)

    def views(self, images: torch.Tensor, generator: torch.Generator, part: slice = slice(None)) -> list[torch.Tensor]:
        """`params.views` independently augmented float views of a uint8 batch, each cut to `part` (this rank's
        share) after the whole batch is augmented, so every rank draws the same numbers."""
        if self.augment is None:
            return [self.runtime.inputs(images[part])] * self.params.views
        return [self.runtime.inputs(self.augment(images, generator)[part]) for _ in range(self.params.views)]

    def mix(
        self, views: list[torch.Tensor], targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """AttentionMix of the views' images (concatenated) and their `targets` (one row per image of every view).
        With `mix_share` 1 (the reference) every image is mixed, partners drawn among all images of all views, their
        attention taken view by view; with a smaller share a random subset of that size is mixed among itself and
        the rest trains as it is; with 0 nothing is mixed and no attention computed. Returns the images (in the
        run's layout), their targets and the mixed-pixel share."""
        images = torch.cat(views)
        n = images.shape[0]
        share = self.params.mix_share
        region = torch.zeros((), device=images.device)
        if share >= 1.0:  # the reference: every image, attention taken view by view
            with torch.no_grad(), self.runtime.autocast():
                features = torch.cat([self.model.features(x) for x in views])
            attention = attention_map(features, tuple(images.shape[-2:]), self.params.upsample)
            partner = torch.randperm(n, generator=generator, device=images.device)
            images, targets, region = attention_mix(images, attention, targets, self.params.mix_threshold, partner)
        elif round(share * n) > 0:  # a random subset, mixed among itself
            chosen = torch.randperm(n, generator=generator, device=images.device)[: round(share * n)]
            with torch.no_grad(), self.runtime.autocast():
                features = self.model.features(self.runtime.layout(images[chosen]))
            attention = attention_map(features, tuple(images.shape[-2:]), self.params.upsample)
            partner = torch.randperm(chosen.numel(), generator=generator, device=images.device)
            mixed, mixed_targets, region = attention_mix(
                images[chosen], attention, targets[chosen], self.params.mix_threshold, partner
            )
            images, targets = images.index_copy(0, chosen, mixed), targets.index_copy(0, chosen, mixed_targets)
            region = region * chosen.numel() / n
        return self.runtime.layout(images), targets, region

    def mixed_loss(
        self, views: list[torch.Tensor], targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`mix`, then the soft cross-entropy of the batch, fed one view's worth at a time (as the reference feeds
        BatchNorm). Returns the loss and the mixed-pixel share."""
        images, targets, region = self.mix(views, targets, generator)
        with self.runtime.autocast():
            logits = torch.cat([self.network(part) for part in images.split(views[0].shape[0])])
        return soft_cross_entropy(logits, targets), region

    def step(self, loss: torch.Tensor, lr: float) -> None:
        self.runtime.step(self.optimizer, loss, lr)


def stage_a_epoch(
    ben: Beneficiary,
    data: ImageSet,
    credible: torch.Tensor,
    generator: torch.Generator,
    label: str,
    lr: LearningRate,
    victim_logits: torch.Tensor | None = None,
    suppressed: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """One pass over C in batches of B, each sample in `views` views, mixed, with its given label; with
    `victim_logits` (N, K), the label suppressed by the Victim's beliefs as stage B does it (on the labels
    `suppressed`, bool (K,), or all)."""
    ben.model.train()
    n = credible.numel()
    if n == 0:
        return {"loss": None, "mixed_region": None}
    own = distributed.own_generator(generator)
    sums = torch.zeros(2, device=ben.runtime.device)  # loss, mixed region
    steps = steps_per_epoch(n, ben.batch_size)
    with progress_bar(label, steps, ben.runtime.quiet) as bar:
        for step, batch in enumerate(batch_indices(n, ben.batch_size, generator)):
            part, factor = distributed.split(batch.numel())
            chosen = credible[batch]
            views = ben.views(data.images[chosen], generator, part)
            chosen = chosen[part]
            targets = F.one_hot(data.labels[chosen], ben.num_classes).float()
            if victim_logits is not None:
                beliefs = victim_beliefs(victim_logits[chosen], ben.params.temperature)
                targets = suppress(targets, of_labels(beliefs, data.labels[chosen], suppressed))
            loss, region = ben.mixed_loss(views, targets.repeat(len(views), 1), own)
            ben.step(loss * factor, lr(step / steps))
            sums[0] += loss.detach()
            sums[1] += region
            _advance(bar, step, sums[0])
    means = (distributed.all_sum(sums) / (steps * distributed.world())).tolist()
    return {"loss": means[0], "mixed_region": means[1]}


@dataclass
class StageBResult:
    metrics: dict[str, float | None]
    suppression_weight: torch.Tensor  # (N,) 1 - q_label of the credible samples seen (NaN elsewhere)
    pseudo_label: torch.Tensor  # (N,) the pseudo-label of the suspicious samples seen (-1 elsewhere)


def stage_b_epoch(
    ben: Beneficiary,
    victim_logits: torch.Tensor,
    data: ImageSet,
    credible: torch.Tensor,
    suspicious: torch.Tensor,
    alpha: float,
    generator: torch.Generator,
    label: str,
    lr: LearningRate,
    suppressed: torch.Tensor | None = None,
) -> StageBResult:
    """floor(|C| / B) + 1 iterations over C (batch B) in lock-step with S (batch B_u, so S is traversed about once);
    loss = L_mix (suppressed, AttentionMixed labelled targets) + alpha * L_u (suppressed pseudo-labels).

    `victim_logits` (N, K) are the Victim's logits of the last scoring round: the unaugmented view the reference
    feeds the Victim in every step, computed once (the Victim does not train during a Beneficiary epoch). The
    labelled targets are suppressed on the labels `suppressed` (bool (K,); None: all), the pseudo-labels always.
    Samples taken back into C are suppressed like the rest: among them are the poisoned images of the target class,
    whose label is right and whose trigger only the suppression keeps from being learned (tested)."""
    params, runtime = ben.params, ben.runtime
    ben.model.train()
    n_c, n_s = credible.numel(), suspicious.numel()
    num_iter = n_c // ben.batch_size + 1
    own = distributed.own_generator(generator)
    labelled = cycle_batches(n_c, ben.batch_size, generator) if n_c else None
    # |S| / steps a batch, as the reference, but never one sample alone: a network whose last map is 1x1 gives
    # BatchNorm nothing else to normalise it with
    unlabelled = cycle_batches(n_s, max(min(n_s, 2), n_s // num_iter), generator) if n_s else None
    weight = torch.full((len(data),), float("nan"), device=runtime.device)
    pseudo = torch.full((len(data),), -1, dtype=torch.long, device=runtime.device)
    sums = torch.zeros(4, device=runtime.device)  # loss, L_mix, L_u, mixed region
    with progress_bar(label, num_iter, runtime.quiet) as bar:
        for step in range(num_iter):
            loss = torch.zeros((), device=runtime.device)
            if unlabelled is not None:
                batch = next(unlabelled)
                part, factor = distributed.split(batch.numel())
                chosen_u = suspicious[batch]
                logits_u, guessed = _unlabelled_forward(ben, data.images[chosen_u], generator, part)
                chosen_u = chosen_u[part]
                targets_u = suppress(guessed, victim_beliefs(victim_logits[chosen_u], params.temperature))
                loss_u = soft_cross_entropy(logits_u, targets_u.repeat(params.views, 1))
                loss = loss + alpha * loss_u * factor
                sums[2] += loss_u.detach()
                pseudo[chosen_u] = guessed.argmax(dim=1)
            if labelled is not None:
                batch = next(labelled)
                part, factor = distributed.split(batch.numel())
                chosen = credible[batch]
                views = ben.views(data.images[chosen], generator, part)
                chosen = chosen[part]
                beliefs = victim_beliefs(victim_logits[chosen], params.temperature)
                beliefs = of_labels(beliefs, data.labels[chosen], suppressed)
                targets = suppress(F.one_hot(data.labels[chosen], ben.num_classes).float(), beliefs)
                loss_mix, region = ben.mixed_loss(views, targets.repeat(len(views), 1), own)
                loss = loss + loss_mix * factor
                sums[1] += loss_mix.detach()
                sums[3] += region
                weight[chosen] = targets.sum(dim=1)  # one-hot minus beliefs, clipped: 1 - q_label at the label
            ben.step(loss, lr(step / num_iter))
            sums[0] += loss.detach()
            _advance(bar, step, sums[0])
    means = (distributed.all_sum(sums) / (num_iter * distributed.world())).tolist()
    metrics = {
        "loss": means[0],
        "loss_mix": means[1] if n_c else None,
        "loss_u": means[2] if n_s else None,
        "mixed_region": means[3] if n_c else None,
    }
    return StageBResult(metrics, *_seen_by_any_rank(weight, pseudo))


def unlearn_epoch(
    ben: Beneficiary,
    data: ImageSet,
    credible: torch.Tensor,
    suspicious: torch.Tensor,
    weight: float,
    generator: torch.Generator,
    label: str,
    lr: LearningRate,
    relabel: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Stage B with `stage_b=unlearn` or `relabel` (docs/methods/vab.md 4): one pass over C in batches of B, each
    joined by a batch of the samples `suspicious` (about |S| / steps of them, so they are traversed about once) in
    the same forward pass, so BatchNorm sees the two mixed as in the training set; loss = L_C (cross-entropy with the
    given labels, AttentionMix as in stage A) + weight * (|S batch| / |C batch|) * L_S, so that `weight` weighs a
    suspicious sample against a credible one (at 10 % poison, weighing the two batch means alike lost the target
    class: docs/methods/vab.md 4). L_S: with `relabel` (N,) the cross-entropy towards
    those classes, else the unlearning loss of the given label (mean -log(1 - p_label)): either way the trigger that
    residual poison in C teaches is tied to something other than the attack's target."""
    ben.model.train()
    n_c, n_s = credible.numel(), suspicious.numel()
    if n_c == 0:
        return {"loss": None, "loss_mix": None, "loss_unlearn": None, "mixed_region": None}
    own = distributed.own_generator(generator)
    steps = steps_per_epoch(n_c, ben.batch_size)
    unlabelled = cycle_batches(n_s, max(1, -(-n_s // steps)), generator) if n_s else None
    sums = torch.zeros(4, device=ben.runtime.device)  # loss, L_C, L_unlearn, mixed region
    with progress_bar(label, steps, ben.runtime.quiet) as bar:
        for step, batch in enumerate(batch_indices(n_c, ben.batch_size, generator)):
            part, factor = distributed.split(batch.numel())
            chosen = credible[batch]
            views = ben.views(data.images[chosen], generator, part)
            targets = F.one_hot(data.labels[chosen[part]], ben.num_classes).float().repeat(len(views), 1)
            images, targets, region = ben.mix(views, targets, own)
            unlearned = torch.empty(0, dtype=torch.long, device=images.device)
            if unlabelled is not None:
                batch_s = next(unlabelled)
                part_s, factor_s = distributed.split(batch_s.numel())
                chosen_s = suspicious[batch_s]
                views_s = ben.views(data.images[chosen_s], generator, part_s)
                source = data.labels if relabel is None else relabel
                unlearned = source[chosen_s[part_s]].repeat(len(views_s))
                images = torch.cat([images, ben.runtime.layout(torch.cat(views_s))])
            with ben.runtime.autocast():
                logits = ben.network(images)
            logits_c, logits_s = logits.split([targets.shape[0], unlearned.numel()])
            loss_c = soft_cross_entropy(logits_c, targets)
            loss = loss_c * factor
            if unlearned.numel():
                if relabel is None:
                    loss_s = unlearning_loss(logits_s, unlearned)
                else:
                    loss_s = F.cross_entropy(logits_s.float(), unlearned)
                # `weight` per sample against a credible one: L_S's mean counts as its batch's share of C's
                share = batch_s.numel() / batch.numel()
                loss = loss + weight * share * loss_s * factor_s
                sums[2] += loss_s.detach()
            ben.step(loss, lr(step / steps))
            sums[0] += loss.detach()
            sums[1] += loss_c.detach()
            sums[3] += region
            _advance(bar, step, sums[0])
    means = (distributed.all_sum(sums) / (steps * distributed.world())).tolist()
    return {
        "loss": means[0],
        "loss_mix": means[1],
        "loss_unlearn": means[2] if n_s else None,
        "mixed_region": means[3],
    }


def _seen_by_any_rank(weight: torch.Tensor, pseudo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank saw its share of the samples: the per-sample diagnostics of all of them (one process: as they are)."""
    if distributed.world() == 1:
        return weight, pseudo
    seen = distributed.all_sum((~weight.isnan()).float())
    total = distributed.all_sum(weight.nan_to_num(0.0))
    return torch.where(seen > 0, total / seen.clamp(min=1), float("nan")), distributed.all_max(pseudo)


def _unlabelled_forward(
    ben: Beneficiary, images: torch.Tensor, generator: torch.Generator, part: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """The views' logits (with grad, view after view) and the hard pseudo-label of the mean of their softmax. With
    `reuse_logits` the pseudo-labels come from these very logits (the train-mode logits the reference computes
    twice); without, from a separate no-grad pass first, as the reference does. Only this rank's `part`."""
    views = ben.views(images, generator, part)
    if not ben.params.reuse_logits:
        with torch.no_grad(), ben.runtime.autocast():
            probs = [F.softmax(ben.model(u).float(), dim=1) for u in views]
    with ben.runtime.autocast():
        logits = torch.cat([ben.network(u) for u in views])
    if ben.params.reuse_logits:
        probs = list(F.softmax(logits.detach().float(), dim=1).split(views[0].shape[0]))
    return logits, pseudo_targets(*probs)


@torch.no_grad()
def label_agreement(
    model: torch.nn.Module, data: ImageSet, index: torch.Tensor, batch_size: int, runtime: Runtime, confidence: float
) -> torch.Tensor:
    """For the samples `index`: is their *given* label the network's prediction, with at least `confidence` softmax
    probability (eval mode, unaugmented)? A clean sample of an easy class that the Victim flagged passes; a
    relabelled poisoned sample does not while the network has not learned its trigger. Under torchrun each rank
    checks its part (with the main rank's BatchNorm statistics) and all get every answer."""
    distributed.sync_buffers(model)
    was_training = model.training
    model.eval()
    index = index[distributed.part_of(index.numel())]
    agree = torch.zeros(index.numel(), dtype=torch.bool, device=index.device)
    for start in range(0, index.numel(), batch_size):
        chosen = index[start : start + batch_size]
        with runtime.autocast():
            probs = F.softmax(model(runtime.inputs(data.images[chosen])).float(), dim=1)
        labels = data.labels[chosen]
        sure = probs.gather(1, labels[:, None]).squeeze(1) >= confidence
        agree[start : start + batch_size] = (probs.argmax(dim=1) == labels) & sure
    model.train(was_training)
    return distributed.gather(agree)


def confirmed_labels(labels: torch.Tensor, agree: torch.Tensor, share: float) -> torch.Tensor:
    """Per sample: does the Beneficiary confirm at least `share` of the flagged samples that carry its label?

    Meant to keep the label a poison-label attack relabels to (flagged mostly for its poison, which the Beneficiary
    disputes) out of what goes back. Off by default (share 0): on Fashion-MNIST it also kept back the trousers, which
    the Victim flags almost whole (1,616 of 1,740), so that the Beneficiary, having seen only the rest, confirmed too
    few of them to pass; without it they come back one by one and teach it the class (docs/methods/vab.md)."""
    counts = torch.bincount(labels)
    confirmed = torch.bincount(labels, weights=agree.float(), minlength=counts.numel())
    return (confirmed >= share * counts)[labels]


def _advance(bar, step: int, loss_sum: torch.Tensor) -> None:
    if step % PROGRESS_EVERY == 0:
        bar.update(1, loss=float(loss_sum) / (step + 1))
    else:
        bar.update(1)
