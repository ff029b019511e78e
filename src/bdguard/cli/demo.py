"""`bdguard demo`: the quick-start on Fashion-MNIST (offline from Debian's package): a BadNets-poisoned training
set trained undefended and with V&B, the undefended model repaired by l-inf pruning, and one table at the end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from bdguard.attacks import AttackConfig
from bdguard.data import DataConfig
from bdguard.defenses import DefenseConfig
from bdguard.progress import log
from bdguard.runs.repair import RepairConfig, run_repair
from bdguard.runs.train import RunConfig, run_train
from bdguard.training import TrainConfig

DEMO_DEFENSES = ("none", "vab")  # trained on the poisoned set
# applied to the undefended model: (run folder, defense, settings). l-inf pruning as a defender runs it, with a trigger
# reverse-engineered by Neural Cleanse, and with the attack's real trigger, the best that scoring can do
DEMO_REPAIRS = (("linf-prune", "linf-prune", {}), ("linf-prune-oracle", "linf-prune", {"trigger": "oracle"}))
# a third of Fashion-MNIST for ten epochs: the backdoor takes hold in the first two, the clean accuracy is near its
# plateau (85 % undefended), and the demo stays a few CPU minutes
TRAIN_SIZE = 20_000
EPOCHS = 10
COLUMNS = ("defense", "BA", "ASR", "RA", "TPR", "FPR", "pruned", "seconds")
NOT_APPLICABLE = "—"
TABLE_WIDTH = 100


def demo_data() -> DataConfig:
    return DataConfig(dataset="fashion-mnist", train_size=TRAIN_SIZE)


def demo_config(defense: str) -> RunConfig:
    """BadNets at 10% on Fashion-MNIST with the small CNN: a backdoor that takes hold in a few CPU minutes. Both rows
    train on the same poisoned set with the same one-cycle schedule; V&B with its defaults."""
    return RunConfig(
        data=demo_data(),
        attack=AttackConfig(name="badnets", rate=0.1, target=0),
        defense=DefenseConfig(name=defense),
        train=TrainConfig(model="small-cnn", epochs=EPOCHS, batch_size=128, lr=0.05, schedule="onecycle"),
    )


def repair_config(defense: str, params: dict[str, Any]) -> RepairConfig:
    """The defense with its defaults but `params` (linf-prune: the `auto` budget, a reversed trigger unless
    trigger=oracle), on 500 held-out clean test images."""
    return RepairConfig(data=demo_data(), defense=DefenseConfig(name=defense, params=params))


def _share(value: float | None) -> str:
    return NOT_APPLICABLE if value is None else f"{value:.1%}"


def demo_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> Table:
    """One row per run: BA, ASR and RA of its model, TPR/FPR of its poison detector on the training set (V&B's last
    scoring round), the share of feature channels pruned, wall seconds; "—" where a column does not apply."""
    title = f"BadNets 10% on {TRAIN_SIZE:,} Fashion-MNIST training images, small CNN"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for name, r in rows:
        detector = r.get("detector") or {}
        table.add_row(
            name,
            _share(r["ba"]),
            _share(r["asr"]),
            _share(r["ra"]),
            _share(detector.get("tpr")),
            _share(detector.get("fpr")),
            _share(r.get("pruned_fraction")),
            f"{r['seconds']:.0f}",
        )
    return table


def run_demo(out: Path, quiet: bool = False) -> int:
    rows = []
    for defense in DEMO_DEFENSES:
        log(f"demo: training with defense '{defense}' -> {out / defense}")
        rows.append((defense, run_train(demo_config(defense), out / defense, resume=True, quiet=quiet)))
    for name, defense, params in DEMO_REPAIRS:
        done = out / name / "results.json"
        if done.exists():  # the repair of an earlier demo run: as `train --resume` does for a finished run
            results = json.loads(done.read_text())
        else:
            log(f"demo: repairing the undefended model with '{defense}' {params or ''} -> {out / name}")
            config = repair_config(defense, params)
            results = run_repair(config, out / "none" / "model.safetensors", out / name, quiet=quiet)
        rows.append((f"none + {name}", results))
    # rich assumes 80 columns when stdout is a pipe or a file: too narrow for the table's eight columns
    Console(highlight=False, width=max(TABLE_WIDTH, Console().width)).print(demo_table(rows))
    print("A repaired model is evaluated on the test images outside the 500 clean ones its defense saw.")
    folders = [*DEMO_DEFENSES, *(name for name, _, _ in DEMO_REPAIRS)]
    print(f"results: {', '.join(str(out / folder / 'results.json') for folder in folders)}")
    return 0
