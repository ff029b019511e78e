"""V&B's settings: every hyperparameter of vab.md section 10, with the reference code's defaults, and presets.

The Beneficiary's architecture, optimiser (lr, momentum, weight decay), batch size and epoch budget come from the
run's `train` section; its lr follows V&B's own step schedule (`milestones` here, factor `train.gamma`), not
`train.schedule`. The schedule is expressed in shares of the budget (and `victim_every*` in epochs of a
`reference_epochs` run), so `--epochs 30` runs the same method, rescaled, in minutes on a CPU (see schedule.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bdguard.config import check_range, coerce, from_dict, merge
from bdguard.errors import BdguardError
from bdguard.models import MODELS


@dataclass(frozen=True)
class Preset:
    epochs: int  # the Beneficiary budget (--epochs) the preset was made for
    params: dict[str, Any]
    note: str


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        200, {}, "the reference schedule on GPU: --model resnet18 --epochs 200 (lr 0.1, batch 128, ResNet-18 Victim)"
    ),
    "cpu": Preset(
        30,
        {"victim_model": "same"},
        "the rescaled schedule for a CPU: --epochs 30 with a small model (e.g. --model small-cnn), Victim alike",
    ),
    # `bdguard demo` and the `cpu` bench suite: 20,000 Fashion-MNIST images, 3 epochs. The step milestones of a long
    # run would leave the Beneficiary one epoch at full lr; here the lr drops once, for the last (stage B) epoch.
    "demo": Preset(
        3,
        {"victim_model": "same", "milestones": (0.75,)},
        "`bdguard demo`: --dataset fashion-mnist --train-size 20000 --model small-cnn --epochs 3",
    ),
    # 31 Victim steps per epoch: the trigger is learned in the first epoch, the classes not yet by heart
    "smoke": Preset(
        4,
        {"victim_model": "same", "victim_batch_size": 64},
        "the end-to-end test: --dataset synthetic --model small-cnn --epochs 4 --batch-size 64",
    ),
}


@dataclass
class VabParams:
    preset: str | None = None  # a name in PRESETS; explicitly given settings override the preset's
    victim_model: str | None = "resnet18"  # None or "same": the Beneficiary's architecture (train.model)
    victim_lr: float = 1e-3  # Adam, constant
    victim_weight_decay: float = 5e-4  # coupled L2, as torch.optim.Adam does it
    victim_batch_size: int = 128
    ema: float = 0.75  # weight of the current entropy evaluation in the smoothed history
    warm_up: int = 3  # one Victim epoch on all data, then warm_up - 1 filtered rounds before the Beneficiary starts
    tau_warm: tuple[float, ...] = (0.6, 0.2)  # threshold of warm-up scoring rounds 1, 2, ... (the last one repeats)
    tau: float = 0.2  # threshold of every later scoring round, on min-max-normalised entropy
    reference_epochs: int = 200  # the budget at which victim_every and victim_every_b hold as given
    victim_every: int = 5  # stage A: Victim update every this many epochs of a reference_epochs run
    victim_every_b: int = 1  # stage B: likewise
    stage_a_fraction: float = 0.5  # stage A (AttentionMix on C) takes this share of the epochs, stage B the rest
    milestones: tuple[float, ...] = (0.25, 0.5, 0.75)  # Beneficiary lr x train.gamma after these shares of the run
    alpha1: float = 0.1  # weight of the unlabelled loss in stage B before alpha_switch
    alpha2: float = 0.5  # ... and from alpha_switch on
    alpha_switch: float = 0.75  # share of the run after which alpha2 replaces alpha1
    temperature: float = 3.0  # the Victim's logits are divided by this before the softmax of the suppression
    mix_threshold: float = 0.1  # AttentionMix mixes where the normalised attention is at least this
    upsample: Literal["nearest", "bilinear"] = "nearest"  # attention map to image size (nearest: the code)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise BdguardError(f"vab.preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        if self.victim_model not in (None, "same"):
            MODELS.get(self.victim_model)
        check_range("vab.victim_lr", self.victim_lr, 0.0)
        check_range("vab.victim_weight_decay", self.victim_weight_decay, 0.0)
        check_range("vab.victim_batch_size", self.victim_batch_size, 1)
        if not 0.0 < self.ema <= 1.0:
            raise BdguardError(f"vab.ema must be in (0, 1], got {self.ema}")
        check_range("vab.warm_up", self.warm_up, 1)
        if not self.tau_warm:
            raise BdguardError("vab.tau_warm needs at least one threshold")
        for i, value in enumerate(self.tau_warm):
            check_range(f"vab.tau_warm[{i}]", value, 0.0, 1.0)
        check_range("vab.tau", self.tau, 0.0, 1.0)
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
        check_range("vab.mix_threshold", self.mix_threshold, 0.0, 1.0)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> VabParams:
        """Settings as given (a dict of strings from --set, or typed values) over the named preset's."""
        preset = coerce(settings.get("preset"), str | None, "vab.preset")
        if preset is not None and preset not in PRESETS:
            raise BdguardError(f"vab.preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        base = PRESETS[preset].params if preset is not None else {}
        return from_dict(cls, merge(base, settings), prefix="vab.")

    def victim_architecture(self, beneficiary: str) -> str:
        return beneficiary if self.victim_model in (None, "same") else self.victim_model
