"""TrojanNN (Liu et al., 2018): a patch trigger whose pixels are optimised to excite chosen neurons of a clean
model; poisoning is then as in BadNets (stamp the patch, relabel to the target; all2one or all2all).

`prepare` trains (or loads) the clean model (`surrogate_model`, `surrogate_epochs`, shared with lc, see
`bdguard.attacks.surrogate.train_surrogate`), picks the `neurons` channels of its last convolutional feature map
(`model.features`) with the largest total outgoing weight magnitude to the classifier (`fc.weight.abs().sum(0)`,
TrojanNN's neuron selection), and optimises the trigger: the pixel values of a `patch_size` square at `position`
(the mask is fixed to that square), started from seeded uniform noise, are changed by Adam (`lr` on the [0, 1] pixel
scale, so the step does not depend on the model's gradient scale) for `steps` steps to maximise the chosen channels'
mean activation over `images` clean training images drawn with the attack seed, clamped to [0, 1] after every step,
and finally rounded to uint8. The trigger (a BadNets-style full-frame pattern plus mask) is cached under
`<cache_dir>/attacks/`, keyed by the clean model's weights, the optimisation images and every parameter that changes
it, so poisoning again does not re-optimise.

Out of scope: the full TrojanNN also reverse-engineers training data from the model and retrains the model on it
with the trigger (model hijacking); here the optimised trigger poisons a training set like any other attack.

Defaults are the literature's (TrojanNN's square trigger in a corner, here 3x3 bottom-right; 1 neuron; 200
steps at lr 0.1); the V&B reference code has no Trojan attack, so there is no `reference` preset. The manifest
records the chosen neurons and their mean activation on the optimisation images: without a trigger, with the
initial noise trigger and with the optimised one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bdguard.attacks.base import Attack, AttackContext
from bdguard.attacks.pixels import patch_origin
from bdguard.attacks.registry import ATTACKS
from bdguard.attacks.surrogate import check_surrogate, train_surrogate
from bdguard.config import check_range
from bdguard.data.augment import to_float
from bdguard.data.base import DataBundle
from bdguard.errors import BdguardError
from bdguard.hashing import digest
from bdguard.io import atomic_path
from bdguard.models import BackdoorModel
from bdguard.progress import log, progress_bar

FORMAT = "bdguard-trojan-trigger-v1"


@dataclass
class TrojanParams:
    patch_size: int = 3
    position: str = "bottom-right"  # a corner name, "center", or "row,col" of the patch's top-left pixel
    margin: int = 0
    neurons: int = 1  # feature channels to excite
    steps: int = 200
    lr: float = 0.1
    images: int = 128  # clean training images the trigger is optimised on
    surrogate_model: str = "resnet20"
    surrogate_epochs: int = 10

    def __post_init__(self) -> None:
        check_range("trojan.patch_size", self.patch_size, 1)
        check_range("trojan.margin", self.margin, 0)
        check_range("trojan.neurons", self.neurons, 1)
        check_range("trojan.steps", self.steps, 1)
        if not self.lr > 0:
            raise BdguardError(f"trojan.lr must be > 0, got {self.lr}")
        check_range("trojan.images", self.images, 1)
        check_surrogate("trojan", self.surrogate_model, self.surrogate_epochs)


def select_neurons(model: BackdoorModel, count: int) -> list[int]:
    """The `count` feature channels with the largest total |weight| into the head, strongest first."""
    return model.head_weight().detach().abs().sum(0).topk(count).indices.tolist()


def paste_patch(images: torch.Tensor, patch: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Float images with `patch` written at (row, col); differentiable in `patch`."""
    out = images.clone()
    out[:, :, row : row + patch.shape[1], col : col + patch.shape[2]] = patch
    return out


def activation(model: BackdoorModel, images: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """Mean activation of `channels` of the last feature map over images and positions."""
    return model.features(images)[:, channels].mean()


def optimise_trigger(
    model: BackdoorModel,
    images: torch.Tensor,
    channels: list[int],
    origin: tuple[int, int],
    init: torch.Tensor,
    steps: int,
    lr: float,
    quiet: bool = True,
) -> torch.Tensor:
    """Gradient ascent (Adam) on the patch `init` (C, h, w) in [0, 1] to excite `channels`; returns uint8."""
    patch = init.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([patch], lr=lr)
    with progress_bar("trojan trigger", steps, quiet) as bar:
        for _ in range(steps):
            loss = -activation(model, paste_patch(images, patch, *origin), channels)
            # the gradient of the patch only: the model's parameters collect no .grad
            (patch.grad,) = torch.autograd.grad(loss, patch)
            optimiser.step()
            with torch.no_grad():
                patch.clamp_(0, 1)
            bar.update(1)
    return patch.detach().mul(255).round().to(torch.uint8)


@ATTACKS.register
class Trojan(Attack):
    name = "trojan"
    Params = TrojanParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c, h, w = self.image_shape
        size = self.params.patch_size
        self.origin = patch_origin(self.params.position, self.params.margin, (size, size), (h, w), "trojan")
        row, col = self.origin
        self.mask = torch.zeros((c, h, w), dtype=torch.bool)
        self.mask[:, row : row + size, col : col + size] = True
        self.pattern: torch.Tensor | None = None
        self.details: dict[str, Any] = {}

    def prepare(self, bundle: DataBundle, context: AttackContext) -> None:
        """Train or load the clean model, then optimise the trigger on it (or load the cached trigger)."""
        self._check_shape(bundle.train)
        p = self.params
        model, surrogate = train_surrogate(bundle, context, p.surrogate_model, p.surrogate_epochs)
        if p.neurons > model.feature_channels:
            raise BdguardError(
                f"trojan.neurons must be in [1, {model.feature_channels}] for {p.surrogate_model}, got {p.neurons}"
            )
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.config.seed)
        pick = torch.randperm(len(bundle.train), generator=generator)[: p.images].to(bundle.train.device)
        images = bundle.train.images[pick]
        init = torch.rand((self.image_shape[0], p.patch_size, p.patch_size), generator=generator)
        settings = {k: v for k, v in vars(p).items() if not k.startswith("surrogate_")}
        key = digest(FORMAT, settings, self.config.seed, list(self.image_shape), *model.state_dict().values(), images)
        path = Path(context.cache_dir) / "attacks" / f"trojan-{key}.safetensors"
        cached = _load_trigger(path, tuple(init.shape))
        if cached is None:
            x = to_float(images.to(device))
            channels = select_neurons(model, p.neurons)
            if not context.quiet:
                log(f"optimising the trojan trigger for neurons {channels} ({p.steps} steps, cached in {path})")
            patch = optimise_trigger(model, x, channels, self.origin, init.to(device), p.steps, p.lr, context.quiet)
            with torch.no_grad():
                means = {
                    "clean": activation(model, x, channels),
                    "initial_trigger": activation(model, paste_patch(x, init.to(device), *self.origin), channels),
                    "optimised_trigger": activation(model, paste_patch(x, to_float(patch), *self.origin), channels),
                }
            details = {"neurons": channels, "activation": {k: float(v) for k, v in means.items()}}
            _save_trigger(path, patch.cpu(), details)
        else:
            patch, details = cached
        self.pattern = torch.zeros(self.image_shape, dtype=torch.uint8)
        row, col = self.origin
        self.pattern[:, row : row + p.patch_size, col : col + p.patch_size] = patch.cpu()
        self.details = {**details, "surrogate": surrogate, "trigger_file": str(path)}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            raise BdguardError("attack trojan needs prepare(bundle, context) first: its trigger is learnt on a model")
        return torch.where(self.mask.to(images.device), self.pattern.to(images.device), images)

    def manifest(self, poison_mask: torch.Tensor, cross_mask: torch.Tensor) -> dict[str, Any]:
        return {**super().manifest(poison_mask, cross_mask), "trojan": dict(self.details)}


def _save_trigger(path: Path, patch: torch.Tensor, details: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        save_file({"patch": patch.contiguous()}, tmp, metadata={"format": FORMAT, "details": json.dumps(details)})


def _load_trigger(path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The cached patch and its details, or None when absent or unreadable (then it is optimised again)."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            patch = f.get_tensor("patch")
        details = json.loads(meta["details"])
    except (SafetensorError, OSError, KeyError, ValueError):
        log(f"ignoring the unreadable cached trigger {path}")
        return None
    if meta.get("format") != FORMAT or patch.dtype != torch.uint8 or tuple(patch.shape) != shape:
        return None
    return patch, details
