"""Input-aware dynamic attack, IAD (Nguyen & Tran, NeurIPS 2020): a trained generator makes each image its own trigger.

Two conv encoder-decoders read the (normalised) image: the pattern net gives a pattern g(x) in [0, 1] (C channels,
`(1 + tanh) / 2`), the mask net a one-channel mask m(x) in [0, 1] (`(1 + tanh(20 z - 10)) / 2`, a steep step). The
triggered image is `x' = x + m(x) * (g(x) - x)` on the [0, 1] scale, computed on the 0..255 scale and written back to
uint8 by truncation like every attack here. (The released code divides by 2 + 1e-7 instead of 2; dropping that keeps
the mask exactly 0 where it is off, so those pixels stay unchanged instead of losing 1 to truncation.)
Architecture: the paper's CIFAR generator (`width` 32, `depth` 3): `depth` x (conv-norm-ReLU x 2, max-pool) with
widths width, 2 width, ..., a middle conv, then `depth` x (bilinear x2 upsampling, conv-norm-ReLU x 2) back to the
output channels (the last conv without ReLU); GroupNorm instead of its BatchNorm (see `_conv`). Any channel count
works; images whose sides are not multiples of 2^depth are padded (replicating the border) and the output cropped.

`prepare` trains the generator on the clean training set, as the paper does, and caches it:
1. mask pretraining (`mask_epochs`, Adam, betas (0.5, 0.9)): `lambda_norm * mean(max(0, |m|_1 / HW - mask_density))
   + lambda_div * div`, the paper's norm hinge on each image's mean mask (the released code hinges every pixel), where
   the diversity loss `div = mean(||x1 - x2|| / (||m(x1) - m(x2)|| + 1e-7))` (RMS distances over C, H, W, images on
   the normalised scale as in the released code) pairs each image with another of the batch;
2. joint training (`epochs`): the mask net is frozen; per batch (with the standard crop and flip when `augment`), the
   first floor(p_attack x B) images get their own trigger and the attacker's labels, the next floor(p_cross x B) get
   the pattern and mask of another image of the batch and keep their labels ("cross"), the rest stay clean. A fresh
   classifier (`classifier`: SGD, momentum 0.9, weight decay 5e-4, constant lr) and the pattern net (Adam, betas
   (0.5, 0.9)) minimise `CE + lambda_div * div` together, div as above between patterns (normalised) and images.
   (The released code never zeroes the generator's gradients, so they accumulate; here both are zeroed every step.)
The paper trains far longer (25 mask epochs, then hundreds of joint epochs on CIFAR-10, lr steps at 100, 200, ...);
the defaults here (5 and 10) are a CPU-sized budget, so expect a weaker trigger unless `epochs` is raised.
The generator's own classifier is then measured on the test set (clean accuracy; attack accuracy on this attack's
test set; cross accuracy: true labels kept under another image's trigger) and the numbers go into the manifest, so a
run shows whether the generator learned a working trigger. Weights and numbers are cached in
`<cache_dir>/attacks/iad-<data set>-<hash>.safetensors`, the hash covering the training data (content digest), image
shape, target, mode, seed and every parameter but `cross_ratio` (it only changes poisoning); the next run loads them
and poisons identically without retraining. An unreadable cache file is logged and replaced.

Poisoning (the V&B reference's static set, docs/methods/iad.md 3): one seeded permutation; its first round(rate x N)
samples are triggered and relabelled (target for all2one, (y + 1) mod K for all2all; `rate` is the fraction of the whole
training set), the next round(cross_ratio x rate x N) are cross samples that keep their labels and get the pattern and
mask generated from another, seeded-random training image. Test images get their own trigger.
`preset=reference` is the reference's set-up (cross_ratio 1, p_attack = p_cross = 0.1, the paper's loss weights); the
reference used the authors' precomputed CIFAR-10 arrays, which are not available, so the generator is trained here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bdguard.attacks.base import Attack, AttackContext
from bdguard.attacks.pixels import mask_blend, truncate_to_uint8
from bdguard.attacks.registry import ATTACKS
from bdguard.config import check_range
from bdguard.data.augment import to_float
from bdguard.data.base import DataBundle, ImageSet, PoisonedSet
from bdguard.errors import BdguardError
from bdguard.hashing import digest
from bdguard.io import atomic_path
from bdguard.models import MODELS
from bdguard.progress import log, progress_bar
from bdguard.training.config import TrainConfig
from bdguard.training.factory import new_model
from bdguard.training.metrics import accuracy, predict
from bdguard.training.runtime import autocast, batch_indices, epoch_generator, steps_per_epoch
from bdguard.training.schedule import make_optimizer
from bdguard.training.trainer import make_augment

CACHE_VERSION = 1  # bump when the architecture or training changes, so old cache files are not reused
HEADER_KEY = "bdguard-iad"
EPSILON = 1e-7  # the paper's epsilon in the diversity loss
CHUNK = 512  # images per generator call when triggering a whole set


@dataclass
class IADParams:
    epochs: int = 10  # joint generator + classifier epochs (the paper: hundreds)
    mask_epochs: int = 5  # mask pretraining epochs (the paper: 25)
    classifier: str = "resnet20"  # the classifier trained with the generator, then discarded
    lr_classifier: float = 0.01
    lr_generator: float = 0.01  # pattern and mask nets
    p_attack: float = 0.1  # backdoored share of each training batch
    p_cross: float = 0.1  # cross share of each training batch
    lambda_div: float = 1.0
    mask_density: float = 0.032
    lambda_norm: float = 100.0
    cross_ratio: float = 1.0  # cross samples in the poisoned set per poisoned sample
    batch_size: int = 128
    width: int = 32  # channels of the first generator stage, doubled at each further stage
    depth: int = 3  # down/up-sampling stages of the generators
    augment: bool = True  # the standard crop (padding 4) and flip while training the generator

    def __post_init__(self) -> None:
        check_range("iad.epochs", self.epochs, 1)
        check_range("iad.mask_epochs", self.mask_epochs, 1)
        for name in ("lr_classifier", "lr_generator"):
            if not getattr(self, name) > 0:
                raise BdguardError(f"iad.{name} must be > 0, got {getattr(self, name)}")
        check_range("iad.p_attack", self.p_attack, 0.0, 1.0)
        check_range("iad.p_cross", self.p_cross, 0.0, 1.0)
        check_range("iad.p_attack + iad.p_cross", self.p_attack + self.p_cross, 0.0, 1.0)
        check_range("iad.lambda_div", self.lambda_div, 0.0)
        check_range("iad.mask_density", self.mask_density, 0.0, 1.0)
        check_range("iad.lambda_norm", self.lambda_norm, 0.0)
        check_range("iad.cross_ratio", self.cross_ratio, 0.0)
        check_range("iad.batch_size", self.batch_size, 2)
        check_range("iad.width", self.width, 1)
        check_range("iad.depth", self.depth, 1, 6)
        if int(self.p_attack * self.batch_size) < 1:
            raise BdguardError(
                f"iad.p_attack x iad.batch_size must be >= 1 (backdoored images per batch), "
                f"got {self.p_attack} x {self.batch_size}"
            )


def _conv(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    # GroupNorm, not the paper's BatchNorm: only the ~20 % of each batch that gets a trigger passes through the
    # generator, and with BatchNorm its batch statistics over those few images made the trained (train-mode) trigger
    # and the one produced later (eval mode, running averages) differ badly at short budgets. Per-image normalisation
    # behaves the same in both modes and does not tie an image's trigger to the rest of its batch.
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout)]
    return [*layers, nn.ReLU()] if relu else layers


def encoder_decoder(in_channels: int, out_channels: int, width: int, depth: int) -> nn.Sequential:
    """The paper's generator body (raw outputs, before the tanh); sides must be multiples of 2^depth."""
    widths = [width * 2**i for i in range(depth)]
    layers: list[nn.Module] = []
    channels = in_channels
    for w in widths:
        layers += [*_conv(channels, w), *_conv(w, w), nn.MaxPool2d(2)]
        channels = w
    layers += _conv(channels, channels)
    for i, w in enumerate(reversed(widths)):
        last = i == depth - 1
        out = out_channels if last else widths[depth - 2 - i]
        layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), *_conv(w, w)]
        layers += _conv(w, out, relu=not last)
    return nn.Sequential(*layers)


class IADGenerator(nn.Module):
    """Pattern and mask nets on images in [0, 1]; normalises with the data set's mean and std (kept as buffers).
    No layer acts differently in train and eval mode, so the mode never matters."""

    def __init__(self, channels: int, mean: tuple[float, ...], std: tuple[float, ...], width: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.pattern_net = encoder_decoder(channels, channels, width, depth)
        self.mask_net = encoder_decoder(channels, 1, width, depth)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def _run(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        step = 2**self.depth
        z = F.pad(self.normalise(x), (0, -w % step, 0, -h % step), mode="replicate")
        return net(z)[..., :h, :w]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + torch.tanh(self._run(self.pattern_net, x))) / 2

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + torch.tanh(20 * self._run(self.mask_net, x) - 10)) / 2


@torch.no_grad()
def trigger(generator: IADGenerator, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """uint8 `images` with the pattern and mask generated from `sources` (the images themselves for a backdoor,
    other images for cross samples), in chunks on the generator's device; uint8 out, on the images' device."""
    device = generator.mean.device
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], CHUNK):
        x = images[start : start + CHUNK].to(device).float()
        source = to_float(sources[start : start + CHUNK].to(device))
        triggered = mask_blend(x, generator.mask(source), generator.pattern(source) * 255)
        out[start : start + CHUNK] = truncate_to_uint8(triggered).to(images.device)
    return out


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the tiny constant keeps the root's gradient finite when two patterns coincide
    return ((a - b).pow(2).mean((1, 2, 3)) + 1e-12).sqrt()


def diversity_loss(images: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """mean ||x1 - x2|| / (||g(x1) - g(x2)|| + eps), each image paired with the next one of the batch."""
    if images.shape[0] < 2:
        return images.new_zeros(())
    other_images, other_outputs = images.roll(1, 0), outputs.roll(1, 0)
    return (rms_distance(images, other_images) / (rms_distance(outputs, other_outputs) + EPSILON)).mean()


def train_generator(
    attack: IAD, bundle: DataBundle, context: AttackContext
) -> tuple[IADGenerator, nn.Module, dict[str, Any]]:
    """Mask pretraining, then joint pattern-net + classifier training on the clean training set (module docstring).
    Returns the generator and its classifier in eval mode, and the last epoch's training statistics."""
    p, seed, device = attack.params, attack.config.seed, context.device
    config = TrainConfig(
        model=p.classifier,
        epochs=p.epochs,
        batch_size=p.batch_size,
        lr=p.lr_classifier,
        schedule="constant",
        augment=p.augment,
        seed=seed,
    )
    classifier = new_model(bundle, config, device)  # seeds the global generators from the attack seed
    generator = attack.new_generator(bundle).to(device)
    augment = make_augment(config, bundle.flip)
    train = bundle.train.to(device)
    steps = steps_per_epoch(len(train), p.batch_size)

    def batches(epoch: int):
        rng = epoch_generator(seed, epoch, device)
        for idx in batch_indices(len(train), p.batch_size, rng):
            yield to_float(augment(train.images[idx], rng) if augment else train.images[idx]), train.labels[idx]

    optimizer_m = torch.optim.Adam(generator.mask_net.parameters(), p.lr_generator, betas=(0.5, 0.9))
    for epoch in range(1, p.mask_epochs + 1):
        sums = torch.zeros(3, device=device)
        with progress_bar(f"iad mask {epoch}/{p.mask_epochs}", steps, context.quiet) as bar:
            for x, _ in batches(epoch):
                masks = generator.mask(x)
                density = masks.mean((1, 2, 3))
                norm = F.relu(density - p.mask_density).mean()
                div = diversity_loss(generator.normalise(x), masks)
                loss = p.lambda_norm * norm + p.lambda_div * div
                optimizer_m.zero_grad(set_to_none=True)
                loss.backward()
                optimizer_m.step()
                sums += torch.stack((norm.detach(), div.detach(), density.mean().detach()))
                bar.update(1)
        norm, div, density = (sums / steps).tolist()
        log(f"iad mask epoch {epoch}/{p.mask_epochs}  norm {norm:.4f}  div {div:.3f}  density {density:.4f}")

    generator.mask_net.requires_grad_(False)
    optimizer_c = make_optimizer(classifier.parameters(), config)
    optimizer_g = torch.optim.Adam(generator.pattern_net.parameters(), p.lr_generator, betas=(0.5, 0.9))
    stats: dict[str, Any] = {}
    for epoch in range(1, p.epochs + 1):
        classifier.train()
        sums = torch.zeros(5, device=device)  # CE x n, diversity x n, right: backdoor, cross, clean
        counts = torch.zeros(3)  # backdoor, cross, clean
        with progress_bar(f"iad epoch {epoch}/{p.epochs}", steps, context.quiet) as bar:
            for x, y in batches(p.mask_epochs + epoch):
                n = x.shape[0]
                n_bd, n_cross = int(p.p_attack * n), int(p.p_cross * n)
                k = n_bd + n_cross
                # the batch is a random draw, so the next image is a random other one (its pattern makes a cross)
                sources = torch.cat((x[:n_bd], x.roll(-1, 0)[n_bd:k]))
                patterns = generator.pattern(sources)
                with torch.no_grad():
                    masks = generator.mask(sources)
                inputs = torch.cat((mask_blend(x[:k], masks, patterns), x[k:]))
                targets = torch.cat((attack.target_labels(y[:n_bd]), y[n_bd:]))
                with autocast(device, config.amp):
                    logits = classifier(inputs)
                    ce = F.cross_entropy(logits, targets)
                div = diversity_loss(generator.normalise(sources), generator.normalise(patterns))
                loss = ce + p.lambda_div * div
                optimizer_c.zero_grad(set_to_none=True)
                optimizer_g.zero_grad(set_to_none=True)
                loss.backward()
                optimizer_c.step()
                optimizer_g.step()
                right = (logits.detach().argmax(1) == targets).float()
                parts = (right[:n_bd].sum(), right[n_bd:k].sum(), right[k:].sum())
                sums += torch.stack((ce.detach() * n, div.detach() * n, *parts))
                counts += torch.tensor([n_bd, n_cross, n - k])
                bar.update(1)
        ce_sum, div_sum, *right_sums = sums.tolist()
        backdoor, cross, clean = (r / max(c, 1) for r, c in zip(right_sums, counts.tolist(), strict=True))
        stats = {
            "train_ce": ce_sum / len(train),
            "train_div": div_sum / len(train),
            "train_attack_acc": backdoor,
            "train_cross_acc": cross,
            "train_clean_acc": clean,
        }
        log(
            f"iad epoch {epoch}/{p.epochs}  CE {stats['train_ce']:.4f}  div {stats['train_div']:.3f}  "
            f"accuracy: backdoor {backdoor:.3f}  cross {cross:.3f}  clean {clean:.3f}"
        )
    return generator.requires_grad_(False), classifier.eval(), stats


def _state(generator: IADGenerator) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}


@ATTACKS.register
class IAD(Attack):
    name = "iad"
    Params = IADParams
    presets = {
        "reference": {
            "cross_ratio": 1.0,
            "p_attack": 0.1,
            "p_cross": 0.1,
            "lambda_div": 1.0,
            "lambda_norm": 100.0,
            "mask_density": 0.032,
        }
    }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.params
        self.check_cross_ratio(p.cross_ratio)
        if p.classifier not in MODELS:
            raise BdguardError(
                f"iad.classifier must be a registered model ({', '.join(MODELS.names())}), got {p.classifier!r}"
            )
        self.generator: IADGenerator | None = None
        self.generator_info: dict[str, Any] = {}

    # ---- the generator: cache, training, measurement ------------------------------------------------------------

    def cache_identity(self, bundle: DataBundle) -> dict[str, Any]:
        """Everything that changes the trained generator (cross_ratio only changes poisoning)."""
        train = bundle.train
        return {
            "version": CACHE_VERSION,
            "dataset": bundle.name,
            "data": digest(train.images, train.labels),
            "train_size": len(train),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "mean": list(bundle.mean),
            "std": list(bundle.std),
            "target": self.config.target,
            "mode": self.config.mode,
            "seed": self.config.seed,
            "params": {k: v for k, v in vars(self.params).items() if k != "cross_ratio"},
        }

    def cache_path(self, cache_dir: Path, identity: dict[str, Any]) -> Path:
        key = digest(identity)
        dataset = identity["dataset"].replace(":", "_").replace("/", "_")
        return Path(cache_dir) / "attacks" / f"iad-{dataset}-{key}.safetensors"

    def new_generator(self, bundle: DataBundle) -> IADGenerator:
        p = self.params
        return IADGenerator(self.image_shape[0], bundle.mean, bundle.std, p.width, p.depth)

    def prepare(self, bundle: DataBundle, context: AttackContext) -> None:
        """Load the cached generator for this data set and these settings, or train it and cache it."""
        self._check_shape(bundle.train)
        identity = self.cache_identity(bundle)
        path = self.cache_path(context.cache_dir, identity)
        if path.exists():
            loaded = self._load(path, bundle)
            if loaded is not None:
                self.generator = loaded.to(context.device).requires_grad_(False)
                log(f"iad: loaded the trained generator from {path}")
                self._warn_if_mask_is_off()
                return
        p = self.params
        log(
            f"iad: training the trigger generator on {bundle.name} ({p.mask_epochs} mask + {p.epochs} joint epochs, "
            f"classifier {p.classifier}); it will be cached in {path}"
        )
        began = time.perf_counter()
        generator, classifier, stats = train_generator(self, bundle, context)
        self.generator = generator
        info = {**self._measure(classifier, bundle), **stats, "train_seconds": round(time.perf_counter() - began, 2)}
        metadata = {HEADER_KEY: json.dumps({"identity": identity, "metrics": info})}
        with atomic_path(path) as tmp:
            save_file(_state(generator), str(tmp), metadata=metadata)
        self.generator_info = {**info, "cache": str(path), "from_cache": False}
        log(
            f"iad: generator trained in {info['train_seconds']:.1f}s: its classifier's clean acc "
            f"{info['clean_acc']:.3f}, attack acc {info['attack_acc']:.3f}, cross acc {info['cross_acc']:.3f}, "
            f"mask density {info['mask_density']:.4f}; cached in {path}"
        )
        self._warn_if_mask_is_off()

    def _warn_if_mask_is_off(self) -> None:
        # a mask that is off everywhere gets no gradient through its saturated step again, so training cannot
        # recover; it happens on tiny sets with few steps, and poisoning with it would change (almost) nothing
        density = self.generator_info["mask_density"]
        if density < 0.1 * self.params.mask_density:
            log(
                f"iad: warning: the trained mask is (almost) off (mean density {density:.4f}, target "
                f"{self.params.mask_density}), so the trigger changes little; lower iad.lr_generator or use more data"
            )

    def _load(self, path: Path, bundle: DataBundle) -> IADGenerator | None:
        """The cached generator (safetensors: no code runs), or None when the file is unreadable or mismatched."""
        generator = self.new_generator(bundle)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
            metrics = json.loads(header[HEADER_KEY])["metrics"]
            generator.load_state_dict(tensors, strict=True)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log(f"iad: ignoring the unreadable generator cache {path} ({type(exc).__name__}: {exc}); training anew")
            return None
        self.generator_info = {**metrics, "cache": str(path), "from_cache": True}
        return generator

    def _measure(self, classifier: nn.Module, bundle: DataBundle) -> dict[str, float]:
        """The generator's classifier on the test set: clean, attack (this attack's test set) and cross accuracy."""
        test = bundle.test
        triggered = self.test_set(test)
        cross = trigger(self.generator, test.images, test.images.roll(1, 0))
        with torch.no_grad():
            device = self.generator.mean.device
            masks = [
                self.generator.mask(to_float(test.images[i : i + CHUNK].to(device))) for i in range(0, len(test), CHUNK)
            ]
        return {
            "clean_acc": accuracy(predict(classifier, test.images), test.labels),
            "attack_acc": accuracy(predict(classifier, triggered.images), triggered.targets),
            "cross_acc": accuracy(predict(classifier, cross), test.labels),
            "mask_density": float(torch.cat(masks).mean()),
        }

    # ---- triggering and poisoning -------------------------------------------------------------------------------

    def _require_generator(self) -> IADGenerator:
        if self.generator is None:
            raise BdguardError("iad needs prepare() first: its trigger generator is trained (or loaded) there")
        return self.generator

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return trigger(self._require_generator(), images, images)

    def poison(self, train: ImageSet) -> PoisonedSet:
        generator = self._require_generator()
        n = len(train)

        def cross(index: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
            # a nonzero offset never pairs an image with itself
            offset = torch.randint(1, max(n, 2), (index.numel(),), generator=rng).to(index.device)
            return trigger(generator, train.images[index], train.images[(index + offset) % n])

        return self.poison_with_cross(train, self.params.cross_ratio, cross)

    def manifest(self, poison_mask: torch.Tensor, cross_mask: torch.Tensor) -> dict[str, Any]:
        return {**super().manifest(poison_mask, cross_mask), "generator": dict(self.generator_info)}
