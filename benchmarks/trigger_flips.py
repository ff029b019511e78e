"""How much of a model's ASR is the trigger and how much its own errors toward the target class.

ASR counts every triggered non-target test image put in the target class, including those the model puts there
without the trigger too; an undertrained or clean model has such a floor. For each run folder this prints the ASR,
the share of the *clean* non-target test images put in the target class, and the share the trigger flips (target
with the trigger, another class without).

    python benchmarks/trigger_flips.py runs/vab-ablation/fmnist-badnets/*/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bdguard.attacks import AttackContext, build_attack
from bdguard.models import load_model
from bdguard.runs.common import prepare_data, recorded_attack
from bdguard.runs.train import RunConfig
from bdguard.training import predict, resolve_device


def flips(run: Path, device: torch.device) -> dict[str, float]:
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    model, meta = load_model(run / "model.safetensors", device)
    bundle = prepare_data(config.data, device)
    attack = build_attack(recorded_attack(meta), bundle.num_classes, bundle.image_shape)
    attack.prepare(bundle, AttackContext(device, config.data.cache_path(), quiet=True))
    target = config.attack.target
    keep = bundle.test.labels != target
    clean = predict(model, bundle.test.images[keep]) == target
    triggered = predict(model, attack.test_set(bundle.test).images) == target
    return {
        "asr": float(triggered.float().mean()),
        "clean_to_target": float(clean.float().mean()),
        "flipped": float((triggered & ~clean).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print("| run | ASR % | clean images put in the target % | flipped by the trigger % |")
    print("|---|---|---|---|")
    for run in args.runs:
        if not (run / "model.safetensors").exists():
            continue
        f = flips(run, device)
        print(f"| {run} | {100 * f['asr']:.2f} | {100 * f['clean_to_target']:.2f} | {100 * f['flipped']:.2f} |")


if __name__ == "__main__":
    main()
