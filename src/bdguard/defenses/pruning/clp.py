"""clp: Channel Lipschitzness-based Pruning (Zheng, Tang, Li and Liu, ECCV 2022; docs/methods/clp.md), data-free.

For every Conv->BN pair and output channel k, the channel's upper bound on its Lipschitz constant is
UCLC_k = largest singular value of W_k * |gamma_k / sigma_k|, with W_k reshaped to (C_in, kh x kw) and sigma_k the
BN's running std. Within each layer, channels with UCLC > mean + u x std (sample std, as the reference code) are
pruned by zeroing the BN weight and bias, the reference code's rule. sigma_k includes the BN's eps (the scale BN
applies), so a channel with zero running variance is finite; the reference code divides by sqrt(var) alone.

A "pair" is a BN that receives a conv's output tensor itself, found by tracing one forward pass: in ResNet blocks
conv1->bn1, conv2->bn2 and the projection shortcut; in pre-activation blocks conv1->bn2 only (bn1 and the final
BN normalise residual sums, which no single conv owns); in small-cnn every layer. The probe set is used for
reporting only: CLP chooses with the weights alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bdguard.config import check_range, to_dict
from bdguard.data.augment import to_float
from bdguard.defenses.base import DefenseResult, Figure, PostTrainingDefense, RepairJob
from bdguard.defenses.pruning.report import plot_curve
from bdguard.defenses.registry import DEFENSES
from bdguard.io import write_json, write_jsonl
from bdguard.models.base import BackdoorModel
from bdguard.progress import log
from bdguard.training.metrics import accuracy, predict

# thresholds u of the curve, from pruning nothing (usually) towards pruning much
CURVE_CAPTION = "CLP: BA, ASR and RA (test minus probe) and the probe figures against the pruned fraction, u falling"
UCLC_CAPTION = "CLP: each channel's upper bound of the channel Lipschitz constant, layer by layer; pruned in red"
CURVE_U = (10.0, 8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0)


@dataclass
class ClpParams:
    defense: ClassVar[str] = "clp"

    u: float = 3.0  # prune channels more than u standard deviations above their layer's mean UCLC

    def __post_init__(self) -> None:
        check_range("clp.u", self.u, 0.0)


@dataclass
class ConvBn:
    conv_name: str
    bn_name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d


def conv_bn_pairs(model: BackdoorModel, image: torch.Tensor) -> list[ConvBn]:
    """The BNs that normalise a conv's output directly, in execution order, from one forward pass of `image`
    (a float batch). Outputs are kept alive during the pass, so no tensor id is reused."""
    names = {module: name for name, module in model.named_modules()}
    produced: dict[int, nn.Conv2d] = {}
    alive: list[torch.Tensor] = []
    pairs: list[ConvBn] = []

    def after_conv(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        produced[id(output)] = module
        alive.append(output)

    def before_bn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        conv = produced.get(id(inputs[0]))
        if conv is not None and all(pair.bn is not module for pair in pairs):
            pairs.append(ConvBn(names[conv], names[module], conv, module))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


@torch.no_grad()
def channel_lipschitz(pair: ConvBn) -> torch.Tensor:
    """UCLC of every output channel of the pair, (C_out,)."""
    weight = pair.conv.weight.float()
    bn = pair.bn
    scale = (bn.weight.float() / (bn.running_var.float() + bn.eps).sqrt()).abs()
    per_channel = weight.flatten(2) * scale[:, None, None]  # (C_out, C_in, kh x kw)
    return torch.linalg.matrix_norm(per_channel, ord=2)


def outliers(uclc: torch.Tensor, u: float) -> torch.Tensor:
    """bool (C_out,): UCLC > mean + u x std within the layer."""
    return uclc > uclc.mean() + u * uclc.std()


@DEFENSES.register
class ChannelLipschitzPruning(PostTrainingDefense):
    name = "clp"
    description = (
        "CLP (Zheng et al., ECCV 2022), data-free: zero the BN weight and bias of channels whose Lipschitz upper "
        "bound is more than u std above their layer's mean"
    )
    Params = ClpParams

    def repair(self, job: RepairJob) -> DefenseResult:
        began = time.perf_counter()
        model, u = job.model, self.params.u
        pairs = conv_bn_pairs(model, to_float(job.probe.images[:1]))
        uclc = [channel_lipschitz(pair) for pair in pairs]
        original = [(pair.bn.weight.detach().clone(), pair.bn.bias.detach().clone()) for pair in pairs]
        total = sum(len(values) for values in uclc)

        def prune(threshold: float) -> list[torch.Tensor]:
            """Zero the outliers at `threshold` (restoring the others) and return the pruned masks."""
            chosen = [outliers(values, threshold) for values in uclc]
            with torch.no_grad():
                for pair, (weight, bias), drop in zip(pairs, original, chosen, strict=True):
                    pair.bn.weight.copy_(torch.where(drop, 0.0, weight))
                    pair.bn.bias.copy_(torch.where(drop, 0.0, bias))
            return chosen

        curve = []
        for threshold in sorted({*CURVE_U, u}, reverse=True):
            fraction = sum(int(drop.sum()) for drop in prune(threshold)) / total
            clean = predict(model, job.probe.images, job.train.eval_batch_size, job.train.amp)
            curve.append(
                {
                    "u": threshold,
                    "fraction": fraction,
                    **job.evaluate(model),
                    "probe_acc": accuracy(clean, job.probe.labels),
                }
            )
            if fraction > 0.6:  # the curve's range, as for the other pruning defenses
                break
        chosen = prune(u)
        pruned = sum(int(drop.sum()) for drop in chosen)
        log(f"clp: u = {u:g} prunes {pruned} of {total} channels in {len(pairs)} Conv-BN layers")

        layers = [
            {
                "conv": pair.conv_name,
                "bn": pair.bn_name,
                "channels": len(values),
                "threshold": float(values.mean() + u * values.std()),
                "pruned": drop.nonzero().squeeze(1).tolist(),
                "uclc": values.tolist(),
            }
            for pair, values, drop in zip(pairs, uclc, chosen, strict=True)
        ]
        summary = {
            "defense": self.name,
            "u": u,
            "layers_paired": len(pairs),
            "channels": total,
            "pruned_channels": pruned,
            "pruned_fraction": pruned / total,
            "repair_seconds": round(time.perf_counter() - began, 2),
        }
        if job.run_dir is not None:
            write_json(job.run_dir / "pruning.json", {**summary, "params": to_dict(self.params), "layers": layers})
            write_jsonl(job.run_dir / "curve.jsonl", curve)
            plot_curve(
                job.run_dir / "curve.png", curve, summary["pruned_fraction"], f"clp: u from {max(CURVE_U):g} down"
            )
            plot_uclc(job.run_dir / "norms.png", layers)
        figures = (Figure("curve.png", CURVE_CAPTION), Figure("norms.png", UCLC_CAPTION)) if job.run_dir else ()
        return DefenseResult(model, pruned_fraction=summary["pruned_fraction"], figures=figures, details=summary)


def plot_uclc(path: Path, layers: list[dict[str, Any]]) -> None:
    """UCLC of every channel, layer by layer along the x axis, with each layer's threshold; pruned in red."""
    from bdguard.plotting import new_figure, write_figure

    figure = new_figure(max(6.0, 0.35 * len(layers)), 3.6)
    ax = figure.subplots()
    for position, layer in enumerate(layers):
        values = torch.tensor(layer["uclc"])
        pruned = torch.zeros(len(values), dtype=torch.bool)
        pruned[layer["pruned"]] = True
        x = torch.full((len(values),), float(position))
        ax.scatter(x[~pruned], values[~pruned], s=4, color="tab:blue")
        ax.scatter(x[pruned], values[pruned], s=8, color="tab:red")
        ax.hlines(layer["threshold"], position - 0.4, position + 0.4, color="black", linewidth=1)
    ax.set_xticks(range(len(layers)), [layer["bn"] for layer in layers], rotation=90, fontsize=6)
    ax.set_ylabel("UCLC")
    ax.set_yscale("log" if all(min(layer["uclc"]) > 0 for layer in layers) else "linear")
    pruned = sum(len(layer["pruned"]) for layer in layers)
    ax.set_title(f"clp: channel Lipschitz upper bounds, line at mean + u std per layer ({pruned} pruned)", fontsize=9)
    write_figure(figure, path)
