"""The path every last-layer pruning defense shares (docs/methods/linf-pruning.md 2): score the channels of the feature
map on the probe set, rank them, choose k* on the probe set alone, mask the top k*, optionally fine-tune, and report.

Pruning is a 0/1 mask on the feature map (the model's `feature_mask` buffer, docs/methods/linf-pruning.md 4),
never a weight edit: exact for Conv-BN-ReLU and residual sums alike, saved with the model, and untouched by
fine-tuning (it is no parameter).
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from typing import Any

import torch

from bdguard.analysis.activation_norms import activation_stats, clean_summary, pooled_features, shift_summary
from bdguard.config import to_dict
from bdguard.data.base import ImageSet
from bdguard.defenses.base import DefenseResult, Figure, PostTrainingDefense, RepairJob
from bdguard.defenses.common import fine_tune, trigger_success
from bdguard.defenses.pruning.params import PruneParams
from bdguard.defenses.pruning.report import PRUNING_FIGURES, channel_rows, curve_summary, write_pruning_report
from bdguard.defenses.pruning.triggers import scoring_trigger
from bdguard.errors import BdguardError
from bdguard.io import json_safe
from bdguard.models.base import BackdoorModel
from bdguard.progress import log, number
from bdguard.training.metrics import Evaluator, accuracy

# the curve covers 0 to 60% of the channels (docs/methods/linf-pruning.md 8), and further when the budget allows more
CURVE_END = 0.6
Summaries = dict[str, dict[str, torch.Tensor]]  # statistic ("1", "2", "inf", "avg") -> shift/clean summary


def rank_channels(score: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Channel indices, highest score first; channels the model already masks (`live` False) go last.

    Stable sorts keep the lower index first among ties, so a ranking is a pure function of the scores.
    """
    order = torch.sort(score, descending=True, stable=True).indices
    return order[torch.sort(live[order].int(), descending=True, stable=True).indices]


def pruned_mask(base: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """`base` (the model's current mask) with `channels` set to 0."""
    mask = base.clone()
    mask[channels] = 0
    return mask


class MaskedSet:
    """Predictions of one image set under any last-layer mask. `classify` reads only the globally averaged
    feature map, and averaging commutes with a per-channel mask, so one pass through the network serves every
    mask: each one then costs a linear layer."""

    def __init__(self, model: BackdoorModel, images: torch.Tensor, batch_size: int) -> None:
        self.model = model
        self.pooled = pooled_features(model, images, batch_size)

    @torch.no_grad()
    def predict(self, mask: torch.Tensor) -> torch.Tensor:
        return self.model.classify((self.pooled * mask)[:, :, None, None]).argmax(1)


class ProbeMetrics:
    """Clean accuracy and trigger success on the probe set under a mask: what a defense may choose k* by."""

    def __init__(
        self, model: BackdoorModel, probe: ImageSet, stamped: torch.Tensor | None, target: int | None, batch: int
    ) -> None:
        self.clean, self.labels = MaskedSet(model, probe.images, batch), probe.labels
        self.stamped = MaskedSet(model, stamped, batch) if stamped is not None else None
        self.target = target

    def __call__(self, mask: torch.Tensor) -> dict[str, float | None]:
        clean = self.clean.predict(mask)
        row: dict[str, float | None] = {"probe_acc": accuracy(clean, self.labels), "probe_asr": None}
        if self.stamped is not None and self.target is not None:
            row["probe_asr"] = trigger_success(clean, self.stamped.predict(mask), self.target)
        return row


class EvaluationMetrics:
    """BA, ASR and RA under a mask on the evaluation sets (test minus probe, real trigger): for the curve only."""

    def __init__(self, model: BackdoorModel, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.clean = MaskedSet(model, evaluator.clean.images, evaluator.batch_size)
        triggered = evaluator.triggered
        self.triggered = MaskedSet(model, triggered.images, evaluator.batch_size) if triggered is not None else None

    def __call__(self, mask: torch.Tensor) -> dict[str, float | None]:
        row: dict[str, float | None] = {"ba": accuracy(self.clean.predict(mask), self.evaluator.clean.labels)}
        row["asr"] = row["ra"] = None
        if self.triggered is not None and self.evaluator.triggered is not None:
            predicted = self.triggered.predict(mask)
            row["asr"] = accuracy(predicted, self.evaluator.triggered.targets)
            row["ra"] = accuracy(predicted, self.evaluator.triggered.labels)
        return row


def budget_limit(params: PruneParams, channels: int) -> int:
    """The k of a fixed budget, or the largest k that `auto` may choose."""
    if params.budget == "fraction":
        return round(params.fraction * channels)
    if params.budget == "count":
        if params.count > channels:
            raise BdguardError(f"{params.defense}.count is {params.count}, but the feature map has {channels} channels")
        return params.count
    return math.floor(params.max_fraction * channels)


def choose_k(probe_rows: list[dict[str, Any]], params: PruneParams, limit: int) -> tuple[int, str]:
    """k* and why, from the probe rows of k = 0, 1, 2, ...: a fixed budget gives `limit`; `auto` gives
    the first k whose probe ASR is <= asr_target, unless clean probe accuracy fell by more than max_ba_drop on
    the way, in which case the k before that fall."""
    if params.budget != "auto":
        return limit, params.budget
    start = probe_rows[0]["probe_acc"]
    for k, row in enumerate(probe_rows[: limit + 1]):
        if start - row["probe_acc"] > params.max_ba_drop:
            return max(k - 1, 0), "probe accuracy drop"
        if row["probe_asr"] is not None and row["probe_asr"] <= params.asr_target:
            return k, "probe ASR target"
    return limit, "max_fraction"


def summarise_shifts(clean: dict[str, torch.Tensor], stamped: dict[str, torch.Tensor] | None) -> Summaries:
    """Per statistic, the clean summary, or with a trigger the full shift summary (diff, rel, z, auroc)."""
    if stamped is None:
        return {key: clean_summary(values) for key, values in clean.items()}
    return {key: shift_summary(values, stamped[key]) for key, values in clean.items()}


class ChannelPruning(PostTrainingDefense):
    """A defense that masks the last-layer channels in the order of a score (highest first).

    `repair` edits `job.model` in place and, with a run folder, writes pruning.json, curve.jsonl, curve.png and
    norms.png there.
    """

    Params = PruneParams
    reads_feature_map = True

    @abstractmethod
    def score(self, summaries: Summaries) -> torch.Tensor:
        """(K,) pruning priority of every channel, highest first. `summaries` holds a trigger's shift statistics
        only when the scoring trigger is not "none"."""

    @abstractmethod
    def order_name(self, triggered: bool) -> str:
        """How the channels are ordered, in words, for pruning.json."""

    def repair(self, job: RepairJob) -> DefenseResult:
        params: PruneParams = self.params
        model, batch, began = job.model, job.train.eval_batch_size, time.perf_counter()
        channels = model.feature_channels
        limit = budget_limit(params, channels)  # before Neural Cleanse runs: a bad count fails at once
        trigger = scoring_trigger(job, params)
        stamped = trigger.apply(job.probe.images) if trigger.apply is not None else None
        clean_stats = activation_stats(model, job.probe.images, batch)
        stamped_stats = activation_stats(model, stamped, batch) if stamped is not None else None
        summaries = summarise_shifts(clean_stats, stamped_stats)
        base = model.feature_mask.detach().clone()
        score = self.score(summaries)
        order = rank_channels(score.to(base.device), base > 0)

        end = min(channels, max(math.ceil(CURVE_END * channels), limit))
        masks = [pruned_mask(base, order[:k]) for k in range(end + 1)]
        probe = ProbeMetrics(model, job.probe, stamped, trigger.target, batch)
        probe_rows = [probe(mask) for mask in masks]
        k, reason = choose_k(probe_rows, params, limit)
        test = EvaluationMetrics(model, job.evaluate)
        curve = [
            {"k": i, "fraction": i / channels, **test(mask), **row}
            for i, (mask, row) in enumerate(zip(masks, probe_rows, strict=True))
        ]
        model.feature_mask.copy_(masks[k])
        before, after = probe_rows[0], probe_rows[k]
        asr = f"{number(before['probe_asr'])} -> {number(after['probe_asr'])}"
        probe_acc = f"{number(before['probe_acc'])} -> {number(after['probe_acc'])}"
        log(f"{self.name}: pruned {k} of {channels} channels ({reason}); probe ASR {asr}, probe accuracy {probe_acc}")

        summary: dict[str, Any] = {
            "defense": self.name,
            "layer": "features",
            "order": self.order_name(stamped is not None),
            "trigger": trigger.source,
            "trigger_target": trigger.target,
            **trigger.report,
            "budget": params.budget,
            "k": k,
            "k_reason": reason,
            "channels": channels,
            "pruned_fraction": k / channels,
            "pruned": sorted(order[:k].tolist()),
            "probe_before": before,
            "probe_after": after,
            "curve": curve_summary(curve),
        }
        if params.finetune_epochs:
            summary["finetune"] = fine_tune(job, params.finetune_epochs, params.finetune_lr, params.seed)
        summary["repair_seconds"] = round(time.perf_counter() - began, 2)
        figures: tuple[Figure, ...] = ()
        if job.run_dir is not None:
            table = channel_rows(summaries, score, order, k)
            write_pruning_report(job.run_dir, {**summary, "params": to_dict(params)}, table, curve, summaries)
            figures = PRUNING_FIGURES
        verdict = (trigger.report.get("neural_cleanse") or {}).get("backdoored")
        return DefenseResult(model, None, k / channels, verdict, figures, json_safe(summary))
