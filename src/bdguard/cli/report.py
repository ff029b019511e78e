"""`bdguard report`: one self-contained HTML file from bench and run folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from bdguard.reporting.html import write_report

    path = write_report([Path(folder) for folder in args.folders], Path(args.out), title=args.title)
    print(f"report: {path}")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="one self-contained HTML report (matrix, figures, commands) from bench and run folders",
        description="Read bench folders (bdguard bench), run folders (train, prune, poison) and analysis folders "
        "(analyze) and write one HTML file with every figure embedded: the BA/ASR matrix, per-cell details, "
        "trigger galleries, V&B's entropy histograms and detector curves, pruning curves, Grad-CAM grids and "
        "norm plots, and the command and versions behind each result. It needs no network to view.",
    )
    parser.add_argument("folders", nargs="+", metavar="RUN_OR_BENCH_DIR", help="bench or run folders")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--title", default=None, help="the report's title (default: from the folders)")
    parser.set_defaults(handler=_report)
