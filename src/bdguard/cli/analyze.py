"""`bdguard analyze`: Grad-CAM and activation-norm figures of a trained model, clean vs triggered."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bdguard.cli.options import add_probe_command, config_tree
from bdguard.cli.repair import PROBE_FLAGS
from bdguard.config import merge, parse_assignments, set_dotted
from bdguard.runs.analyze import AnalysisParams, AnalyzeConfig, run_analyze

DESCRIPTION = """\
Look inside --model (docs/methods/analysis.md) on the probe images `bdguard repair` would use, and write to --out:
  gradcam.png     Grad-CAM of the last feature map; rows: --clean-model (when given) and --model; columns: clean
                  probe images, the same with the real trigger and, with --set trigger=reverse, with Neural
                  Cleanse's reversed trigger; each title gives the mean trigger-focus ratio (1 = no focus)
  norms.png       per norm (l1, l2, linf): clean vs triggered per-channel means and the histogram of rel_p
                  (norms_clean.png: the same for --clean-model)
  norms.json      the per-channel statistics (means, stds, diff, rel, z, auroc) per model and trigger
  analysis.json   focus ratios, the norms' headline figures, Neural Cleanse's result, the settings
  nc_trigger.png  the reversed mask and pattern (trigger=reverse)
Analysis options go to --set: trigger=oracle|reverse (default oracle: the attack's real trigger), example=N
(the probe image shown), nc.steps=300, nc.labels=topk, ... Other --set keys are attack options; the attack
defaults to the one recorded in the model file."""

ANALYSIS_KEYS = {f.name for f in dataclasses.fields(AnalysisParams)}


def analyze_config(args: argparse.Namespace) -> AnalyzeConfig:
    """Like every command's config, except that `--set` keys naming an analysis setting (trigger, nc.steps, ...)
    go to the analysis section, so that they do not replace the attack recorded in the model file."""
    analysis: dict = {}
    others = []
    for key, value in parse_assignments(args.set).items():
        head, _, rest = key.partition(".")
        if head in ANALYSIS_KEYS:
            set_dotted(analysis, key, value)
        elif head == "analysis" and rest:
            set_dotted(analysis, rest, value)
        else:
            others.append(f"{key}={value}")
    tree = config_tree(argparse.Namespace(**{**vars(args), "set": others}), "attack", AnalyzeConfig)
    tree["analysis"] = merge(tree.get("analysis", {}), analysis)
    return AnalyzeConfig.from_dict(tree)


def _analyze(args: argparse.Namespace) -> int:
    result = run_analyze(analyze_config(args), args.model, args.out, args.clean_model, quiet=args.quiet)
    parts = [
        f"{cell['model']} / {cell['input']}: focus {cell['focus']:.2f}"
        for cell in result["gradcam"]
        if cell["focus"] is not None and cell["input"] != "clean"
    ]
    nc = result["neural_cleanse"]
    if nc is not None:
        verdict = f"flagged {nc['flagged']}" if nc["flagged"] else "nothing flagged"
        index = "n/a" if nc["anomaly_index"] is None else f"{nc['anomaly_index']:.2f}"
        parts.append(f"Neural Cleanse: {verdict}, anomaly index {index}")
    print("  ".join(parts) + f"  ({Path(args.out) / 'analysis.json'})")
    return 0


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    parser = add_probe_command(
        sub,
        "analyze",
        "Grad-CAM and activation-norm figures of a model, clean vs triggered",
        DESCRIPTION,
        PROBE_FLAGS,
        AnalyzeConfig,
        "an analysis setting (trigger=reverse, nc.steps=100, ...) or an attack option",
    )
    parser.add_argument("--clean-model", help="a clean-trained model of the same data set, for comparison")
    parser.set_defaults(handler=_analyze)
