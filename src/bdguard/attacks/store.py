"""Stored poisoned training sets: an attack's poisoning computed once and read back by every run that trains on
the same set (`bdguard bench` gives the runs of a grid one store, so `none` and `vab` of an attack and seed poison
once; LC's PGD is the costly case).

One folder per set, named by a key that hashes everything the poisoning depends on: the attack's settings, the
data set's name and the clean training images and labels themselves. The folder holds only what differs from the
clean set, as plain arrays (read with `allow_pickle=False`): `changed.npy` (int64 indices of the poisoned and
cross samples), `images.npy` (their uint8 images after poisoning), `labels.npy` (their labels as the attacker left
them), `poison_mask.npy` and `cross_mask.npy` (bool over the set), and last `manifest.json` (the attack's manifest
and the key), whose presence marks the folder complete. A damaged entry is rebuilt, not trusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdguard.attacks.base import AttackConfig
from bdguard.config import to_dict
from bdguard.data.base import ImageSet, PoisonedSet
from bdguard.hashing import digest
from bdguard.io import read_json, write_json, write_with

FORMAT = 1
ARRAYS = ("changed", "images", "labels", "poison_mask", "cross_mask")


def poison_key(dataset: str, train: ImageSet, attack: AttackConfig) -> str:
    """A hash of what a poisoned set depends on: the attack's settings and the clean training set's contents."""
    return digest(FORMAT, dataset, to_dict(attack), train.images, train.labels)


def _save_array(path: Path, array: np.ndarray) -> None:
    write_with(path, lambda handle: np.save(handle, array, allow_pickle=False))


def store_poisoned(folder: str | Path, key: str, poisoned: PoisonedSet) -> None:
    folder = Path(folder)
    changed = (poisoned.poison_mask | poisoned.cross_mask).nonzero().squeeze(1)
    arrays = {
        "changed": changed,
        "images": poisoned.train.images[changed],
        "labels": poisoned.train.labels[changed],
        "poison_mask": poisoned.poison_mask,
        "cross_mask": poisoned.cross_mask,
    }
    for name, tensor in arrays.items():
        _save_array(folder / f"{name}.npy", tensor.cpu().numpy())
    write_json(folder / "manifest.json", {"format": FORMAT, "key": key, "manifest": poisoned.manifest})


def load_poisoned(folder: str | Path, key: str, train: ImageSet) -> PoisonedSet | None:
    """The stored set for `key` rebuilt on top of the clean `train`, or None when there is none (or it is damaged:
    the caller then poisons afresh and stores again)."""
    folder = Path(folder)
    try:
        record: dict[str, Any] = read_json(folder / "manifest.json")
        if record.get("format") != FORMAT or record.get("key") != key:
            return None
        arrays = {name: torch.from_numpy(np.load(folder / f"{name}.npy", allow_pickle=False)) for name in ARRAYS}
    except (OSError, ValueError):
        return None
    n = len(train)
    changed = arrays["changed"]
    shapes_fit = (
        arrays["poison_mask"].shape == (n,)
        and arrays["cross_mask"].shape == (n,)
        and arrays["images"].shape == (changed.numel(), *train.image_shape)
        and arrays["labels"].shape == changed.shape
        and (changed.numel() == 0 or 0 <= int(changed.min()) <= int(changed.max()) < n)
    )
    if not shapes_fit:
        return None
    device = train.images.device
    index = changed.to(device)
    images, labels = train.images.clone(), train.labels.clone()
    images[index] = arrays["images"].to(device)
    labels[index] = arrays["labels"].to(device)
    return PoisonedSet(
        ImageSet(images, labels, train.files),
        arrays["poison_mask"].to(device),
        arrays["cross_mask"].to(device),
        train.labels,
        record["manifest"],
    )
