"""The `bdguard` command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from bdguard import __version__, distributed
from bdguard.cli import listing
from bdguard.cli.analyze import add_analyze_parser
from bdguard.cli.bench import add_bench_parser
from bdguard.cli.demo import run_demo
from bdguard.cli.detect import add_detect_parser
from bdguard.cli.poison import add_poison_parser
from bdguard.cli.repair import add_repair_parser
from bdguard.cli.report import add_report_parser
from bdguard.cli.train import add_train_parsers
from bdguard.errors import BdguardError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise BdguardError(message)


def build_parser() -> Parser:
    parser = Parser(prog="bdguard", description="Backdoor guard: poison, defend, measure.")
    parser.add_argument("--version", action="version", version=f"bdguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    add_analyze_parser(sub)
    add_bench_parser(sub)
    add_detect_parser(sub)
    add_poison_parser(sub)
    add_repair_parser(sub)
    add_report_parser(sub)

    add_train_parsers(sub)

    for name, func, text in (
        ("datasets", listing.list_datasets, "list data sets and where they are available offline"),
        ("attacks", listing.list_attacks, "list attacks with their parameters"),
        ("defenses", listing.list_defenses, "list defenses with their parameters"),
        ("detectors", listing.list_detectors, "list poisoned-sample detectors with their parameters"),
        ("models", listing.list_models, "list model architectures"),
    ):
        sub.add_parser(name, help=text).set_defaults(handler=lambda args, func=func: func())

    demo = sub.add_parser("demo", help="quick-start: BadNets on Fashion-MNIST, defended and not, in minutes")
    demo.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=lambda args: run_demo(Path(args.out), args.quiet))
    return parser


AGAIN = "run the same command again to redo it"
AFTER_A_STOP = {  # how each command continues after Ctrl-C
    "train": "continue with --resume",
    "bench": "run the same bench again: finished cells are kept",
    "detect": "run the same command again: the model it trains resumes",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers and `docker stop` send: handled like Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        if distributed.launched() and args.command != "train":  # the other commands would write N times over
            raise BdguardError(f"only `bdguard train` runs under torchrun, not `bdguard {args.command}`")
        code = args.handler(args)
        distributed.finish()
        return code
    except BdguardError as exc:
        _report(exc)
        return 2
    except RuntimeError as exc:
        if not distributed.lost_peer(exc):
            raise
        _report("lost another rank (it failed or was stopped); finished files are kept (continue with --resume)")
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if distributed.environment_rank() == 0:  # under torchrun the launcher stops every rank: one says so
            print(f"bdguard: {what}; finished files are kept ({AFTER_A_STOP.get(command, AGAIN)})", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        distributed.stop()


def _report(exc: BdguardError | str) -> None:
    """The error's one line. Under torchrun: before the ranks meet every rank fails alike and the main one says
    so; after, the rank that failed says so, naming itself (the launcher then stops the others)."""
    if distributed.active():
        print(f"bdguard: error: rank {distributed.rank()} of {distributed.world()}: {exc}", file=sys.stderr)
    elif distributed.environment_rank() == 0:
        print(f"bdguard: error: {exc}", file=sys.stderr)


if __name__ == "__main__":  # python -m bdguard.cli.main
    sys.exit(main())
