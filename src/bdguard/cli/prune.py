"""`bdguard prune`: repair a trained model with a post-training defense (pruning, Neural Cleanse) and measure it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bdguard.cli.options import ATTACK_FLAGS, DATA_FLAGS, DEVICE_FLAGS, add_config_flags, add_flags, config_tree
from bdguard.runs.repair import PruneConfig, run_prune

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


def _prune(args: argparse.Namespace) -> int:
    config = PruneConfig.from_dict(config_tree(args, primary="defense", config_cls=PruneConfig))
    results = run_prune(config, args.model, args.out, quiet=args.quiet)
    before = results["before"]
    parts = [f"BA {before['ba']:.2%} -> {results['ba']:.2%}"]
    if results.get("asr") is not None:
        parts += [f"ASR {before['asr']:.2%} -> {results['asr']:.2%}", f"RA {before['ra']:.2%} -> {results['ra']:.2%}"]
    parts.append(f"pruned {results['pruned_fraction']:.1%}")
    print("  ".join(parts) + f"  ({Path(args.out) / 'results.json'})")
    return 0


def add_probe_command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    description: str,
    flags: list[tuple[str, str, dict]],
    config_cls: type,
    set_help: str,
) -> argparse.ArgumentParser:
    """A command that reads a trained model on the probe set (`prune`, `analyze`): --model, the data and attack
    flags, `flags` (their defaults from `config_cls`), --config/--set, --out and --quiet."""
    parser = sub.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a model.safetensors written by bdguard")
    add_flags(parser, DATA_FLAGS + ATTACK_FLAGS)
    add_flags(parser, flags, config_cls)
    add_config_flags(parser, set_help)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only plain log lines")
    return parser


def add_prune_parser(sub: argparse._SubParsersAction) -> None:
    parser = add_probe_command(
        sub,
        "prune",
        "repair a trained model with a post-training defense: linf-prune, fine-pruning, clp, ...",
        DESCRIPTION,
        [("--defense", "defense.name", {"help": "post-training defense (see `bdguard defenses`)"}), *PROBE_FLAGS],
        PruneConfig,
        "a defense option (e.g. norm=1), or a full path such as probe.size=200",
    )
    parser.set_defaults(handler=_prune)
