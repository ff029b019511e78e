"""`bdguard demo`: the quick-start, the shipped `demo` suite (bench/suites/demo.toml) run by the bench, and its one
table: BadNets on Fashion-MNIST trained undefended and with V&B, the undefended model repaired by l-inf pruning."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from bdguard.bench import BenchConfig

SUITE = "demo"
COLUMNS = ("defense", "BA", "ASR", "RA", "TPR", "FPR", "pruned", "seconds")
NOT_APPLICABLE = "—"
TABLE_WIDTH = 100


def demo_suite() -> BenchConfig:
    from bdguard.bench import load_suite  # imported here, as `bdguard bench` does: the bench is heavy to import

    return load_suite(SUITE)


def _share(value: float | None) -> str:
    return NOT_APPLICABLE if value is None else f"{value:.1%}"


def demo_table(title: str, rows: Sequence[dict[str, Any]]) -> Table:
    """One row per cell of the bench's table: BA, ASR and RA of its model, TPR/FPR of its poison detector on the
    training set (V&B's last scoring round), the share of feature channels pruned, wall seconds; "—" where a column
    does not apply. A repair's row is named after the model it repairs."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        name = row["defense"] if row["ba_before"] is None else f"none + {row['defense']}"
        table.add_row(
            name,
            _share(row["ba"]),
            _share(row["asr"]),
            _share(row["ra"]),
            _share(row["tpr"]),
            _share(row["fpr"]),
            _share(row["pruned_fraction"]),
            f"{row['seconds']:.0f}",
        )
    return table


def run_demo(out: Path, quiet: bool = False) -> int:
    from bdguard.bench import run_bench

    config = demo_suite()
    results = run_bench(config, out, quiet=quiet)
    rows = [row for row in results["cells"] if row["status"] == "done"]
    # rich assumes 80 columns when stdout is a pipe or a file: too narrow for the table's eight columns
    console = Console(highlight=False, width=max(TABLE_WIDTH, Console().width))
    console.print(demo_table(config.description.split(":")[0], rows))
    print("A repaired model is evaluated on the test images outside the 500 clean ones its defense saw.")
    print(f"results: {out / 'results.csv'}; every run's folder under {out / 'cells'}")
    failed = [row for row in results["cells"] if row["status"] == "failed"]
    for row in failed:
        print(f"failed: {row['defense']}: {row['error']}")
    return 1 if failed else 0
