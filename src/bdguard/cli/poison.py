"""`bdguard poison`: poison a training set without training; write its manifest, masks and trigger gallery."""

from __future__ import annotations

import argparse
from pathlib import Path

from bdguard.attacks import AttackConfig
from bdguard.cli.options import ATTACK_FLAGS, DATA_FLAGS, add_config_flags, add_flags, run_config
from bdguard.runs.poison import GALLERY_ROWS, run_poison

DESCRIPTION = """\
Poison the training set with an attack, train nothing (beyond what the attack itself needs, such as a trigger
generator), and write to --out:
  manifest.json    the attack, its parameters, the rate and what it is a fraction of, the target, counts of
                   poisoned and noise/cross samples (in total and per original class), the data set, and the
                   indices (with original and poisoned labels) of the poisoned and cross samples
  poison_mask.npy  bool (N,) over the training set: trigger inserted
  cross_mask.npy   bool (N,) over the training set: noise/cross sample (WaNet), label kept
  gallery.png      clean vs poisoned examples, their difference amplified, and triggered test images
An existing --out from an earlier `poison` is overwritten; a folder holding a training run is refused.
--seed and --attack-seed are one flag: the attack seed (poisoned-sample choice, generated triggers, gallery pick)."""


def _poison(args: argparse.Namespace) -> int:
    manifest = run_poison(run_config(args, primary="attack"), args.out, quiet=args.quiet, rows=args.rows)
    counts = f"{manifest['poisoned']} poisoned"
    if manifest["cross"]:
        counts += f", {manifest['cross']} cross"
    target = f", target {manifest['target_class']}" if manifest["target_class"] is not None else ""
    rate = f"rate {manifest['rate']:g}: {manifest['rate_meaning']}"
    out = Path(args.out)
    print(f"{manifest['attack']}: {counts} of {manifest['total']} ({rate}){target}  ({out / 'manifest.json'})")
    return 0


def add_poison_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "poison",
        help="poison a training set without training: manifest.json, masks and a trigger gallery",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser, DATA_FLAGS + [flag for flag in ATTACK_FLAGS if flag[1] != "attack.seed"])
    parser.add_argument(
        "--seed",
        "--attack-seed",
        dest="attack.seed",
        default=None,
        help=f"attack seed (default: {AttackConfig().seed}); `train` calls it --attack-seed",
    )
    add_config_flags(parser, "an attack option (e.g. patch_size=4), or a full path such as attack.mode=all2all")
    parser.add_argument(
        "--device",
        dest="train.device",
        default=None,
        help="auto, cpu, cuda, cuda:N or mps, for attacks that learn their trigger (default: auto)",
    )
    parser.add_argument("--rows", type=int, default=GALLERY_ROWS, help=f"gallery rows (default: {GALLERY_ROWS})")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only plain log lines")
    parser.set_defaults(handler=_poison)
