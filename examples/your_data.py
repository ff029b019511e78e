"""bdguard on your own data, from your own code: which samples are poisoned, a clean model, a repaired one.

The data here stands in for yours: bdguard's offline synthetic set (10 classes of 16x16 RGB images, 2,000 to train
on, 500 to test), handed over as the torch Dataset of PIL images a training script would have; a black-and-white
4x4 checkerboard in the corner of 10 % of the training images, relabelled 0, plays the attacker. The script then
asks bdguard.api three things:

1. detect: which training samples look poisoned (V&B's Victim), measured against the flags it planted;
2. train: a model trained on the poisoned data with V&B, and one without a defense, with their accuracy and attack
   success rate on the test images (the ASR measured here, with the script's own trigger: the model is an ordinary
   torch module);
3. repair: the undefended model's backdoor pruned away by l-inf neuron pruning from 200 clean images, the trigger
   reverse-engineered by Neural Cleanse (the defender does not know it).

Run it as `python examples/your_data.py` (under a minute on two CPU cores); it prints what it found and, last, one
JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image
from torch.utils.data import Dataset

from bdguard import api
from bdguard.data import DataConfig, load_dataset

TARGET = 0
TRAIN = {"model": "small-cnn", "batch_size": 64, "lr": 0.05, "schedule": "onecycle", "threads": 1}
VICTIM = {"victim_min_steps": 0, "victim_batch_size": 64}  # 31 Victim steps an epoch at 2,000 images


class Pictures(Dataset):
    """(PIL image, label) pairs: the shape of any image Dataset in a training script."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        self.images, self.labels, self.classes = images, labels, classes  # images: uint8 (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy()), int(self.labels[i])

    def rows(self, start: int, stop: int | None = None) -> Pictures:
        return Pictures(self.images[start:stop], self.labels[start:stop], self.classes)


def stamp(images: torch.Tensor) -> torch.Tensor:
    """The attacker's trigger: a black-and-white 4x4 checkerboard in the bottom-right corner of uint8 images."""
    images = images.clone()
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    images[:, :, -4:, -4:] = ((rows + cols) % 2 * 255).to(torch.uint8)
    return images


def attack_success(model: torch.nn.Module, test: Pictures) -> float:
    """The share of triggered test images outside the target class that the model puts in the target class."""
    others = test.labels != TARGET
    with torch.no_grad():
        predicted = model(stamp(test.images[others]).float() / 255).argmax(1)
    return float((predicted == TARGET).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = load_dataset(DataConfig(dataset="synthetic"))  # your own data would be read here
    classes = list(data.classes)
    images, labels = data.train.images.clone(), data.train.labels.clone()
    poisoned = torch.zeros(len(labels), dtype=torch.bool)
    poisoned[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[: len(labels) // 10]] = True
    poisoned &= labels != TARGET
    images[poisoned], labels[poisoned] = stamp(images[poisoned]), TARGET
    train, test = Pictures(images, labels, classes), Pictures(data.test.images, data.test.labels, classes)

    found = api.detect(train, "vab", poisoned=poisoned.numpy(), config={"detector": {"params": VICTIM}, "train": TRAIN})
    caught = int((found.flagged & poisoned.numpy()).sum())
    print(f"detect: flagged {int(found.flagged.sum())} samples, {caught} of the {int(poisoned.sum())} poisoned")
    figures = {"auroc": found.auroc, "tpr": caught / int(poisoned.sum()), "fpr": found.metrics["fpr"]}

    trained = {}
    for defense in ("vab", "none"):
        config = {"train": TRAIN, "defense": {"params": VICTIM if defense == "vab" else {}}}
        trained[defense] = api.train(train, defense=defense, test_dataset=test, epochs=args.epochs, config=config)
        figures[f"{defense}_ba"] = trained[defense].result.scores.ba
        figures[f"{defense}_asr"] = attack_success(trained[defense].model, test)
        print(f"train --defense {defense}: BA {figures[f'{defense}_ba']:.3f}, ASR {figures[f'{defense}_asr']:.3f}")

    clean, rest = test.rows(0, 200), test.rows(200)
    repaired = api.repair(trained["none"].model, clean, defense="linf-prune", test_dataset=rest)
    figures["repaired_ba"] = repaired.result.scores.ba
    figures["repaired_asr"] = attack_success(repaired.model, rest)
    figures["pruned_fraction"] = repaired.result.pruned_fraction
    print(
        f"repair --defense linf-prune: pruned {repaired.result.pruned_fraction:.1%} of the channels, "
        f"BA {figures['repaired_ba']:.3f}, ASR {figures['repaired_asr']:.3f}"
    )
    print(json.dumps({key: round(value, 4) for key, value in figures.items()}))


if __name__ == "__main__":
    main()
