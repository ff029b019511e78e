"""`bdguard detect`: score every training sample with a poisoned-sample detector."""

from __future__ import annotations

import argparse
from pathlib import Path

from bdguard.cli.options import ATTACK_FLAGS, DATA_FLAGS, EXCLUDE_FLAGS, add_config_flags, add_flags, config_tree
from bdguard.cli.options import TRAIN_FLAGS as RUN_TRAIN_FLAGS

DESCRIPTION = """\
Score every sample of a training set (higher = more suspicious) with --detector (see `bdguard detectors`) and
write to --out:
  scores.csv          index, label, score, flagged, file (a set read from files: its path below the folder,
                      which train --exclude takes as a list), poisoned (when --attack planted the poison)
  flagged.npy         bool (N,) in load order: what the detector's own threshold flags
  score_hist.png      the scores (by ground truth where known); most_suspicious.png: the top-ranked images
  results.json        the threshold, counts, and with an --attack AUROC, AUPRC, TPR, FPR, precision
With --attack the set is poisoned first, exactly as `bdguard train` would poison it; without, it is scored as it
is (e.g. --dataset imagefolder:PATH). spectral, activation-clustering and strip inspect a trained model: --model
FILE, or the undefended model trained on the set into --out/model/ (--arch, --epochs, ...). vab and abl train
what they need. Detector options go to --set (e.g. --set eps=0.05)."""

# train's flags for the model a detection trains: --arch names the architecture, and not --model, a model file here
TRAIN_FLAGS = [
    ("--arch", dotted, extra) if dotted == "train.model" else (flag, dotted, extra)
    for flag, dotted, extra in RUN_TRAIN_FLAGS
    if flag != "--defense"
]
DETECT_FLAGS = [
    ("--detector", "detector.name", {"help": "detector (see `bdguard detectors`)"}),
    ("--gallery", "gallery", {"help": "images in most_suspicious.png"}),
]


def _detect(args: argparse.Namespace) -> int:
    from bdguard.runs.detect import DetectConfig, run_detect

    config = DetectConfig.from_dict(config_tree(args, primary="detector", config_cls=DetectConfig))
    results = run_detect(config, args.out, args.model, quiet=args.quiet)
    parts = [f"{results['detector']}: flagged {results['flagged']} of {results['samples']}"]
    metrics = results["metrics"]
    if metrics is not None:
        auroc = "-" if metrics["auroc"] is None else f"{metrics['auroc']:.3f}"
        parts += [f"AUROC {auroc}", f"TPR {metrics['tpr']:.2%}", f"FPR {metrics['fpr']:.2%}"]
    print("  ".join(parts) + f"  ({Path(args.out) / 'results.json'})")
    return 0


def add_detect_parser(sub: argparse._SubParsersAction) -> None:
    from bdguard.runs.detect import DetectConfig

    parser = sub.add_parser(
        "detect",
        help="find the poisoned samples of a training set: vab, abl, spectral, activation-clustering, strip",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser, DATA_FLAGS + EXCLUDE_FLAGS + ATTACK_FLAGS, DetectConfig)
    add_flags(parser, DETECT_FLAGS + TRAIN_FLAGS, DetectConfig)
    parser.add_argument("--model", help="a model.safetensors trained on this set (model-based detectors)")
    add_config_flags(parser, "a detector option (e.g. eps=0.05), or a full path such as train.epochs=5")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only plain log lines")
    parser.set_defaults(handler=_detect)
