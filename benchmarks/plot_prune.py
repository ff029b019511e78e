"""One figure per pruned model: BA and ASR against the pruned fraction for every ranking defense run on it.

python benchmarks/plot_prune.py runs/cifar-cpu-prune badnets benchmarks/figures/prune-cifar-badnets.png

Reads FOLDER/ATTACK-*/curve.jsonl (written by `bdguard prune`). Neural Cleanse writes no curve, and CLP's sweeps its
threshold u over the channels of every conv layer, so it is left out: its x-axis would mean something else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bdguard.plotting import new_figure, write_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("attack")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    figure = new_figure(11, 4)
    ba_axes, asr_axes = figure.subplots(1, 2, sharex=True)
    for path in sorted(args.folder.glob(f"{args.attack}-*/curve.jsonl")):
        if json.loads((path.parent / "results.json").read_text())["defense"] == "clp":
            continue
        points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [p for p in points if "fraction" in p and p.get("ba") is not None]
        if not points:
            continue
        label = path.parent.name.removeprefix(f"{args.attack}-")
        fractions = [100 * p["fraction"] for p in points]
        ba_axes.plot(fractions, [100 * p["ba"] for p in points], label=label)
        asr_axes.plot(fractions, [100 * p["asr"] for p in points], label=label)
    if not asr_axes.lines:  # an empty figure would hide that nothing was read (a wrong ATTACK, a renamed field)
        raise SystemExit(f"no pruning curves of {args.attack} in {args.folder}")
    for axes, name in ((ba_axes, "BA %"), (asr_axes, "ASR %")):
        axes.set_xlabel("feature channels pruned (%)")
        axes.set_ylabel(name)
        axes.set_ylim(0, 100)
        axes.grid(alpha=0.3)
    asr_axes.legend(fontsize=8)
    figure.suptitle(f"{args.attack}: pruning curves in the order each defense ranks the channels ({args.folder})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_figure(figure, args.out)


if __name__ == "__main__":
    main()
