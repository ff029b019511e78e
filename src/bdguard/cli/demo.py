"""`bdguard demo`: the quick-start on Fashion-MNIST (offline from Debian's package), one table at the end."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from bdguard.attacks import AttackConfig
from bdguard.data import DataConfig
from bdguard.defenses import DefenseConfig
from bdguard.pipeline import RunConfig, run_train
from bdguard.progress import log
from bdguard.training import TrainConfig

DEMO_DEFENSES = ("none",)


def demo_config(defense: str) -> RunConfig:
    """BadNets at 10% on Fashion-MNIST with the small CNN: a backdoor that takes hold in a few CPU minutes."""
    return RunConfig(
        data=DataConfig(dataset="fashion-mnist"),
        attack=AttackConfig(name="badnets", rate=0.1, target=0),
        defense=DefenseConfig(name=defense),
        train=TrainConfig(model="small-cnn", epochs=3, batch_size=128, lr=0.05, schedule="onecycle"),
    )


def run_demo(out: Path, quiet: bool = False) -> int:
    rows = []
    for defense in DEMO_DEFENSES:
        log(f"demo: training with defense '{defense}' -> {out / defense}")
        results = run_train(demo_config(defense), out / defense, resume=True, quiet=quiet)
        rows.append((defense, results))
    table = Table(title="BadNets (10%) on Fashion-MNIST, small CNN", box=box.SIMPLE_HEAD)
    for column in ("defense", "BA", "ASR", "RA", "seconds"):
        table.add_column(column, justify="right")
    for defense, r in rows:
        table.add_row(defense, f"{r['ba']:.1%}", f"{r['asr']:.1%}", f"{r['ra']:.1%}", f"{r['seconds']:.0f}")
    Console(highlight=False).print(table)
    print(f"results: {', '.join(str(out / d / 'results.json') for d, _ in rows)}")
    return 0
