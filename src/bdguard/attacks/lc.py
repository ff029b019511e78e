"""Label-consistent backdoor (LC, Turner et al., 2019): adversarially perturbed target-class images plus a corner
patch, labels kept.

Poisoning (clean-label: `rate` is the fraction of the target class, all2one only): round(rate x target-class
count) target-class images, drawn with the attack seed, are made hard to classify by untargeted PGD against a
clean surrogate model (ascend its cross-entropy on the true label; L-inf ball of radius `eps` on the [0, 1] pixel
scale, projected and clipped to [0, 1] after every signed-gradient step of `step_size`; the start is the clean
image; whole batches at a time), written back to uint8, and then the patch is stamped on them. Test images (the
ASR set) get the patch only, as in Turner et al. and the V&B reference.

The PGD result is *rounded* to uint8, unlike the truncation every other attack here uses: with eps x 255 an
integer (16/255 -> 16 levels) rounding keeps every pixel within eps of the original, where truncation could step
one level outside the ball. The reduced-amplitude patch (below) is truncated like the other triggers.

Patch: `pattern`, `patch_size`, `position` and `margin` as in BadNets, plus `pattern="turner"`, the exact
trigger of Turner et al.'s code (the 3x3 checkerboard with its top-left cell flipped to black). `corners=4`
stamps the patch in all four corners (`position` then unused): as is at the right-hand corners, mirrored left to
right at the left-hand ones, as Turner et al.'s "all-corners" trigger. `amplitude` 1 pastes the patch;
amplitude a < 1 is Turner et al.'s reduced-amplitude trigger, which adds instead of pasting: `x + a (2p - 255)`,
i.e. +a x 255 on white cells and -a x 255 on black ones, clipped to [0, 255].

Surrogate: a clean `surrogate_model` trained for `surrogate_epochs` on `bundle.train` (which must be the clean
set) by `prepare`, with the TrainConfig defaults otherwise (seed 0, whatever the attack seed, so lc and trojan
share one cached model per data set and settings). Turner et al. perturbed against an adversarially trained
model, which gives perturbations that transfer better; this uses a standard one.

Defaults (literature): eps = 16/255 (Turner et al.'s larger L-inf budget, the V&B "Cl-16"), a 3x3 checkerboard in
the bottom-right corner at amplitude 1, step_size = 2.5 eps / steps (Madry et al.'s rule: the walk can cross the
ball and back). steps = 10 is a CPU-friendly default; Turner et al. ran longer PGD than that.
`preset=reference` is the V&B reference code (docs/methods/lc.md 3): the 2x2 multi-coloured patch at rows/columns 4-5,
pasted, eps = 16/255 (the reference loads Turner et al.'s released inf_16 images instead of computing them).
`preset=turner` is Turner et al.'s own bottom-right 3x3 trigger.

The manifest records the surrogate (model, epochs, clean test accuracy) and the PGD evidence: the share of the
selected images the surrogate misclassifies and their mean loss, before and after the perturbation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from bdguard.attacks.base import Attack, AttackContext
from bdguard.attacks.pixels import patch_origin, pattern_patch, truncate_to_uint8
from bdguard.attacks.registry import ATTACKS
from bdguard.attacks.surrogate import check_surrogate, train_surrogate
from bdguard.config import check_range
from bdguard.data.augment import to_float
from bdguard.data.base import DataBundle, ImageSet, PoisonedSet
from bdguard.errors import BdguardError
from bdguard.models import BackdoorModel
from bdguard.progress import progress_bar

# Turner et al.'s bottom-right trigger (poison_attack.py), +1 white, -1 black, rows top to bottom.
TURNER_PATCH = ((-1, -1, 1), (-1, 1, -1), (1, -1, 1))
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# Images per PGD batch: bounds the activations kept for the backward pass.
PGD_BATCH = 256


@dataclass
class LCParams:
    eps: float = 16 / 255  # L-inf radius on the [0, 1] scale
    steps: int = 10
    step_size: float | None = None  # None: 2.5 eps / steps
    patch_size: int = 3
    position: str = "bottom-right"  # a corner name, "center", or "row,col" of the patch's top-left pixel
    margin: int = 0
    pattern: Literal["checkerboard", "white", "black", "random", "reference", "turner"] = "checkerboard"
    corners: int = 1  # 1: at `position`; 4: all four corners
    amplitude: float = 1.0
    surrogate_model: str = "resnet20"
    surrogate_epochs: int = 10

    def __post_init__(self) -> None:
        check_range("lc.eps", self.eps, 0.0, 1.0)
        check_range("lc.steps", self.steps, 1)
        if self.step_size is not None:
            check_range("lc.step_size", self.step_size, 0.0, 1.0)
        check_range("lc.patch_size", self.patch_size, 1)
        check_range("lc.margin", self.margin, 0)
        if self.corners not in (1, 4):
            raise BdguardError(f"lc.corners must be 1 or 4, got {self.corners}")
        if not 0 < self.amplitude <= 1:
            raise BdguardError(f"lc.amplitude must be in (0, 1], got {self.amplitude}")
        check_surrogate("lc", self.surrogate_model, self.surrogate_epochs)

    @property
    def pgd_step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


def pgd(
    model: BackdoorModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    quiet: bool = True,
) -> torch.Tensor:
    """Untargeted L-inf PGD on uint8 images (N, C, H, W) with their true labels; returns rounded uint8 images."""
    device = next(model.parameters()).device
    out = torch.empty_like(images)
    with progress_bar("lc pgd", -(-images.shape[0] // PGD_BATCH), quiet) as bar:
        for start in range(0, images.shape[0], PGD_BATCH):
            clean = to_float(images[start : start + PGD_BATCH].to(device))
            y = labels[start : start + PGD_BATCH].to(device)
            low, high = (clean - eps).clamp_(0, 1), (clean + eps).clamp_(0, 1)
            x = clean
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                # bfloat16 on CUDA as in training; the sign of the gradient survives the lower precision
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = F.cross_entropy(model(x), y, reduction="sum")
                # grad of the input only: the model's parameters collect no .grad
                (grad,) = torch.autograd.grad(loss, x)
                x = torch.minimum(torch.maximum(x.detach() + step * grad.sign(), low), high)
            out[start : start + PGD_BATCH] = x.mul_(255).round_().to(torch.uint8).to(images.device)
            bar.update(1)
    return out


@torch.no_grad()
def loss_and_error(model: BackdoorModel, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and error rate of `model` on uint8 images."""
    device = next(model.parameters()).device
    loss = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device)
    for start in range(0, images.shape[0], PGD_BATCH):
        logits = model(to_float(images[start : start + PGD_BATCH].to(device))).float()
        y = labels[start : start + PGD_BATCH].to(device)
        loss += F.cross_entropy(logits, y, reduction="sum")
        wrong += (logits.argmax(1) != y).sum()
    return float(loss) / images.shape[0], float(wrong) / images.shape[0]


def corner_trigger(
    image_shape: tuple[int, int, int], patch: torch.Tensor, position: str, margin: int, corners: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-frame uint8 pattern and boolean mask: `patch` at `position`, or in all four corners (mirrored on
    the left-hand ones)."""
    c, h, w = image_shape
    ph, pw = patch.shape[1:]
    if corners == 1:
        placements = [(patch_origin(position, margin, (ph, pw), (h, w), "lc"), patch)]
    else:
        if 2 * (ph + margin) > h or 2 * (pw + margin) > w:
            raise BdguardError(
                f"lc.corners=4 needs four {ph}x{pw} patches (margin {margin}) apart in the {h}x{w} image"
            )
        placements = [
            (
                patch_origin(corner, margin, (ph, pw), (h, w), "lc"),
                patch if corner.endswith("right") else patch.flip(-1),
            )
            for corner in CORNERS
        ]
    pattern = torch.zeros((c, h, w), dtype=torch.uint8)
    mask = torch.zeros((c, h, w), dtype=torch.bool)
    for (row, col), piece in placements:
        pattern[:, row : row + ph, col : col + pw] = piece
        mask[:, row : row + ph, col : col + pw] = True
    return pattern, mask


@ATTACKS.register
class LabelConsistent(Attack):
    name = "lc"
    Params = LCParams
    presets = {
        "reference": {"pattern": "reference", "patch_size": 2, "position": "4,4", "eps": 16 / 255},
        "turner": {"pattern": "turner", "patch_size": 3, "position": "bottom-right", "eps": 16 / 255},
    }
    clean_label = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        c = self.image_shape[0]
        if p.pattern == "turner":
            if p.patch_size != 3:
                raise BdguardError("lc pattern 'turner' is Turner et al.'s 3x3 trigger: set patch_size=3")
            patch = (torch.tensor(TURNER_PATCH) > 0).to(torch.uint8).mul(255).expand(c, 3, 3).clone()
        else:
            patch = pattern_patch(p.pattern, p.patch_size, c, self.config.seed, "lc")
        self.pattern, self.mask = corner_trigger(self.image_shape, patch, p.position, p.margin, p.corners)
        self.surrogate: BackdoorModel | None = None
        self.surrogate_info: dict[str, Any] = {}
        self.quiet = True  # prepare() takes the caller's choice

    def prepare(self, bundle: DataBundle, context: AttackContext) -> None:
        """Train (or load from `context.cache_dir`) the clean surrogate that PGD attacks."""
        self._check_shape(bundle.train)
        p = self.params
        self.quiet = context.quiet
        self.surrogate, self.surrogate_info = train_surrogate(bundle, context, p.surrogate_model, p.surrogate_epochs)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The patch alone (test images; poisoned training images get it on top of the perturbation)."""
        pattern, mask = self.pattern.to(images.device), self.mask.to(images.device)
        if self.params.amplitude == 1:
            return torch.where(mask, pattern, images)
        signed = pattern.float().mul_(2).sub_(255)  # +255 on white cells, -255 on black ones
        return torch.where(mask, truncate_to_uint8(images.float() + self.params.amplitude * signed), images)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PGD against the surrogate, without the patch."""
        if self.surrogate is None:
            raise BdguardError("attack lc needs prepare(bundle, context) first: it perturbs against a clean surrogate")
        p = self.params
        return pgd(self.surrogate, images, labels, p.eps, p.pgd_step, p.steps, self.quiet)

    def poison(self, train: ImageSet) -> PoisonedSet:
        self._check_shape(train)
        mask = self.select(train.labels)
        chosen, labels = train.images[mask], train.labels[mask]
        perturbed = self.perturb(chosen, labels)
        images = train.images.clone()
        images[mask] = self.apply(perturbed)
        cross = torch.zeros_like(mask)
        manifest = self.manifest(mask, cross)
        manifest["surrogate"] = dict(self.surrogate_info)
        manifest["pgd"] = {"step_size": self.params.pgd_step, "rounding": "nearest"}
        if chosen.shape[0]:
            for name, batch in (("clean", chosen), ("perturbed", perturbed)):
                loss, error = loss_and_error(self.surrogate, batch, labels)
                manifest["pgd"][f"{name}_loss"] = loss
                manifest["pgd"][f"{name}_misclassified"] = error
        return PoisonedSet(ImageSet(images, train.labels.clone(), train.files), mask, cross, train.labels, manifest)
