"""The run behind `bdguard analyze`: look inside a trained model the way docs/methods/analysis.md 1-2 describes, on the
same seeded probe images `bdguard repair` would use.

- gradcam.png: Grad-CAM of the clean-trained model (when given) and the analysed model on clean probe images,
  the same images with the real trigger and, with `trigger=reverse`, with Neural Cleanse's reversed trigger;
- norms.png (and norms_clean.png for the clean-trained model): per norm, clean vs triggered per-channel means and
  the histogram of the relative shift rel_p; norms.json: the per-channel statistics behind them;
- nc_trigger.png with `trigger=reverse`; analysis.json: the focus ratios, Neural Cleanse's figures, the settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from bdguard.analysis.activation_norms import NORMS, activation_stats, shift_summary
from bdguard.analysis.gradcam import GridColumn, changed_pixels, gradcam_grid, grid_cells
from bdguard.attacks import ATTACKS, AttackConfig, check_attack
from bdguard.config import RootConfig, check_range, to_dict
from bdguard.data import DataConfig
from bdguard.defenses.neural_cleanse import NcParams, ReversedTrigger, reverse_engineer, write_trigger_image
from bdguard.defenses.pruning.report import STAT_NAMES, plot_norms
from bdguard.errors import BdguardError
from bdguard.io import json_safe, write_json
from bdguard.models import BackdoorModel, load_model
from bdguard.models.base import require_feature_map
from bdguard.progress import log
from bdguard.runs.common import environment, recorded_attack, set_up, use_device
from bdguard.runs.folder import claim, run_folder
from bdguard.runs.repair import ProbeConfig, take_probe
from bdguard.training import TrainConfig

TOP_SHARE = 0.05  # norms.json summarises each norm by its top 5% channels (by diff), as docs/methods/analysis.md 3 says
Summary = dict[str, dict[str, torch.Tensor]]  # norm ("1", "2", "inf") -> shift_summary


@dataclass
class AnalysisParams:
    trigger: Literal["oracle", "reverse"] = "oracle"  # reverse: also Neural Cleanse's trigger, in every output
    nc: NcParams = field(default_factory=NcParams)
    example: int = 0  # which of the probe images the Grad-CAM grid shows

    def __post_init__(self) -> None:
        check_range("analysis.example", self.example, 0)


@dataclass
class AnalyzeConfig(RootConfig):
    """One analysis. `train` gives the device, threads and the evaluation batch size."""

    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig | None = None  # None: the attack recorded in the model file
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def norm_summaries(
    model: BackdoorModel, images: torch.Tensor, trigger: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> Summary:
    """The statistics of docs/methods/analysis.md 2 for every norm: how `trigger` shifts each channel's l1, l2 and linf
    over `images`."""
    clean = activation_stats(model, images, batch_size)
    stamped = activation_stats(model, trigger(images), batch_size)
    return {p: shift_summary(clean[p], stamped[p]) for p in NORMS}


def norms_json(summary: Summary) -> dict[str, Any]:
    """Per norm: the mean auroc and rel of the top 5% channels by diff (how clearly the norm sees the trigger),
    and every per-channel statistic as a list."""
    result = {}
    for p, stats in summary.items():
        top = stats["diff"].argsort(descending=True, stable=True)[: max(1, round(TOP_SHARE * stats["diff"].numel()))]
        result[STAT_NAMES[p]] = {
            "top_channels": top.tolist(),
            "top_auroc": float(stats["auroc"][top].mean()),
            "top_rel": float(stats["rel"][top].mean()),
            "per_channel": {name: values.tolist() for name, values in stats.items()},
        }
    return result


def run_analyze(
    config: AnalyzeConfig,
    model_path: str | Path,
    out: str | Path,
    clean_model_path: str | Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Analyse the model at `model_path` (and, beside it, a clean-trained one) and write the files listed in this
    module's docstring to `out`; returns what analysis.json holds."""
    out = Path(out)
    settings = {**to_dict(config), "clean_model": None if clean_model_path is None else str(clean_model_path)}
    claim(out, "analyze", settings, model_path)
    params = config.analysis
    device = use_device(config.train)
    model, meta = load_model(model_path, device)
    loaded = {"backdoored": (model, meta, model_path)}
    if clean_model_path is not None:
        loaded = {"clean-trained": (*load_model(clean_model_path, device), clean_model_path), **loaded}
    models = [(name, m) for name, (m, _, _) in loaded.items()]
    for m in (model for _, model in models):  # Grad-CAM and the norms read the map
        require_feature_map(m, "analyze")
    attack_config = config.attack or recorded_attack(meta)
    check_attack(attack_config)  # before the data set loads
    if not ATTACKS.get(attack_config.name).has_trigger and params.trigger == "oracle":
        raise BdguardError(f"attack {attack_config.name} has no trigger to analyse: pass --attack, or trigger=reverse")
    with run_folder(out, "analyze", settings, model_path):
        began = time.perf_counter()
        checked = tuple((m_meta, path) for _, m_meta, path in loaded.values())
        run = set_up(config.data, attack_config, device, quiet, models=checked)
        bundle, attack = run.bundle, run.attack

        probe = take_probe(bundle, config.probe)[0]
        target = attack_config.target if attack.has_trigger and attack_config.mode == "all2one" else None
        # triggered views of target-class images say nothing about the trigger: leave them out, as ASR does
        images = probe.images if target is None else probe.images[probe.labels != target]
        if params.example >= len(images):
            raise BdguardError(f"analysis.example {params.example} is not among the {len(images)} probe images shown")
        log(f"probe: {len(probe)} clean images ({config.probe.source}); {len(images)} analysed")

        triggers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        columns = []
        if attack.has_trigger:
            real = attack.apply(images)
            triggers["oracle"] = attack.apply
            columns.append(GridColumn("real trigger", real, changed_pixels(images, real)))
        reversed_: ReversedTrigger | None = None
        if params.trigger == "reverse":
            reversed_ = reverse_engineer(model, probe.images, params.nc, quiet)
            triggers["reverse"] = reversed_.apply
            columns.append(GridColumn("reversed trigger", reversed_.apply(images), reversed_.region()))
        # on clean images the focus is measured where the (first) trigger would be
        columns.insert(0, GridColumn("clean", images, columns[0].region))

        batch = config.train.eval_batch_size
        cells = grid_cells(models, columns, batch)
        gradcam_grid(cells, columns, out / "gradcam.png", params.example)
        if reversed_ is not None:
            write_trigger_image(reversed_, out / "nc_trigger.png")

        # the trigger the pruning defenses would score with: the reversed one when asked for, else the real one
        shown = "reverse" if reversed_ is not None else "oracle"
        norms: dict[str, dict[str, Any]] = {}
        for name, m in models:
            summaries = {source: norm_summaries(m, images, apply, batch) for source, apply in triggers.items()}
            norms[name] = {source: norms_json(summary) for source, summary in summaries.items()}
            figure = out / ("norms.png" if m is model else "norms_clean.png")
            plot_norms(figure, summaries[shown], f"{name} model, {shown} trigger, {len(images)} probe images")
        write_json(out / "norms.json", json_safe({"layer": "features", "images": len(images), "models": norms}))

        result = {
            "model_path": str(model_path),
            "clean_model_path": None if clean_model_path is None else str(clean_model_path),
            "dataset": bundle.name,
            "attack": attack_config.name,
            "target": target,
            "trigger": params.trigger,
            "probe": {
                "source": config.probe.source,
                "size": len(probe),
                "seed": config.probe.seed,
                "analysed": len(images),
            },
            "gradcam": [cell.to_json(target) for row in cells for cell in row],
            "norms": {  # the headline of norms.json
                name: {
                    source: {p: {key: stats[key] for key in ("top_auroc", "top_rel")} for p, stats in by_norm.items()}
                    for source, by_norm in by_source.items()
                }
                for name, by_source in norms.items()
            },
            "neural_cleanse": None if reversed_ is None else reversed_.to_json(),
            "seconds": round(time.perf_counter() - began, 2),
            "config": to_dict(config),
            "environment": environment(),
        }
        write_json(out / "analysis.json", json_safe(result))
        return result
