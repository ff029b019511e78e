"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer the smallest trigger that sends images to each
label, flag the label whose trigger is abnormally small, and unlearn that trigger (docs/methods/neural-cleanse.md).

Per candidate label y a mask m = tanh(a)/2 + 0.5 (H x W, shared by the channels) and a pattern
Δ = tanh(b)/2 + 0.5 minimise CE(f((1 - m)·x + m·Δ), y) + λ_y·|m|_1 with Adam (lr 0.1, betas 0.5/0.9) and NC's λ
schedule. The labels are independent problems, so they are solved together: one (L, H, W) mask tensor, one λ per
label, and every step forwards the same probe batch stamped with all L triggers. One step is one Adam update on
one seeded batch of `batch_size` probe images (NC's step is a pass over all its images, so its λ schedule reacts
per pass; here it reacts per batch, with `patience` consecutive batches).

Detection: anomaly index |norm - median| / (1.4826·MAD) over the optimised labels' mask norms; labels below the
median with an index above `anomaly_threshold` (2) are flagged, and the flagged label with the smallest norm is
the target; with none flagged the smallest-norm label is used and `fallback` says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from bdguard.attacks.pixels import mask_blend
from bdguard.config import check_range
from bdguard.data.augment import to_float
from bdguard.data.base import ImageSet
from bdguard.defenses.base import DefenseResult, Figure, PostTrainingDefense, RepairJob
from bdguard.defenses.common import fine_tune, trigger_success
from bdguard.defenses.registry import DEFENSES
from bdguard.errors import BdguardError
from bdguard.io import json_safe
from bdguard.models.base import BackdoorModel
from bdguard.progress import log, progress_bar
from bdguard.training.metrics import predict
from bdguard.training.runtime import autocast

TRIGGER_CAPTION = "Neural Cleanse: the reversed mask and pattern"
MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimate of the standard deviation of normal data
COST_DOWN_POWER = 1.5  # NC lowers λ by cost_multiplier ** 1.5 and raises it by cost_multiplier
EARLY_STOP_PATIENCE = 5  # a label stops once its best norm has not improved for this many x patience steps


@dataclass
class NcParams:
    """Neural Cleanse's settings; defaults are NC's, except `steps` (300 one-batch steps fit a CPU; use 1000 on
    a GPU) and `labels="topk"`, which spends the full budget only on the `topk` labels with the smallest masks
    after a first pass over all labels with a fifth of the steps (for many classes on a CPU)."""

    prefix: ClassVar[str] = "nc."  # how error messages name the settings

    steps: int = 300
    lr: float = 0.1
    batch_size: int = 32
    patience: int = 5
    cost_init: float = 1e-3  # the first non-zero λ, set once the reversed ASR held for `patience` steps at λ = 0
    cost_multiplier: float = 2.0
    asr_threshold: float = 0.99
    early_stop: bool = True
    labels: Literal["all", "topk"] = "all"
    topk: int = 5
    anomaly_threshold: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        name = self.prefix
        check_range(f"{name}steps", self.steps, 1)
        _check_positive(f"{name}lr", self.lr)
        check_range(f"{name}batch_size", self.batch_size, 1)
        check_range(f"{name}patience", self.patience, 1)
        _check_positive(f"{name}cost_init", self.cost_init)
        if not self.cost_multiplier > 1.0:
            raise BdguardError(f"{name}cost_multiplier must be > 1, got {self.cost_multiplier}")
        if not 0.0 < self.asr_threshold <= 1.0:
            raise BdguardError(f"{name}asr_threshold must be in (0, 1], got {self.asr_threshold}")
        # the median absolute deviation of fewer than three norms says nothing about outliers
        check_range(f"{name}topk", self.topk, 3)
        check_range(f"{name}anomaly_threshold", self.anomaly_threshold, 0.0)


def _check_positive(name: str, value: float) -> None:
    if not value > 0.0:
        raise BdguardError(f"{name} must be > 0, got {value}")


def stamp_images(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """`mask_blend` on uint8 images (N, C, H, W) with one mask (H, W) and pattern (C, H, W), rounded back to uint8."""
    x = mask_blend(to_float(images), mask.to(images.device)[None], pattern.to(images.device))
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class ReversedTrigger:
    """The reverse-engineered trigger of the chosen label and the detector's figures over all labels."""

    target: int
    anomaly_index: float
    flagged: list[int]  # labels flagged as outliers, smallest norm first
    norms: list[float]  # |m|_1 per label; NaN for labels not optimised
    mask: torch.Tensor  # float (H, W) in [0, 1], on the CPU
    pattern: torch.Tensor  # float (C, H, W) in [0, 1], on the CPU
    reversed_asr: float  # probe images not predicted as the target that the stamped version sends there
    fallback: bool  # nothing was flagged: `target` is merely the smallest-norm label
    labels: list[int] = field(default_factory=list)  # the labels optimised
    reached: list[bool] = field(default_factory=list)  # per optimised label: reversed ASR >= threshold at some step
    seconds: float = 0.0

    @property
    def backdoored(self) -> bool:
        return bool(self.flagged)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp uint8 images (N, C, H, W) with the target's reversed trigger; returns uint8 images."""
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != tuple(self.pattern.shape):
            raise BdguardError(
                f"the reversed trigger stamps uint8 images of shape (N, {', '.join(map(str, self.pattern.shape))}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        return stamp_images(images, self.mask, self.pattern)

    def success(self, model: torch.nn.Module, images: torch.Tensor) -> float:
        """The share of uint8 `images` not predicted as the target that this trigger sends there (no labels
        needed); NaN when every image is already predicted as the target."""
        return trigger_success(predict(model, images), predict(model, self.apply(images)), self.target)

    def region(self, threshold: float = 0.5) -> torch.Tensor:
        """bool (H, W): where the mask exceeds `threshold` (the trigger region of Grad-CAM's focus ratio)."""
        return self.mask > threshold

    def to_json(self) -> dict[str, Any]:
        """The detector's figures, JSON-ready (a norm that was not computed is null)."""
        return json_safe(
            {
                "target": self.target,
                "backdoored": self.backdoored,
                "anomaly_index": self.anomaly_index,
                "flagged": list(self.flagged),
                "fallback": self.fallback,
                "reversed_asr": self.reversed_asr,
                "mask_l1": float(self.mask.sum()),
                "norms": self.norms,
                "labels_optimised": list(self.labels),
                "reached_threshold": list(self.reached),
                "seconds": round(self.seconds, 2),
            }
        )


# ------------------------------------------------------------------------------------------------------------------
# the batched optimisation


@dataclass
class CostSchedule:
    """NC's λ schedule for T independent problems at once (NC's visualizer.py, vectorised).

    λ starts at 0; once a problem succeeded `patience` steps in a row it becomes `init`; after that `patience`
    successes in a row multiply it by `multiplier` and `patience` failures in a row divide it by multiplier^1.5.
    """

    cost: torch.Tensor  # float (T,)
    init: float
    multiplier: float
    patience: int
    set_count: torch.Tensor = field(init=False)
    up_count: torch.Tensor = field(init=False)
    down_count: torch.Tensor = field(init=False)
    went_up: torch.Tensor = field(init=False)
    went_down: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        zeros = torch.zeros_like(self.cost, dtype=torch.long)
        self.set_count, self.up_count, self.down_count = zeros, zeros.clone(), zeros.clone()
        self.went_up = torch.zeros_like(self.cost, dtype=torch.bool)
        self.went_down = self.went_up.clone()

    def update(self, success: torch.Tensor) -> None:
        """One step's outcome per problem (bool (T,)), in NC's order of checks."""
        self.set_count = torch.where((self.cost == 0) & success, self.set_count + 1, 0)
        start = self.set_count >= self.patience
        self.cost = torch.where(start, torch.full_like(self.cost, self.init), self.cost)
        self.went_up &= ~start
        self.went_down &= ~start
        self.up_count = torch.where(success, torch.where(start, 0, self.up_count) + 1, 0)
        self.down_count = torch.where(success, 0, torch.where(start, 0, self.down_count) + 1)

        raise_ = self.up_count >= self.patience
        lower = ~raise_ & (self.down_count >= self.patience)
        self.cost = torch.where(raise_, self.cost * self.multiplier, self.cost)
        self.cost = torch.where(lower, self.cost / self.multiplier**COST_DOWN_POWER, self.cost)
        self.up_count = torch.where(raise_, 0, self.up_count)
        self.down_count = torch.where(lower, 0, self.down_count)
        self.went_up |= raise_
        self.went_down |= lower


@dataclass
class Search:
    """The outcome of one batched reversal: per trigger the smallest-norm mask that succeeded (else the last)."""

    mask: torch.Tensor  # (T, H, W)
    pattern: torch.Tensor  # (T, C, H, W)
    norm: torch.Tensor  # (T,) |mask|_1
    reached: torch.Tensor  # bool (T,)
    steps: int


def _tanh_space(values: torch.Tensor) -> torch.Tensor:
    return torch.atanh(2.0 * values - 1.0)


def optimise_triggers(
    model: BackdoorModel, images: torch.Tensor, labels: torch.Tensor, params: NcParams, steps: int, quiet: bool = False
) -> Search:
    """Reverse one trigger per entry of `labels` (on the model's device), all together, on uint8 probe `images`."""
    device, count = images.device, labels.numel()
    generator = torch.Generator().manual_seed(params.seed)
    _, c, h, w = images.shape
    # NC starts from uniform random masks and patterns; kept off 0 and 1, where tanh space is infinite
    start_mask = torch.rand((count, h, w), generator=generator) * 0.98 + 0.01
    start_pattern = torch.rand((count, c, h, w), generator=generator) * 0.98 + 0.01
    mask_param = _tanh_space(start_mask).to(device).requires_grad_(True)
    pattern_param = _tanh_space(start_pattern).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_param, pattern_param], lr=params.lr, betas=(0.5, 0.9))
    wanted = labels.repeat_interleave(params.batch_size)

    schedule = CostSchedule(
        torch.zeros(count, device=device), params.cost_init, params.cost_multiplier, params.patience
    )
    best = Search(
        mask=torch.zeros((count, h, w), device=device),
        pattern=torch.zeros((count, c, h, w), device=device),
        norm=torch.full((count,), math.inf, device=device),
        reached=torch.zeros(count, dtype=torch.bool, device=device),
        steps=0,
    )
    stalled = torch.zeros(count, dtype=torch.long, device=device)
    done = torch.zeros(count, dtype=torch.bool, device=device)
    with _frozen(model), progress_bar("neural cleanse", steps, quiet) as bar:
        for step in range(steps):
            index = torch.randint(images.shape[0], (params.batch_size,), generator=generator).to(device)
            x = to_float(images[index])
            mask = torch.tanh(mask_param) / 2 + 0.5
            pattern = torch.tanh(pattern_param) / 2 + 0.5
            stamped = mask_blend(x[None], mask[:, None, None], pattern[:, None])  # (T, B, C, H, W)
            with autocast(device, True):
                logits = model(stamped.flatten(0, 1)).float()
            loss = F.cross_entropy(logits, wanted, reduction="none").view(count, -1).mean(1)
            success = (logits.argmax(1) == wanted).view(count, -1).float().mean(1) >= params.asr_threshold
            norm = mask.detach().sum((1, 2))
            optimizer.zero_grad(set_to_none=True)
            (loss + schedule.cost * mask.sum((1, 2))).sum().backward()
            optimizer.step()

            # the masks just evaluated are the ones before this update
            better = success & (norm < best.norm) & ~done
            best.mask[better], best.pattern[better] = mask.detach()[better], pattern.detach()[better]
            best.norm = torch.where(better, norm, best.norm)
            best.reached |= success
            if params.early_stop:  # NC stops a label once λ went both ways and its best norm stalled
                stalled = torch.where(better, 0, torch.where(best.norm.isfinite(), stalled + 1, 0))
                done |= schedule.went_up & schedule.went_down & (stalled >= EARLY_STOP_PATIENCE * params.patience)
            schedule.update(success)
            best.steps = step + 1
            if params.early_stop and bool(done.all()):
                break
            if step % 20 == 0:
                bar.update(1, best_norm=float(best.norm.min()))
            else:
                bar.update(1)

    if not (torch.isfinite(mask_param).all() and torch.isfinite(pattern_param).all()):
        raise BdguardError(
            f"Neural Cleanse diverged after {best.steps} steps: its mask or pattern is no longer a number; look at "
            f"the model (does it give finite logits?) and the learning rate (lr = {params.lr:g})"
        )
    # a trigger that never succeeded keeps its last mask, as NC does
    mask = (torch.tanh(mask_param) / 2 + 0.5).detach()
    pattern = (torch.tanh(pattern_param) / 2 + 0.5).detach()
    missed = ~best.reached
    best.mask[missed], best.pattern[missed] = mask[missed], pattern[missed]
    best.norm = torch.where(missed, mask.sum((1, 2)), best.norm)
    return best


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration: only the triggers are optimised."""
    training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(training)


# ------------------------------------------------------------------------------------------------------------------
# detection


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """|norm - median| / (1.4826·MAD) per label, over the finite norms (NaN stays NaN). A zero MAD gives 0 for
    norms at the median and inf for the others."""
    known = norms[norms.isfinite()]
    median = known.quantile(0.5)  # interpolated, as numpy's median (NC's)
    mad = MAD_CONSISTENCY * (known - median).abs().quantile(0.5)
    deviation = (norms - median).abs()
    if mad > 0:
        return deviation / mad
    return torch.where(deviation > 0, math.inf, 0.0).where(norms.isfinite(), math.nan)


def flag_labels(norms: torch.Tensor, threshold: float) -> list[int]:
    """Labels whose norm is below the median and whose anomaly index exceeds `threshold`, smallest norm first."""
    known = norms[norms.isfinite()]
    index = anomaly_indices(norms)
    below = norms.isfinite() & (norms < known.quantile(0.5)) & (index > threshold)
    flagged = below.nonzero().squeeze(1)
    return flagged[norms[flagged].argsort(stable=True)].tolist()


def candidate_labels(model: BackdoorModel, images: torch.Tensor, params: NcParams, quiet: bool) -> list[int]:
    """All labels, or for `topk` the k labels with the smallest masks after a first pass of a fifth of the steps
    (labels that reached the ASR threshold before those that did not), in increasing order."""
    num_classes = model.num_classes
    if params.labels == "all" or params.topk >= num_classes:
        return list(range(num_classes))
    labels = torch.arange(num_classes, device=images.device)
    steps = max(params.steps // 5, 4 * params.patience)
    search = optimise_triggers(model, images, labels, params, steps, quiet)
    order = sorted(range(num_classes), key=lambda y: (not bool(search.reached[y]), float(search.norm[y])))
    return sorted(order[: params.topk])


def reverse_engineer(
    model: BackdoorModel, images: torch.Tensor, params: NcParams, quiet: bool = False
) -> ReversedTrigger:
    """Neural Cleanse on uint8 probe `images` (N, C, H, W) on the model's device; no labels are needed."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise BdguardError(f"neural cleanse needs a non-empty uint8 batch (N, C, H, W), got {tuple(images.shape)}")
    began = time.perf_counter()
    labels = candidate_labels(model, images, params, quiet)
    search = optimise_triggers(model, images, torch.tensor(labels, device=images.device), params, params.steps, quiet)

    norms = torch.full((model.num_classes,), math.nan, dtype=torch.float64)
    norms[labels] = search.norm.double().cpu()
    flagged = flag_labels(norms, params.anomaly_threshold)
    target = flagged[0] if flagged else int(norms.nan_to_num(math.inf).argmin())
    chosen = labels.index(target)
    trigger = ReversedTrigger(
        target=target,
        anomaly_index=float(anomaly_indices(norms)[target]),
        flagged=flagged,
        norms=norms.tolist(),
        mask=search.mask[chosen].float().cpu(),
        pattern=search.pattern[chosen].float().cpu(),
        reversed_asr=math.nan,
        fallback=not flagged,
        labels=labels,
        reached=search.reached.cpu().tolist(),
    )
    trigger.reversed_asr = trigger.success(model, images)
    trigger.seconds = time.perf_counter() - began
    if not quiet:
        verdict = f"flagged {flagged}" if flagged else "nothing flagged"
        log(
            f"neural cleanse: {verdict}; target {target}, anomaly index {trigger.anomaly_index:.2f}, "
            f"mask |m|_1 {float(trigger.mask.sum()):.1f}, reversed ASR {trigger.reversed_asr:.3f} "
            f"({search.steps} steps, {trigger.seconds:.1f}s)"
        )
    return trigger


# ------------------------------------------------------------------------------------------------------------------
# the post-training defense


@dataclass
class NeuralCleanseParams(NcParams):
    """The defense's settings: Neural Cleanse's, then how to mitigate what it found."""

    prefix: ClassVar[str] = "neural-cleanse."

    mitigation: Literal["unlearn", "none"] = "unlearn"
    unlearn_fraction: float = 0.2  # share of probe images stamped with the reversed trigger, labels kept
    unlearn_epochs: int = 5
    unlearn_lr: float = 0.01
    unlearn_batch_size: int = 32  # NC's; a few hundred probe images give a few steps per epoch at 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(f"{self.prefix}unlearn_fraction", self.unlearn_fraction, 0.0, 1.0)
        check_range(f"{self.prefix}unlearn_epochs", self.unlearn_epochs, 1)
        check_range(f"{self.prefix}unlearn_batch_size", self.unlearn_batch_size, 1)
        _check_positive(f"{self.prefix}unlearn_lr", self.unlearn_lr)


def unlearning_set(probe: ImageSet, trigger: ReversedTrigger, fraction: float, seed: int) -> ImageSet:
    """The probe set with a seeded `fraction` of its images stamped with the reversed trigger, labels unchanged."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(probe), generator=generator)[: round(fraction * len(probe))].to(probe.device)
    images = probe.images.clone()
    images[chosen] = trigger.apply(probe.images[chosen])
    return ImageSet(images, probe.labels)


@DEFENSES.register
class NeuralCleanse(PostTrainingDefense):
    name = "neural-cleanse"
    description = "reverse-engineer a minimal trigger per label, flag the MAD outlier, unlearn its trigger"
    Params = NeuralCleanseParams

    def repair(self, job: RepairJob) -> DefenseResult:
        p = self.params
        trigger = reverse_engineer(job.model, job.probe.images, p, job.quiet)
        figures: tuple[Figure, ...] = ()
        if job.run_dir is not None:
            write_trigger_image(trigger, job.run_dir / "nc_trigger.png")
            figures = (Figure("nc_trigger.png", TRIGGER_CAPTION),)
        details: dict[str, Any] = {"trigger": trigger.to_json()}

        def result() -> DefenseResult:
            return DefenseResult(job.model, backdoor_flagged=trigger.backdoored, figures=figures, details=details)

        if p.mitigation == "none":
            return result()

        # unlearning keeps correct labels on stamped images: the model learns that the trigger means nothing. The
        # optimiser and schedule are the run's; no crops, which would move the reversed trigger off its place
        data = unlearning_set(job.probe, trigger, p.unlearn_fraction, job.seed)
        train = dataclasses.replace(job.train, batch_size=p.unlearn_batch_size, augment=False)
        unlearn = dataclasses.replace(job, probe=data, train=train)
        details["unlearning"] = fine_tune(unlearn, p.unlearn_epochs, p.unlearn_lr, job.seed)
        details["unlearned_probe_asr"] = json_safe(trigger.success(job.model, job.probe.images))
        return result()


def write_trigger_image(trigger: ReversedTrigger, path: Path) -> None:
    """nc_trigger.png: the mask, the pattern and their product m·Δ (what is pasted), with the detector's verdict."""
    # imported here: matplotlib is slow to import and only a report draws
    from bdguard.plotting import new_figure, write_figure

    pattern = trigger.pattern.permute(1, 2, 0).numpy()
    pasted = (trigger.mask[..., None] * trigger.pattern.permute(1, 2, 0)).numpy()
    panels = [("mask m", trigger.mask.numpy()), ("pattern Δ", pattern), ("m·Δ", pasted)]
    figure = new_figure(7.5, 2.9)
    for ax, (title, image) in zip(figure.subplots(1, 3), panels, strict=True):
        grey = image.ndim == 2 or image.shape[2] == 1
        ax.imshow(image.squeeze(), cmap="gray" if grey else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    verdict = f"flagged {trigger.flagged}" if trigger.flagged else "nothing flagged (smallest-norm label shown)"
    figure.suptitle(
        f"Neural Cleanse: label {trigger.target}, anomaly index {trigger.anomaly_index:.2f}, {verdict}\n"
        f"|m|_1 = {float(trigger.mask.sum()):.1f}, reversed ASR on the probe {trigger.reversed_asr:.3f}",
        fontsize=9,
    )
    write_figure(figure, path)
