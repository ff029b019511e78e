"""The run behind `bdguard poison`: the poisoned set's record, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bdguard.config import check_range, to_dict
from bdguard.io import write_array, write_json
from bdguard.runs.common import (
    check_before_loading,
    environment,
    set_up,
    use_device,
)
from bdguard.runs.folder import run_folder
from bdguard.runs.train import RunConfig

GALLERY_ROWS = 6  # poisoned samples shown in gallery.png


def run_poison(
    config: RunConfig,
    out: str | Path,
    quiet: bool = False,
    rows: int = GALLERY_ROWS,
    poison_store: str | Path | None = None,
) -> dict[str, Any]:
    """Poison the training set without training and write its record to `out`: manifest.json (the attack's
    manifest with the data set, per-class counts, the sample lists, config and environment; written last, so its
    presence means the folder is complete), poison_mask.npy and cross_mask.npy (bool (N,) in load order) and
    gallery.png (`rows` poisoned samples beside their clean versions). A folder of another command, or of a
    poisoning with other settings, is refused (runs/folder.py). `poison_store` as in `run_train`."""
    out = Path(out)
    settings = {"data": to_dict(config.data), "attack": to_dict(config.attack), "gallery_rows": rows}
    check_range("gallery rows", rows, 1)
    check_before_loading(config.data, config.attack)
    with run_folder(out, "poison", settings):
        return _poison(config, settings, out, quiet, rows, poison_store)


def _poison(
    config: RunConfig, settings: dict[str, Any], out: Path, quiet: bool, rows: int, poison_store: str | Path | None
) -> dict[str, Any]:
    device = use_device(config.train)
    run = set_up(config.data, config.attack, device, quiet, poison=True, poison_store=poison_store)
    bundle, attack, poisoned, triggered = run.bundle, run.attack, run.poisoned, run.triggered(run.bundle.test)
    # Imported here: matplotlib is slow to import and only this command draws.
    from bdguard.plotting import write_figure
    from bdguard.reporting.gallery import poison_gallery

    poison_mask, cross_mask = poisoned.poison_mask.cpu(), poisoned.cross_mask.cpu()
    original, labels = poisoned.original_labels.cpu(), poisoned.train.labels.cpu()
    poison_index = poison_mask.nonzero().squeeze(1)
    named_target = attack.has_trigger and config.attack.mode == "all2one"
    manifest = {
        **poisoned.manifest,
        "target_class": bundle.classes[config.attack.target] if named_target else None,
        "dataset": bundle.name,
        "dataset_source": bundle.source,
        "image_shape": list(bundle.image_shape),
        "classes": list(bundle.classes),
        "poisoned_per_class": torch.bincount(original[poison_mask], minlength=bundle.num_classes).tolist(),
        "cross_per_class": torch.bincount(original[cross_mask], minlength=bundle.num_classes).tolist(),
        "files": {
            "poison_mask.npy": "bool (N,) over the training set in load order: trigger inserted",
            "cross_mask.npy": "bool (N,) over the training set in load order: noise/cross sample, label kept",
            "gallery.png": "clean vs poisoned examples, amplified difference, triggered test images",
        },
        "config": {"data": to_dict(config.data), "attack": to_dict(config.attack)},
        "environment": environment(),
        "poisoned_indices": poison_index.tolist(),
        "poisoned_original_labels": original[poison_index].tolist(),
        "poisoned_labels": labels[poison_index].tolist(),
        "cross_indices": cross_mask.nonzero().squeeze(1).tolist(),
    }
    write_array(out / "poison_mask.npy", poison_mask)
    write_array(out / "cross_mask.npy", cross_mask)
    figure = poison_gallery(bundle.train, poisoned, triggered, bundle.classes, rows, seed=config.attack.seed)
    write_figure(figure, out / "gallery.png")
    # last, so a manifest.json on disk means the folder is complete
    write_json(out / "manifest.json", manifest)
    return manifest
