"""`bdguard repair` (or `prune`): repair a trained model with a post-training defense and measure it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bdguard.cli.options import DEVICE_FLAGS, add_probe_command, config_tree
from bdguard.runs.repair import RepairConfig, run_repair

DESCRIPTION = """\
Repair --model with a post-training defense (see `bdguard defenses`, stage post-training) and write to --out:
  model.safetensors  the repaired model (pruned channels in its feature_mask, and listed in model.json)
  results.json       BA, ASR, RA after (and `before`) on the test set minus the probe, pruned_fraction, ...
  pruning.json       the defense's choice and one row per channel (scores, norms, rank, pruned)
  curve.jsonl        BA, ASR, RA and the probe figures against the pruned fraction; curve.png, norms.png
The defense sees only the model and the probe set: --probe-size clean test images held out of BA/ASR (seeded
by --probe-seed), or --probe-source FOLDER of clean images in class sub-folders. Defense options go to --set
(e.g. --set norm=1 --set trigger=oracle); the attack defaults to the one recorded in the model file."""

PROBE_FLAGS = [
    ("--probe-size", "probe.size", {"help": "clean images the defense may use"}),
    ("--probe-source", "probe.source", {"help": "test-holdout, or a folder of class sub-folders of clean images"}),
    ("--probe-seed", "probe.seed", {"help": "seed of the probe images' choice"}),
    *DEVICE_FLAGS,
]


def _repair(args: argparse.Namespace) -> int:
    config = RepairConfig.from_dict(config_tree(args, primary="defense", config_cls=RepairConfig))
    results = run_repair(config, args.model, args.out, quiet=args.quiet)
    before = results["before"]
    parts = [f"BA {before['ba']:.2%} -> {results['ba']:.2%}"]
    if results.get("asr") is not None:
        parts += [f"ASR {before['asr']:.2%} -> {results['asr']:.2%}", f"RA {before['ra']:.2%} -> {results['ra']:.2%}"]
    parts.append(f"pruned {results['pruned_fraction']:.1%}")
    trigger = (results.get(config.defense.name) or {}).get("trigger")
    if isinstance(trigger, dict) and trigger.get("anomaly_index") is not None:  # a defense that reverses a trigger
        verdict = "backdoored" if trigger.get("backdoored") else "no backdoor found"
        parts.append(f"reversed target {trigger['target']} (anomaly index {trigger['anomaly_index']:.2f}: {verdict})")
    print("  ".join(parts) + f"  ({Path(args.out) / 'results.json'})")
    return 0


def add_repair_parser(sub: argparse._SubParsersAction) -> None:
    parser = add_probe_command(
        sub,
        "repair",
        "repair a trained model with a post-training defense: linf-prune, fine-pruning, clp, ...",
        DESCRIPTION,
        [("--defense", "defense.name", {"help": "post-training defense (see `bdguard defenses`)"}), *PROBE_FLAGS],
        RepairConfig,
        "a defense option (e.g. norm=1), or a full path such as probe.size=200",
        aliases=["prune"],  # its name before 2026-12
    )
    parser.set_defaults(handler=_repair)
