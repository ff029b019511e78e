"""The label rule of bdguard's default split (docs/methods/vab.md, "The label rule"): find the label(s) an attack
poisoned and keep the Victim's flags inside them only.

The Victim flags whole easy clean classes along with the poison, since it learns them as fast as a trigger. What a
dirty-label attack leaves, and an easy class does not, is *content from many classes under one label*: a poisoned
sample shows its source class. So a check model learns the content from the credible set (the Victim's unflagged
side, drawn class-balanced so that the classes the Victim took almost whole are learned from their remaining
samples), once, right after the Victim's warm-up; for each label, its *diverse contradictions* are the flagged samples
it puts in another class than their label, less those of the single most common other class (the one class an easy
class is confused with). A label whose flagged samples are contradicted that way often enough is attacked.

The check model never sees a flagged sample, and once found the attacked labels are fixed: the Beneficiary's
agreement, which residual poison can turn, plays no part. No label stands out under an all-to-all attack (each
label's poison comes from one class) or a clean-label one (its poison shows the target's content): the rule then
falls back to the Victim's global split. With `check_flags`, the samples of an attacked label that the check model
puts in another class are suspicious too, which catches poison the Victim's entropy missed; "diverse" leaves out
those it puts in the label's look-alike (the class its clean samples are most often mistaken for), which are mostly
clean.

Inside an attacked label the Victim's global threshold flags the label's typical clean samples too (the Victim,
trained mostly on that label's poison, is as sure of them); the default (`within` "otsu") takes instead the low side
of the cut that best splits the label's own log-entropy in two, the poison's (with check flags among the Victim's
flags).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bdguard.data.augment import Augment
from bdguard.data.base import DataBundle, ImageSet
from bdguard.defenses.vab.victim import victim_logits
from bdguard.progress import log, progress_bar
from bdguard.training.config import TrainConfig
from bdguard.training.factory import new_model
from bdguard.training.runtime import Runtime, batch_indices, epoch_generator, steps_per_epoch
from bdguard.training.schedule import lr_factor, make_optimizer
from bdguard.training.trainer import make_augment


@dataclass(frozen=True)
class LabelRule:
    share: float  # of a label's flagged samples that must be diverse contradictions
    min_share: float  # ... and at least this share of the training set (never fewer than MIN_COUNT)
    # samples of an attacked label that the check model contradicts are suspicious too: "all" of them, "diverse" (all
    # but those it puts in the label's look-alike) or "off"
    check_flags: str
    # inside an attacked label: "global", the Victim's flags (the round's tau on the whole set's normalised entropy);
    # "otsu", the low side of the cut that best splits the label's own log-entropy in two (its clean samples, of
    # which the Victim is sure too, sit above it), with check flags only among the Victim's flags
    within: str
    # a sample of an attacked label that the check model puts in its label stays credible, whatever the Victim says
    holds: bool


MIN_COUNT = 10  # diverse contradictions a label needs at the least, whatever the set's size


def class_balanced(labels: torch.Tensor, index: torch.Tensor, num_classes: int, generator: torch.Generator):
    """`index.numel()` samples of `index` drawn with replacement, each label equally likely."""
    counts = torch.bincount(labels[index], minlength=num_classes).float()
    weights = (1.0 / counts.clamp_min(1.0))[labels[index]]
    drawn = torch.multinomial(weights, index.numel(), replacement=True, generator=generator)
    return index[drawn]


def train_check_model(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    data: ImageSet,
    credible: torch.Tensor,
    epochs: int,
    augment: Augment | None,
    generator: torch.Generator,
    runtime: Runtime,
    num_classes: int,
) -> None:
    """`epochs` epochs of cross-entropy on class-balanced draws from the credible set, the lr following
    `config.schedule` over all of them (cosine: a short run that ends in a settled model). Every rank trains the
    same model on the same batches: it is small and trained once."""
    steps = steps_per_epoch(credible.numel(), config.batch_size)
    model.train()
    with progress_bar("V&B label check", epochs * steps, runtime.quiet) as bar:
        for epoch in range(epochs):
            drawn = class_balanced(data.labels, credible, num_classes, generator)
            for step, batch in enumerate(batch_indices(drawn.numel(), config.batch_size, generator)):
                chosen = drawn[batch]
                images = data.images[chosen] if augment is None else augment(data.images[chosen], generator)
                with runtime.autocast():
                    loss = F.cross_entropy(model(runtime.inputs(images)), data.labels[chosen])
                runtime.step(optimizer, loss, config.lr * lr_factor(config, (epoch * steps + step) / (epochs * steps)))
                bar.update(1)


def diverse_contradictions(
    labels: torch.Tensor, flagged: torch.Tensor, predicted: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label: the flagged samples the check model puts in another class, less those of the most common other
    class; and the flagged samples. Both int64 (K,)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=labels.device)
    chosen = flagged.nonzero().flatten()
    ones = torch.ones(chosen.numel(), dtype=torch.long, device=labels.device)
    confusion.index_put_((labels[chosen], predicted[chosen]), ones, accumulate=True)
    flagged_per_label = confusion.sum(dim=1)
    confusion.fill_diagonal_(0)
    return confusion.sum(dim=1) - confusion.max(dim=1).values, flagged_per_label


def attacked_labels(
    labels: torch.Tensor, flagged: torch.Tensor, predicted: torch.Tensor, num_classes: int, rule: LabelRule
) -> torch.Tensor:
    """bool (K,): the labels whose flagged samples are diverse contradictions at least `rule.share` of the time and
    at least max(MIN_COUNT, `rule.min_share` of the set) in number."""
    diverse, flagged_per_label = diverse_contradictions(labels, flagged, predicted, num_classes)
    least = max(MIN_COUNT, math.ceil(rule.min_share * labels.numel()))
    return (diverse >= least) & (diverse >= rule.share * flagged_per_label)


def otsu_low(values: torch.Tensor) -> torch.Tensor:
    """bool mask of the values below Otsu's cut: the cut between sorted values that maximises the between-group
    variance n_low * n_high * (mean_low - mean_high)^2."""
    if values.numel() < 2:
        return torch.zeros_like(values, dtype=torch.bool)
    ordered = values.double().sort().values
    n = ordered.numel()
    low_sum = ordered.cumsum(0)[:-1]
    n_low = torch.arange(1, n, dtype=torch.float64, device=values.device)
    mean_low = low_sum / n_low
    mean_high = (ordered.sum() - low_sum) / (n - n_low)
    best = int((n_low * (n - n_low) * (mean_low - mean_high) ** 2).argmax())
    return values.double() <= ordered[best]


def look_alikes(
    labels: torch.Tensor, predicted: torch.Tensor, credible: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """int64 (K,): for each label, the other class the check model most often puts its credible samples in."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=labels.device)
    chosen = credible.nonzero().flatten()
    ones = torch.ones(chosen.numel(), dtype=torch.long, device=labels.device)
    confusion.index_put_((labels[chosen], predicted[chosen]), ones, accumulate=True)
    confusion.fill_diagonal_(-1)
    return confusion.argmax(dim=1)


def disputed(
    labels: torch.Tensor, predicted: torch.Tensor, credible: torch.Tensor, num_classes: int, diverse: bool
) -> torch.Tensor:
    """bool (N,): the samples the check model puts in another class than their label; with `diverse`, not those it
    puts in their label's look-alike class (learned from the `credible` samples), which are mostly clean."""
    mask = predicted != labels
    if diverse:
        mask &= predicted != look_alikes(labels, predicted, credible, num_classes)[labels]
    return mask


def label_split(
    flagged: torch.Tensor,
    labels: torch.Tensor,
    predicted: torch.Tensor,
    attacked: torch.Tensor,
    rule: LabelRule,
    entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The suspicious mask: the Victim's flags inside the attacked labels (with `check_flags`, and their samples
    the check model contradicts); the Victim's flags as they are when no label is attacked. With `rule.within`
    "otsu", inside each attacked label the low side of Otsu's cut on log `entropy` (the Victim's raw scores) instead
    of the Victim's flags, and check flags only among those. With `rule.holds`, the samples the check model puts in
    their label are never suspicious."""
    if not attacked.any():
        return flagged
    inside = attacked[labels]
    contradicted = disputed(labels, predicted, ~flagged, attacked.numel(), rule.check_flags == "diverse")
    checked = rule.check_flags != "off"
    if rule.within == "otsu":
        if entropy is None:
            raise ValueError("the otsu split inside a label needs the Victim's entropy")
        low = torch.zeros_like(flagged)
        for label in attacked.nonzero().flatten().tolist():
            members = (labels == label).nonzero().flatten()
            low[members] = otsu_low(entropy[members].clamp_min(1e-12).log())
        suspicious = inside & (low | (flagged & contradicted)) if checked else inside & low
    else:
        suspicious = inside & (flagged | contradicted) if checked else inside & flagged
    return suspicious & (predicted != labels) if rule.holds else suspicious


class LabelGuard:
    """The label rule's state over a run: the check model's class for every training sample (from the credible set
    of the split it was trained after) and the labels found attacked."""

    def __init__(self, rule: LabelRule, num_classes: int, classes: list[str] | tuple[str, ...]) -> None:
        self.rule, self.classes = rule, list(classes)
        self.predicted: torch.Tensor | None = None
        self.attacked = torch.zeros(num_classes, dtype=torch.bool)

    def train_check(
        self,
        bundle: DataBundle,
        data: ImageSet,
        flagged: torch.Tensor,
        train: TrainConfig,
        epochs: int,
        runtime: Runtime,
    ) -> None:
        """Train the check model (the run's architecture, optimiser and augmentation, seed + 2) on the credible side
        of `flagged` and keep its class for every sample."""
        credible = (~flagged).nonzero().flatten()
        if credible.numel() == 0:  # nothing to learn the content from: the Victim's global split stands
            log("V&B label rule: the Victim flagged every sample; no check model, the global split stands")
            return
        config = dataclasses.replace(train, seed=train.seed + 2, schedule="cosine")
        model = runtime.prepare(new_model(bundle, config, runtime.device))
        optimizer = make_optimizer(model.parameters(), config)
        generator = epoch_generator(config.seed, 0, runtime.device)
        augment = make_augment(config, bundle.flip)
        args = (epochs, augment, generator, runtime, bundle.num_classes)
        train_check_model(model, optimizer, config, data, credible, *args)
        self.predicted = victim_logits(model, data.images, config.eval_batch_size, runtime).argmax(dim=1)

    def split(self, flagged: torch.Tensor, labels: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """The suspicious mask for the Victim's flags `flagged` (and its raw scores `entropy`). Until some label
        stands out the rule is asked again at every round (the Victim may single out a small poison late); once
        found, the attacked labels are fixed: late in a run the Victim grows sure of hard classes too, whose flags
        the check model also disputes."""
        if self.predicted is None:
            return flagged
        if not self.attacked.any():
            self.attacked = attacked_labels(labels, flagged, self.predicted, len(self.classes), self.rule).cpu()
            if self.attacked.any():
                found = self.attacked.nonzero().flatten().tolist()
                names = ", ".join(f"{i} ({self.classes[i]})" for i in found)
                log(f"V&B label rule: attacked label(s) {names}; the other labels' flags go back to the credible set")
            else:
                log("V&B label rule: no label stands out; the Victim's global split stands")
        attacked = self.attacked.to(labels.device)
        return label_split(flagged, labels, self.predicted, attacked, self.rule, entropy)

    def state_dict(self) -> dict[str, Any]:
        return {"predicted": self.predicted, "attacked": self.attacked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.predicted, self.attacked = state["predicted"], state["attacked"].cpu()
