"""Markdown rows of the finished runs under a benchmark folder (one sub-folder per run with its results.json).

python benchmarks/collect.py runs/cifar-cpu            # training runs
python benchmarks/collect.py --prune runs/cifar-cpu-prune  # repairs: before/after, and the best ASR on the curve
python benchmarks/collect.py --ratio runs/vab-ablation/fmnist-badnets  # V&B's ablation: time ratio to `none`, stages
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def row(name: str, results: dict) -> str:
    detector = results.get("detector") or {}
    cells = [
        name,
        results["attack"],
        results["defense"],
        share(results["ba"]),
        share(results["asr"]),
        share(results["ra"]),
        share(detector.get("tpr")),
        share(detector.get("fpr")),
        "—" if detector.get("auroc") is None else f"{detector['auroc']:.3f}",
        f"{results['seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def curve_asr(folder: Path, before_ba: float, max_drop: float) -> str:
    """The lowest ASR on the BA/ASR-vs-k curve among the points whose BA lies within `max_drop` of the model's
    before repair (read from the ground truth: a reporting view, not what the defense could choose)."""
    path = folder / "curve.jsonl"
    if not path.exists():
        return "—"
    points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    within = [p["asr"] for p in points if "ba" in p and p.get("asr") is not None and p["ba"] >= before_ba - max_drop]
    return share(min(within)) if within else "—"


def own(results: dict) -> dict:
    """The defense's own block of results.json (under its name): trigger and k of a pruning, V&B's stage seconds."""
    return results.get(results["defense"]) or {}


def prune_row(folder: Path, results: dict) -> str:
    before = results["before"]
    block = own(results)
    # CLP and Neural Cleanse rank no channels (Neural Cleanse's `trigger` is the trigger it reversed): no trigger, k
    ranked = block if "k" in block else {}
    cells = [
        folder.name,
        results["defense"],
        str(ranked.get("trigger") or "—"),
        str(ranked.get("k", "—")),
        f"{share(before['ba'])} → {share(results['ba'])}",
        f"{share(before['asr'])} → {share(results['asr'])}",
        share(results["ra"]),
        curve_asr(folder, before["ba"], 0.02),
        curve_asr(folder, before["ba"], 0.05),
        f"{results['seconds']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


STAGES = ("warm_up", "stage_a", "stage_b", "victim", "evaluation")


def ratio_row(name: str, results: dict, undefended: dict | None) -> str:
    """A V&B ablation row: BA/ASR, the split's detection figures, seconds, their ratio to the undefended run of the
    same folder, and V&B's seconds by stage."""
    detector = results.get("detector") or {}
    stages = own(results).get("seconds_by_stage") or {}
    ratio = "—" if undefended is None else f"{results['seconds'] / undefended['seconds']:.2f}"
    cells = [
        name,
        share(results["ba"]),
        share(results["asr"]),
        share(detector.get("tpr")),
        share(detector.get("fpr")),
        "—" if detector.get("auroc") is None else f"{detector['auroc']:.3f}",
        f"{results['seconds']:.0f}",
        ratio,
        " / ".join(f"{stages[key]:.0f}" for key in STAGES) if stages else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prune", action="store_true", help="the folder holds `bdguard prune` runs")
    parser.add_argument("--ratio", action="store_true", help="V&B ablation: seconds against the `none` run beside")
    args = parser.parse_args()
    if args.ratio:
        found = sorted(args.folder.glob("*/results.json"))
        runs = {path.parent.name: json.loads(path.read_text()) for path in found}
        print("| variant | BA % | ASR % | TPR % | FPR % | AUROC | seconds | ÷ none | s: warm-up/A/B/Victim/eval |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, results in runs.items():
            print(ratio_row(name, results, runs.get("none")))
        return
    if args.prune:
        print("| run | defense | trigger | k | BA % | ASR % | RA % | ASR % at BA drop ≤ 2 | ≤ 5 (curve) | seconds |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for path in sorted(args.folder.glob("*/results.json")):
            print(prune_row(path.parent, json.loads(path.read_text())))
        return
    print("| run | attack | defense | BA % | ASR % | RA % | TPR % | FPR % | AUROC | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(args.folder.glob("*/results.json")):
        print(row(path.parent.name, json.loads(path.read_text())))


if __name__ == "__main__":
    main()
