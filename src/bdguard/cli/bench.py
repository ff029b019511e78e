"""`bdguard bench`: every (attack, defense, seed) cell of a suite, resumable, into one folder and one table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bdguard.config import parse_assignments, set_dotted
from bdguard.errors import BdguardError

DESCRIPTION = """\
Run every (attack, defense, seed) cell of --suite (a shipped suite: smoke, cpu, cifar-cpu, paper, demo; or the path of a
copy of one, a TOML/YAML file) and write to --out:
  results.csv, results.json  one row per cell: BA, ASR, RA, detection TPR/FPR/AUROC, pruned fraction, seconds
  summary.csv                mean and std over seeds per (attack, defense); also in results.json
  cells/ATTACK/DEFENSE/seedK  each cell's run folder (as `bdguard train` or `prune` writes it) and cell.json
  poison/ATTACK              each attack's poisoning gallery
  detections.csv             with the suite's detectors: one row per (attack, detector, seed)
Post-training defenses repair the undefended (`none`) model of the same attack and seed. Re-running the same
command skips finished cells and resumes a killed one; a second bench on the same folder is refused.
--executor local --workers N runs the steps in N processes on this machine, --executor ray as Ray tasks (each
repair or model-based detection once its model exists; --out must then be on a file system every node sees): the
same folders and tables, and each step's log lines in its folder's log.txt.
Then: bdguard report DIR --out report.html"""


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seeds(text: str) -> list[int]:
    try:
        if "," in text:
            return [int(item) for item in _names(text)]
        count = int(text)
    except ValueError:
        raise BdguardError(f"--seeds takes a count N (seeds 0..N-1) or a list such as 0,2,5; got {text!r}") from None
    if count < 1:
        raise BdguardError(f"--seeds must be at least 1, got {count}")
    return list(range(count))


def bench_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a nested dict over the suite's settings; `--set` keys are full paths (train.epochs=2)."""
    tree: dict[str, Any] = {}
    if args.attacks:
        tree["attacks"] = _names(args.attacks)
    if args.defenses:
        tree["defenses"] = _names(args.defenses)
    if args.detectors is not None:  # --detectors "" runs none
        tree["detectors"] = _names(args.detectors) if args.detectors.strip() else []
    if args.seeds:
        tree["seeds"] = _seeds(args.seeds)
    for flag, dotted in (("data_root", "data.data_root"), ("device", "train.device"), ("threads", "train.threads")):
        if getattr(args, flag) is not None:
            set_dotted(tree, dotted, getattr(args, flag))
    for key, value in parse_assignments(args.set).items():
        set_dotted(tree, key, value)
    return tree


def _bench(args: argparse.Namespace) -> int:
    from bdguard.bench import ExecutorConfig, load_suite, run_bench

    executor = ExecutorConfig(
        kind=args.executor,
        workers=args.workers,
        address=args.address,
        cell_cpus=args.cell_cpus,
        cell_gpus=args.cell_gpus,
        retries=args.retries,
    )
    config = load_suite(args.suite, bench_overrides(args))
    results = run_bench(config, args.out, quiet=args.quiet, executor=executor)
    _print_matrix(results)
    _print_detections(results["detections"])
    out = Path(args.out)
    failed = [row for row in results["cells"] + results["detections"] if row["status"] == "failed"]
    print(f"results: {out / 'results.csv'}  report: bdguard report {out} --out {out / 'report.html'}")
    if failed:
        names = ", ".join(f"{r['attack']}/{r.get('defense') or r['detector']}/seed{r['seed']}" for r in failed)
        print(
            f"bdguard: {len(failed)} cell(s) failed ({names}): see error.txt in their folders; re-run to retry",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_matrix(results: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    summary = results["summary"]
    if not summary:
        return
    defenses = list(dict.fromkeys(entry["defense"] for entry in summary))
    attacks = list(dict.fromkeys(entry["attack"] for entry in summary))
    cells = {(entry["attack"], entry["defense"]): entry for entry in summary}
    table = Table(title=f"suite {results['suite']}: BA / ASR (mean over seeds)", box=box.SIMPLE_HEAD)
    table.add_column("attack")
    for defense in defenses:
        table.add_column(defense, justify="right")
    for attack in attacks:
        row = [attack]
        for defense in defenses:
            entry = cells.get((attack, defense))
            if entry is None or entry["ba_mean"] is None:
                row.append("-")
                continue
            asr = entry["asr_mean"]
            row.append(f"{entry['ba_mean']:.1%} / " + ("-" if asr is None else f"{asr:.1%}"))
        table.add_row(*row)
    Console(highlight=False).print(table)


def _print_detections(rows: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    done = [row for row in rows if row["status"] == "done"]
    if not done:
        return
    detectors = list(dict.fromkeys(row["detector"] for row in done))
    table = Table(title="poisoned-sample detection: AUROC (TPR / FPR at the detector's threshold)", box=box.SIMPLE_HEAD)
    table.add_column("attack / seed")
    for detector in detectors:
        table.add_column(detector, justify="right")
    for attack, seed in dict.fromkeys((row["attack"], row["seed"]) for row in done):
        mine = {row["detector"]: row for row in done if row["attack"] == attack and row["seed"] == seed}
        cells = []
        for detector in detectors:
            row = mine.get(detector)
            if row is None or row["auroc"] is None:
                cells.append("-")
                continue
            cells.append(f"{row['auroc']:.3f} ({row['tpr']:.0%} / {row['fpr']:.0%})")
        table.add_row(f"{attack} / {seed}", *cells)
    Console(highlight=False).print(table)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run the attack x defense x seed grid of a suite (resumable) into one results table",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--suite", required=True, help="smoke, cpu, cifar-cpu, paper, demo, or the path of a suite file"
    )
    parser.add_argument("--attacks", help="comma-separated attacks, instead of the suite's")
    parser.add_argument("--defenses", help="comma-separated defenses, instead of the suite's")
    parser.add_argument("--detectors", help="comma-separated poisoned-sample detectors, instead of the suite's")
    parser.add_argument("--seeds", help="N (seeds 0..N-1) or a comma-separated list, instead of the suite's")
    parser.add_argument("--data-root", help="where the data set is: a folder or archive")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the suite's)")
    parser.add_argument("--threads", help="CPU threads for torch (default: the suite's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any suite setting by its full path")
    parser.add_argument("--out", required=True, help="bench folder (re-run with the same one to resume)")
    parser.add_argument(
        "--executor",
        choices=("serial", "local", "ray"),
        default="serial",
        help="serial: one step after another in this process (default); local: --workers processes on this "
        "machine; ray: Ray tasks on a cluster (pip install 'bdguard[ray]')",
    )
    parser.add_argument(
        "--workers", type=int, help="steps at once (local: default 2; ray: default as the resources allow)"
    )
    parser.add_argument(
        "--address", help="ray: the cluster's address (default: $RAY_ADDRESS, else a Ray of its own on this machine)"
    )
    parser.add_argument("--cell-cpus", type=float, default=1.0, help="ray: CPUs per step, its torch threads (1)")
    parser.add_argument("--cell-gpus", type=float, default=0.0, help="ray: GPUs per step (0)")
    parser.add_argument("--retries", type=int, default=2, help="runs again of a step whose worker died (2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only plain log lines")
    parser.set_defaults(handler=_bench)
