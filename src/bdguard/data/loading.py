"""Load a data set by name into a `DataBundle`, decoding it at most once per source identity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bdguard.data import cache
from bdguard.data.base import DataBundle, ImageSet, channel_stats
from bdguard.data.config import DataConfig
from bdguard.data.sources import DATASETS, DatasetSource, RawSplits
from bdguard.errors import BdguardError
from bdguard.progress import log

ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def make_source(config: DataConfig) -> DatasetSource:
    """The source for `config.dataset`: a registered name, or "<name>:<argument>" as in imagefolder:<path>."""
    name, sep, arg = config.dataset.partition(":")
    return DATASETS.get(name)(config, arg if sep else None)


def class_index(config: DataConfig, name: str) -> int:
    """The label of the class called `name` (as `bdguard datasets` and the model files spell it), read from the data
    set's registry entry or its class folders, without decoding an image."""
    classes = make_source(config).class_names()
    if classes is None:
        raise BdguardError(f"{config.dataset} names its classes only once decoded: give the target as a class index")
    if name not in classes:
        shown = ", ".join(repr(c) for c in classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise BdguardError(f"{config.dataset} has no class {name!r}; its classes: {shown}")
    return classes.index(name)


def known_class_count(config: DataConfig) -> int | None:
    """The data set's class count where its registry entry knows it without reading a file."""
    return make_source(config).num_classes


def load_dataset(config: DataConfig) -> DataBundle:
    """The data set as CPU tensors (the caller moves them to its device).

    Cacheable sources are decoded once and then memory-mapped from <cache_dir>/<name>-<hash>/ (copy-on-write:
    editing the tensors in place is safe and never changes the cache). `extra` holds "cache" (that folder, or
    None for sets built in memory) and "from_cache" (whether this call read it instead of decoding).
    """
    source = make_source(config)
    extra: dict[str, Any] = {"cache": None, "from_cache": False}
    if not source.cacheable:
        raw, stats = _decode(source)
    else:
        identity = source.identity()
        entry = cache.entry_dir(config.cache_path(), source.name, identity)
        hit = _from_cache(entry, identity)
        if hit is None:
            with cache.building(entry):
                hit = _from_cache(entry, identity)  # another process may have built it while this one waited
                if hit is None:
                    log(f"decoding {source.bundle_name} once (it will be cached in {entry})")
                    raw, stats = _decode(source)
                    info = {"classes": list(raw.classes), "source": raw.source, "mean": stats[0], "std": stats[1]}
                    info["train_files"] = None if raw.train_files is None else list(raw.train_files)
                    cache.save_entry(entry, identity, {key: getattr(raw, key) for key in ARRAYS}, info)
        if hit is not None:
            raw, stats = hit
            extra["from_cache"] = True
        extra["cache"] = str(entry)
    mean, std = stats
    train = ImageSet(torch.from_numpy(raw.train_images), torch.from_numpy(raw.train_labels), raw.train_files)
    return DataBundle(
        name=source.bundle_name,
        train=train if config.train_size is None else training_subset(train, config.train_size),
        test=ImageSet(torch.from_numpy(raw.test_images), torch.from_numpy(raw.test_labels)),
        classes=raw.classes,
        mean=tuple(mean),
        std=tuple(std),
        flip=source.flip,
        source=raw.source,
        extra=extra,
    )


def training_subset(train: ImageSet, size: int) -> ImageSet:
    """`size` training images drawn with a fixed seed, in their original order. The normalisation statistics stay
    those of the whole set, so a model trained on the subset and one trained on everything see the same inputs."""
    if size > len(train):
        raise BdguardError(f"train_size {size} is larger than the training set ({len(train)} images)")
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return train.subset(keep)


def _from_cache(entry: Path, identity: str) -> tuple[RawSplits, tuple[tuple[float, ...], tuple[float, ...]]] | None:
    hit = cache.load_entry(entry, identity)
    if hit is None:
        return None
    arrays, meta = hit
    # a hand-edited or foreign entry is rebuilt rather than trusted: everything the decoder would have checked is
    # checked again on every hit
    try:
        files = meta.get("train_files")
        files = None if files is None else tuple(map(str, files))
        raw = RawSplits(*(arrays[key] for key in ARRAYS), tuple(map(str, meta["classes"])), str(meta["source"]), files)
        raw.validate(str(entry))
        mean, std = tuple(float(m) for m in meta["mean"]), tuple(float(s) for s in meta["std"])
    except (KeyError, TypeError, ValueError, BdguardError):
        return None
    channels = raw.train_images.shape[1]
    if len(mean) != channels or len(std) != channels or not all(map(math.isfinite, mean + std)) or min(std) < 0:
        return None
    return raw, (mean, std)


def _decode(source: DatasetSource) -> tuple[RawSplits, tuple[tuple[float, ...], tuple[float, ...]]]:
    raw = source.load()
    raw.validate(source.bundle_name)
    if source.mean is not None and source.std is not None:
        return raw, (source.mean, source.std)  # reference constants; computing them would cost seconds
    return raw, channel_stats(torch.from_numpy(raw.train_images))


def dataset_status() -> list[dict[str, Any]]:
    """One row per registered data set: name, description, available offline, and where it would come from."""
    rows = []
    for name in DATASETS.names():
        source = DATASETS.get(name)(DataConfig(dataset=name))
        available, where = source.status()
        shown = f"{name}:{source.argument}" if source.takes_arg() else name
        rows.append({"name": shown, "description": source.description, "available": available, "where": where})
    return rows
