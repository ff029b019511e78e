"""anp: Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021; code github.com/csdongxian/ANP_backdoor).

Every BatchNorm2d neuron k gets a mask m_k in [0, 1] (start 1) and, per step, adversarial multiplicative noise on
its BN weight and bias: the perturbed network uses the weight w_k (m_k + δ_k) and the bias b_k (1 + ξ_k). A step
(the authors' `mask_train`) draws δ, ξ uniformly from [-eps, eps], takes `steps` signed-gradient ascent steps of
size eps / steps on the clean loss of the perturbed network (no projection back into [-eps, eps], as their code),
then one SGD step (momentum 0.9) on the masks for alpha * loss(m) + (1 - alpha) * loss(m, δ, ξ), and clips the
masks to [0, 1]. The network is the model itself through `torch.func.functional_call` with the BN weights and
biases replaced: no copy of a model class, and the model's own parameters are never written during the search.

BatchNorm normalises with each batch's statistics during the search, as the authors' `model.train()` makes it;
their running averages update throwaway copies (the authors' are lost too: they prune a fresh copy of the
checkpoint), so the model keeps its own. Dropout stays off: only the BN layers are put in training mode.

Pruning follows `prune_neuron_cifar.py`: a neuron whose mask is at most `threshold` (or, with `prune_by=fraction`,
one of the `fraction` of neurons with the smallest masks) has its BN weight set to 0; its bias is kept. The choice
reads the masks alone. `job.evaluate` only traces the BA/ASR curve over thresholds into the run folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bdguard.config import check_range, to_dict
from bdguard.data.augment import Augment, to_float
from bdguard.data.base import ImageSet
from bdguard.defenses.base import DefenseResult, Figure, PostTrainingDefense, RepairJob
from bdguard.defenses.pruning.report import plot_curve
from bdguard.defenses.registry import DEFENSES
from bdguard.errors import BdguardError
from bdguard.io import write_json, write_jsonl
from bdguard.progress import log, progress_bar
from bdguard.training.metrics import accuracy, predict
from bdguard.training.runtime import autocast
from bdguard.training.trainer import make_augment

# the curve's thresholds: the authors' evaluate_by_threshold, 0 to pruning_max 0.9 in steps of 0.05
CURVE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))
CURVE_CAPTION = "ANP: BA, ASR and RA (test minus probe) and probe accuracy against the mask threshold's pruned share"
MASK_MOMENTUM = 0.9  # optimize_mask_cifar.py: SGD(mask_params, lr, momentum=0.9)


@dataclass
class AnpParams:
    """ANP's settings; every default is the authors' (docs/methods/anp.md lists where each comes from), except
    `fraction`, used only with `prune_by=fraction`."""

    defense: ClassVar[str] = "anp"

    iterations: int = 2000  # mask updates (nb_iter)
    batch_size: int = 128  # probe images per update, drawn with replacement
    lr: float = 0.2  # the masks' SGD learning rate
    eps: float = 0.4  # noise budget; 0 optimises the masks on the clean loss alone
    steps: int = 1  # ascent steps on the noise per update, each of size eps / steps
    alpha: float = 0.2  # weight of the clean loss; 1 - alpha weighs the perturbed one
    prune_by: Literal["threshold", "fraction"] = "threshold"
    threshold: float = 0.2  # prune neurons whose mask is at most this
    fraction: float = 0.05  # with prune_by=fraction: prune this share of neurons, smallest masks first

    def __post_init__(self) -> None:
        check_range("anp.iterations", self.iterations, 1)
        check_range("anp.batch_size", self.batch_size, 1)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BdguardError(f"anp.lr must be a finite number > 0, got {self.lr}")
        check_range("anp.eps", self.eps, 0.0)
        check_range("anp.steps", self.steps, 1)
        check_range("anp.alpha", self.alpha, 0.0, 1.0)
        check_range("anp.threshold", self.threshold, 0.0, 1.0)
        check_range("anp.fraction", self.fraction, 0.0, 1.0)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorm2d layers that have a weight and a bias (affine), by module name, in registration order;
    a model without one is refused."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if not layers:
        raise BdguardError(
            f"anp needs a model with BatchNorm layers (it masks BatchNorm2d neurons); {type(model).__name__} has "
            "none: choose another defense for it"
        )
    return layers


class PerturbedNetwork:
    """`model` with every BN neuron's weight scaled by m + δ and its bias by 1 + ξ, called through
    `functional_call`. Masks and noise are flat tensors over all neurons, layer after layer as `bn_layers` lists
    them. The model's parameters enter detached, so no gradient reaches them."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]]) -> None:
        self.model = model
        self.names = [name for name, _ in layers]
        self.modules = [bn for _, bn in layers]
        self.sizes = [bn.num_features for bn in self.modules]
        self.weight = torch.cat([bn.weight.detach() for bn in self.modules])
        self.bias = torch.cat([bn.bias.detach() for bn in self.modules])
        self.fixed = {name: p.detach() for name, p in model.named_parameters()}
        self.buffers: dict[str, torch.Tensor] = {}  # BN buffer copies while batch statistics are on

    @property
    def neurons(self) -> int:
        return self.weight.numel()

    def __call__(
        self, x: torch.Tensor, mask: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits of float images `x` with masks `mask` and, when given, noise (δ, ξ) on weights and biases."""
        if noise is None:  # the authors' exclude_noise: weight w m, bias b
            weight, bias = self.weight * mask, self.bias
        else:
            weight, bias = self.weight * (mask + noise[0]), self.bias * (1.0 + noise[1])
        overrides = {**self.fixed, **self.buffers}
        for name, w, b in zip(self.names, weight.split(self.sizes), bias.split(self.sizes), strict=True):
            overrides[f"{name}.weight"] = w
            overrides[f"{name}.bias"] = b
        return functional_call(self.model, overrides, (x,))

    @contextmanager
    def batch_statistics(self) -> Iterator[None]:
        """BN layers in training mode (batch statistics, the authors' `model.train()`) for the duration, with
        their running averages updating copies: the model's own buffers and every other module's mode stay."""
        modes = [bn.training for bn in self.modules]
        self.buffers = {
            f"{name}.{key}": buffer.clone()
            for name, bn in zip(self.names, self.modules, strict=True)
            for key, buffer in bn.named_buffers(recurse=False)
        }
        for bn in self.modules:
            bn.train()
        try:
            yield
        finally:
            for bn, mode in zip(self.modules, modes, strict=True):
                bn.train(mode)
            self.buffers = {}


def optimise_masks(
    model: nn.Module,
    probe: ImageSet,
    params: AnpParams,
    augment: Augment | None,
    seed: int,
    amp: bool = True,
    quiet: bool = False,
) -> torch.Tensor:
    """ANP's mask search on the labelled probe set (on the model's device); returns the masks, flat (neurons,)
    in `bn_layers` order. The model is left as it was, buffers included."""
    net = PerturbedNetwork(model, bn_layers(model))
    device = probe.images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    mask = torch.ones(net.neurons, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([mask], lr=params.lr, momentum=MASK_MOMENTUM)
    eps, step_size = params.eps, params.eps / params.steps

    def loss_of(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, noise=None) -> torch.Tensor:
        with autocast(device, amp):
            logits = net(x, m, noise)
        return F.cross_entropy(logits.float(), y)

    with net.batch_statistics(), progress_bar("anp masks", params.iterations, quiet) as bar:
        for step in range(params.iterations):
            index = torch.randint(len(probe), (params.batch_size,), generator=generator, device=device)
            images = probe.images[index]
            x = to_float(augment(images, generator) if augment is not None else images)
            y = probe.labels[index]
            noise = None
            if eps > 0:  # step 1: the neuron perturbation that most raises the clean loss, from a random start
                start = torch.rand((2, net.neurons), generator=generator, device=device) * (2 * eps) - eps
                noise = (start[0].requires_grad_(True), start[1].requires_grad_(True))
                for _ in range(params.steps):
                    grads = torch.autograd.grad(loss_of(x, y, mask.detach(), noise), noise)
                    with torch.no_grad():
                        for value, grad in zip(noise, grads, strict=True):
                            value.add_(step_size * grad.sign())
                noise = (noise[0].detach(), noise[1].detach())
            # step 2: the masks descend on alpha x the natural loss + (1 - alpha) x the perturbed loss
            loss = params.alpha * loss_of(x, y, mask)
            if noise is not None:
                loss = loss + (1 - params.alpha) * loss_of(x, y, mask, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
            if step % 20 == 0:
                bar.update(1, loss=float(loss.detach()))
            else:
                bar.update(1)
    if not torch.isfinite(mask).all():
        raise BdguardError(
            f"anp diverged: its masks are no longer numbers after {params.iterations} steps; look at the model "
            f"(does it give finite logits?) and the learning rate (anp.lr = {params.lr:g})"
        )
    return mask.detach()


def neurons_to_prune(mask: torch.Tensor, params: AnpParams) -> torch.Tensor:
    """bool (neurons,): the authors' rule, mask <= threshold, or the `fraction` of neurons with the smallest
    masks (ties: the earlier neuron first)."""
    if params.prune_by == "threshold":
        return mask <= params.threshold
    drop = torch.zeros_like(mask, dtype=torch.bool)
    drop[mask.argsort(stable=True)[: round(params.fraction * mask.numel())]] = True
    return drop


def prune_neurons(layers: list[tuple[str, nn.BatchNorm2d]], original: list[torch.Tensor], drop: torch.Tensor) -> None:
    """Set the BN weight of the neurons in `drop` (flat, `bn_layers` order) to 0 and restore the others' from
    `original`; biases are not touched (the authors' `pruning` zeroes `<layer>.weight` only)."""
    chosen = drop.split([bn.num_features for _, bn in layers])
    with torch.no_grad():
        for (_, bn), weight, pruned in zip(layers, original, chosen, strict=True):
            bn.weight.copy_(torch.where(pruned, 0.0, weight))


@DEFENSES.register
class AdversarialNeuronPruning(PostTrainingDefense):
    name = "anp"
    description = (
        "ANP (Wu and Wang, NeurIPS 2021): learn a mask per BatchNorm neuron on the probe set under adversarial "
        "neuron perturbation, then zero the BN weight of neurons whose mask is at most the threshold (0.2)"
    )
    Params = AnpParams

    def repair(self, job: RepairJob) -> DefenseResult:
        began = time.perf_counter()
        p, model = self.params, job.model
        layers = bn_layers(model)
        augment = make_augment(job.train, job.bundle.flip)  # the authors' masks see crops and flips too
        mask = optimise_masks(model, job.probe, p, augment, job.seed, job.train.amp, job.quiet)
        original = [bn.weight.detach().clone() for _, bn in layers]
        total = mask.numel()

        def probe_accuracy() -> float:
            clean = predict(model, job.probe.images, job.train.eval_batch_size, job.train.amp)
            return accuracy(clean, job.probe.labels)

        # the curve is for the report only: nothing below reads it
        curve = []
        for threshold in sorted({*CURVE_THRESHOLDS, p.threshold}):
            drop = mask <= threshold
            prune_neurons(layers, original, drop)
            fraction = int(drop.sum()) / total
            curve.append(
                {"threshold": threshold, "fraction": fraction, **job.evaluate(model), "probe_acc": probe_accuracy()}
            )
            if fraction > 0.6:  # the curve's range, as for the other pruning defenses
                break

        drop = neurons_to_prune(mask, p)
        prune_neurons(layers, original, drop)
        model.eval()
        pruned = int(drop.sum())
        threshold = p.threshold if p.prune_by == "threshold" else None
        rule = f"mask <= {p.threshold:g}" if threshold is not None else f"the smallest {p.fraction:.1%} of masks"
        log(f"anp: {rule} prunes {pruned} of {total} BatchNorm neurons in {len(layers)} layers")

        summary = {
            "pruned": pruned,
            "neurons": total,
            "layers": len(layers),
            "prune_by": p.prune_by,
            "threshold": threshold,
            "probe_acc": probe_accuracy(),
            "repair_seconds": round(time.perf_counter() - began, 2),
        }
        if job.run_dir is not None:
            sizes = [bn.num_features for _, bn in layers]
            per_layer = zip(layers, mask.cpu().split(sizes), drop.cpu().split(sizes), strict=True)
            report = {
                "defense": self.name,
                **summary,
                "pruned_fraction": pruned / total,
                "params": to_dict(p),
                "bn_statistics": "batch statistics during the mask search (the authors' model.train()); "
                "running averages unchanged",
                "pruning": "BN weight set to 0, bias kept (the authors' prune_neuron_cifar.py)",
                "layers": [
                    {
                        "bn": name,
                        "neurons": bn.num_features,
                        "pruned": dropped.nonzero().squeeze(1).tolist(),
                        "mask": values.tolist(),
                    }
                    for (name, bn), values, dropped in per_layer
                ],
            }
            write_json(job.run_dir / "anp.json", report)
            write_jsonl(job.run_dir / "curve.jsonl", curve)
            title = f"anp: BN neurons with mask <= t pruned, t from 0 to {CURVE_THRESHOLDS[-1]:g}"
            plot_curve(job.run_dir / "curve.png", curve, pruned / total, title)
        figures = (Figure("curve.png", CURVE_CAPTION),) if job.run_dir is not None else ()
        return DefenseResult(model, pruned_fraction=pruned / total, figures=figures, details=summary)
