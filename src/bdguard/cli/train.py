"""`bdguard train` and `bdguard evaluate`: train a model (with or without a defense) and measure a saved one."""

from __future__ import annotations

import argparse
from pathlib import Path

from bdguard.cli.options import (
    ATTACK_FLAGS,
    DATA_FLAGS,
    EXCLUDE_FLAGS,
    TRAIN_FLAGS,
    add_config_flags,
    add_flags,
    run_config,
)


def _train(args: argparse.Namespace) -> int:
    from bdguard.runs.folder import recorded_config
    from bdguard.runs.train import run_train

    # --resume continues the run with its recorded settings; flags given with it change them (and are refused
    # where the checkpoint cannot take them)
    base = recorded_config(Path(args.out)) if args.resume else None
    results = run_train(run_config(args, "attack", base), args.out, resume=args.resume, quiet=args.quiet)
    if results:  # under torchrun, only the main rank's run has results to show
        _print_results(results, Path(args.out))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from bdguard.runs.train import run_evaluate

    config = run_config(args, primary="attack")
    attack_given = args.config or args.set or any(vars(args)[key] is not None for _, key, _ in ATTACK_FLAGS)
    attack = config.attack if attack_given else None
    device = config.train.device
    results = run_evaluate(args.model, config.data, attack, args.out, device, config.train.eval_batch_size)
    _print_results(results, Path(args.out) if args.out else None)
    return 0


def _print_results(results: dict, out: Path | None) -> None:
    parts = [f"BA {results['ba']:.2%}"]
    if results.get("asr") is not None:
        parts += [f"ASR {results['asr']:.2%}", f"RA {results['ra']:.2%}"]
    where = f"  ({out / 'results.json'})" if out else ""
    print("  ".join(parts) + where)


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model on a (poisoned) data set, with or without a defense")
    add_flags(train, DATA_FLAGS + EXCLUDE_FLAGS + ATTACK_FLAGS + TRAIN_FLAGS)
    add_config_flags(train, "an attack option (e.g. patch_size=4), or a full path such as train.momentum=0.8")
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with the settings it recorded (config.json)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars, only plain log lines")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("evaluate", help="BA, ASR and RA of a saved model")
    evaluate.add_argument("--model", required=True, help="a model.safetensors written by bdguard")
    add_flags(evaluate, DATA_FLAGS + ATTACK_FLAGS)
    add_config_flags(evaluate, "an attack option; the attack defaults to the one recorded in the model file")
    evaluate.add_argument("--device", dest="train.device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    evaluate.add_argument("--out", help="folder for results.json")
    evaluate.set_defaults(handler=_evaluate)
