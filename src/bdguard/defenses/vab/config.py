"""V&B's settings: every hyperparameter of docs/methods/vab.md section 6, the levers of bdguard's default, and presets.

The Beneficiary's architecture, optimiser (lr, momentum, weight decay), batch size and epoch budget come from the
run's `train` section. Two ways of running it:

- the default is built to keep the model close to undefended training at the budgets bdguard is run at: the
  Victim's flags count only inside the label(s) a check model finds attacked, no AttentionMix, the Beneficiary
  follows the run's own lr schedule and sees each credible sample once per epoch, stage B unlearns the suspicious
  samples' label instead of suppressing by the Victim's beliefs, and the Victim is updated every `victim_every`
  epochs (docs/methods/vab.md gives each difference from the reference and the measurement behind it);
- `preset=paper` is the reference code's method and schedule (V&B's own step schedule, two views, the Victim after
  every 5th epoch in stage A and every epoch in stage B of a 200-epoch run), rescaled to any `--epochs` by shares
  of the run (schedule.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bdguard.config import check_range
from bdguard.defenses.vab.labels import LabelRule
from bdguard.errors import BdguardError
from bdguard.models import MODELS

# the reference code's values of the settings where bdguard's default differs from it
REFERENCE = {
    "victim_model": "resnet18",
    "lr_schedule": "vab",
    "views": 2,
    "reuse_logits": False,
    "evaluate_victim": "every",
    "reference_epochs": 200,
    "victim_every": 5,
    "victim_every_b": 1,
    "mix_share": 1.0,
    "split_rule": "global",
    "victim_min_steps": 0,
    "stage_b": "suppress",
}


MIN_VICTIM_BATCH = 16


@dataclass(frozen=True)
class Preset:
    epochs: int  # the Beneficiary budget (--epochs) the preset was made for
    params: dict[str, Any]
    note: str


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        200,
        REFERENCE,
        "the reference method and schedule on GPU: --model resnet18 --epochs 200 (lr 0.1, batch 128, ResNet-18 Victim)",
    ),
    "cpu": Preset(
        30,
        {**REFERENCE, "victim_model": "same"},
        "the reference method rescaled for a CPU: --epochs 30, a small model (e.g. --model small-cnn), Victim alike",
    ),
    # 31 Victim steps per epoch: the trigger is learned in the first epoch, the classes not yet by heart
    "smoke": Preset(
        4,
        {**REFERENCE, "victim_model": "same", "victim_batch_size": 64},
        "the reference method in the end-to-end test: --dataset synthetic --model small-cnn --epochs 4 --batch-size 64",
    ),
}


@dataclass
class VictimParams:
    """The Victim and its entropy split: what the defense and the `vab` detector share."""

    victim_model: str | None = "same"  # None or "same": the Beneficiary's architecture (train.model)
    victim_lr: float = 1e-3  # Adam, constant
    victim_weight_decay: float = 5e-4  # coupled L2, as torch.optim.Adam does it
    victim_batch_size: int = 128
    # a Victim epoch takes at least this many steps (a smaller batch on a small set, never under 16): the trigger is
    # learned in steps, and 39 steps of 128 (5,000 images) left a resnet20 Victim at chance; 0: the batch as it is
    victim_min_steps: int = 100
    ema: float = 0.75  # weight of the current entropy evaluation in the smoothed history
    warm_up: int = 3  # one Victim epoch on all data, then warm_up - 1 filtered rounds before the Beneficiary starts
    tau_warm: tuple[float, ...] = (0.6, 0.2)  # threshold of warm-up scoring rounds 1, 2, ... (the last one repeats)
    tau: float = 0.2  # threshold of every later scoring round, on min-max-normalised entropy
    # labels: the Victim's flags count only inside the labels found attacked (labels.py); global: all of them
    split_rule: Literal["labels", "global"] = "labels"
    check_epochs: int = 2  # epochs of the label rule's check model on the credible set, class-balanced
    label_share: float = 0.3  # a label is attacked when this share of its flagged samples are diverse contradictions
    label_min_share: float = 0.003  # ... and they are at least this share of the training set (and at least 10)
    # samples of an attacked label that the check model puts in another class are suspicious: all of them, all but
    # those it puts in the label's look-alike class (diverse), or none (off)
    check_flags: Literal["off", "all", "diverse"] = "all"
    label_within: Literal["global", "otsu"] = "otsu"  # inside an attacked label: Otsu's cut, or the Victim's flags
    # a sample of an attacked label that the check model puts in its label stays credible (off: it cost 10-13 points
    # of TPR, the poison made of the target class's own images, and gained nothing once stage B weighed per sample)
    check_holds: bool = False

    def __post_init__(self) -> None:
        if self.victim_model not in (None, "same"):
            MODELS.get(self.victim_model)
        check_range("vab.victim_lr", self.victim_lr, 0.0)
        check_range("vab.victim_weight_decay", self.victim_weight_decay, 0.0)
        check_range("vab.victim_batch_size", self.victim_batch_size, 1)
        check_range("vab.victim_min_steps", self.victim_min_steps, 0)
        if not 0.0 < self.ema <= 1.0:
            raise BdguardError(f"vab.ema must be in (0, 1], got {self.ema}")
        check_range("vab.warm_up", self.warm_up, 1)
        if not self.tau_warm:
            raise BdguardError("vab.tau_warm needs at least one threshold")
        for i, value in enumerate(self.tau_warm):
            check_range(f"vab.tau_warm[{i}]", value, 0.0, 1.0)
        check_range("vab.tau", self.tau, 0.0, 1.0)
        if self.split_rule not in ("labels", "global"):
            raise BdguardError(f"vab.split_rule must be labels or global, got {self.split_rule!r}")
        check_range("vab.check_epochs", self.check_epochs, 1)
        check_range("vab.label_share", self.label_share, 0.0, 1.0)
        check_range("vab.label_min_share", self.label_min_share, 0.0, 1.0)
        if self.check_flags not in ("off", "all", "diverse"):
            raise BdguardError(f"vab.check_flags must be off, all or diverse, got {self.check_flags!r}")
        if self.label_within not in ("global", "otsu"):
            raise BdguardError(f"vab.label_within must be global or otsu, got {self.label_within!r}")

    def label_rule(self) -> LabelRule:
        return LabelRule(self.label_share, self.label_min_share, self.check_flags, self.label_within, self.check_holds)

    def victim_batch(self, samples: int) -> int:
        """The Victim's batch size on a set of `samples`: `victim_batch_size`, smaller where an epoch would take
        fewer than `victim_min_steps` steps."""
        if self.victim_min_steps == 0:
            return self.victim_batch_size
        floor = min(MIN_VICTIM_BATCH, self.victim_batch_size)
        return max(floor, min(self.victim_batch_size, samples // self.victim_min_steps))

    def victim_architecture(self, beneficiary: str) -> str:
        return beneficiary if self.victim_model in (None, "same") else self.victim_model


@dataclass
class VabParams(VictimParams):
    preset: str | None = None  # a name in PRESETS; explicitly given settings override the preset's
    reference_epochs: int | None = None  # victim_every* count epochs of a run this long; None: of this run
    victim_every: int = 2  # stage A: Victim update every this many epochs (of a reference_epochs run)
    victim_every_b: int = 2  # stage B: likewise
    stage_a_fraction: float = 0.5  # stage A (AttentionMix on C) takes this share of the epochs, stage B the rest
    lr_schedule: Literal["run", "vab"] = "run"  # run: the run's train.schedule per step; vab: V&B's step milestones
    milestones: tuple[float, ...] = (0.25, 0.5, 0.75)  # lr_schedule=vab: lr x train.gamma after these shares
    alpha1: float = 0.1  # weight of the unlabelled loss in stage B before alpha_switch
    alpha2: float = 0.5  # ... and from alpha_switch on
    alpha_switch: float = 0.75  # share of the run after which alpha2 replaces alpha1
    temperature: float = 3.0  # the Victim's logits are divided by this before the softmax of the suppression
    suppress_stage_a: bool = False  # suppress the credible targets by the Victim in stage A too (the reference: B only)
    # stage B: semi-supervised with the Victim's beliefs suppressed (the reference); or C with its labels and the
    # suspicious samples the label rule's check model puts in another class either unlearned (their given label
    # pushed down) or relabelled (the check model's class learned); both only when the rule found an attacked label,
    # else stage B is the reference's
    stage_b: Literal["suppress", "unlearn", "relabel"] = "unlearn"
    # stage_b=unlearn or relabel: weight of a suspicious sample's loss against a credible sample's (the first version
    # weighed S's batch mean as much as C's, about 9 times per sample at 10 % poison, and lost the target class)
    unlearn_weight: float = 1.0
    # ... on the suspicious samples the check model puts in another class: any (all) or any but the label's
    # look-alike (diverse: a clean target-class image in S is most often disputed as its look-alike)
    unlearn_among: Literal["all", "diverse"] = "all"
    # whose credible targets are suppressed: all labels (the reference), or only those the label rule found attacked
    # (all when it found none); measured worse on Blended (docs/methods/vab.md 4)
    suppress_labels: Literal["all", "attacked"] = "all"
    mix_threshold: float = 0.1  # AttentionMix mixes where the normalised attention is at least this
    mix_share: float = 0.0  # the share of each batch that AttentionMix mixes (the reference: all of it)
    upsample: Literal["nearest", "bilinear"] = "nearest"  # attention map to image size (nearest: the code)
    views: int = 1  # augmented views of each sample per step (the reference: 2, so every sample counts twice)
    refine: bool = False  # a flagged sample whose given label the Beneficiary already predicts goes back to C
    refine_confidence: float = 0.0  # ... as its top class, with at least this softmax probability (eval mode)
    refine_label_share: float = 0.0  # ... and only from labels whose flagged samples it confirms at least this often
    refine_until: float = 0.2  # ... during this share of the epochs; later what went back stays, nothing new does
    reuse_logits: bool = True  # stage B's pseudo-labels from the unlabelled loss's own forward pass
    evaluate_victim: Literal["every", "key"] = "key"  # the Victim's BA/ASR after every epoch, or the last only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None and self.preset not in PRESETS:
            raise BdguardError(f"defense vab has no preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        if self.reference_epochs is not None:
            check_range("vab.reference_epochs", self.reference_epochs, 1)
        check_range("vab.victim_every", self.victim_every, 1)
        check_range("vab.victim_every_b", self.victim_every_b, 1)
        check_range("vab.stage_a_fraction", self.stage_a_fraction, 0.0, 1.0)
        for i, value in enumerate(self.milestones):
            check_range(f"vab.milestones[{i}]", value, 0.0, 1.0)
        check_range("vab.alpha1", self.alpha1, 0.0)
        check_range("vab.alpha2", self.alpha2, 0.0)
        check_range("vab.alpha_switch", self.alpha_switch, 0.0, 1.0)
        if not self.temperature > 0.0:
            raise BdguardError(f"vab.temperature must be > 0, got {self.temperature}")
        if self.stage_b not in ("suppress", "unlearn", "relabel"):
            raise BdguardError(f"vab.stage_b must be suppress, unlearn or relabel, got {self.stage_b!r}")
        check_range("vab.unlearn_weight", self.unlearn_weight, 0.0)
        if self.unlearn_among not in ("all", "diverse"):
            raise BdguardError(f"vab.unlearn_among must be all or diverse, got {self.unlearn_among!r}")
        if self.suppress_labels not in ("all", "attacked"):
            raise BdguardError(f"vab.suppress_labels must be all or attacked, got {self.suppress_labels!r}")
        check_range("vab.mix_threshold", self.mix_threshold, 0.0, 1.0)
        if self.views not in (1, 2):
            raise BdguardError(f"vab.views must be 1 or 2, got {self.views}")
        check_range("vab.refine_confidence", self.refine_confidence, 0.0, 1.0)
        check_range("vab.refine_label_share", self.refine_label_share, 0.0, 1.0)
        check_range("vab.refine_until", self.refine_until, 0.0, 1.0)
        check_range("vab.mix_share", self.mix_share, 0.0, 1.0)
