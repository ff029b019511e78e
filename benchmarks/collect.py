"""Markdown rows of the finished runs under a benchmark folder (one sub-folder per run with its results.json).

python benchmarks/collect.py runs/cifar-cpu
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print("| run | attack | defense | BA % | ASR % | RA % | TPR % | FPR % | AUROC | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(args.folder.glob("*/results.json")):
        print(row(path.parent.name, json.loads(path.read_text())))


if __name__ == "__main__":
    main()
