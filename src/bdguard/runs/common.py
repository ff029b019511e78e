"""What every run shares: the environment record, the settings hash, loading and poisoning the data, the checks
made before anything slow, the device, and the names of the files a run folder holds."""

from __future__ import annotations

import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdguard import __version__, distributed
from bdguard.attacks import Attack, AttackConfig, AttackContext, build_attack, check_attack
from bdguard.attacks.store import load_poisoned, poison_key, store_poisoned
from bdguard.config import from_dict
from bdguard.data import DataBundle, DataConfig, load_dataset
from bdguard.data.base import ImageSet, PoisonedSet, TriggeredSet
from bdguard.data.loading import known_class_count
from bdguard.errors import BdguardError
from bdguard.hashing import digest, settings_dict
from bdguard.io import write_text
from bdguard.models import ModelMeta
from bdguard.progress import log
from bdguard.training import TrainConfig, resolve_device

MODEL = "model.safetensors"
RESULTS = "results.json"


def use_device(train: TrainConfig) -> torch.device:
    """The run's device, with torch's CPU threads set as the settings ask; under torchrun this rank's device, in
    the launcher's process group."""
    if train.threads:
        torch.set_num_threads(train.threads)
    return distributed.start(resolve_device(train.device))


def environment() -> dict[str, Any]:
    """What produced a result: versions, machine, command line."""
    return {
        "bdguard": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads",
        "processes": distributed.world(),  # data-parallel ranks (torchrun)
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": shlex.join(["bdguard", *sys.argv[1:]]),
    }


def fingerprint(config: Any) -> str:
    """A hash of everything that shapes the result (a checkpoint of other settings is refused); the device and
    thread count may change on resume."""
    return digest(settings_dict(config))


def prepare_data(config: DataConfig, device: torch.device) -> DataBundle:
    bundle = load_dataset(config)
    sizes = f"{len(bundle.train)} train / {len(bundle.test)} test images {bundle.image_shape}"
    log(f"{bundle.name}: {sizes} from {bundle.source}")
    return bundle.to(device)


def check_before_loading(data: DataConfig, attack: AttackConfig) -> None:
    """What can be refused before minutes of decoding: the attack and its options, and its target where the data
    set's registry entry knows the class count."""
    check_attack(attack)
    classes = known_class_count(data)
    if classes is not None and attack.target >= classes:
        raise BdguardError(f"attack target {attack.target} is not a class ({data.dataset} has {classes})")


@dataclass(frozen=True)
class RunData:
    """What a command runs on: the data set on the device, the attack prepared on it and, where the command poisons,
    the poisoned training set."""

    bundle: DataBundle
    attack: Attack
    poisoned: PoisonedSet | None

    def triggered(self, clean: ImageSet) -> TriggeredSet | None:
        """`clean`'s non-target images with the attack's trigger (None for no attack)."""
        return self.attack.test_set(clean) if self.attack.has_trigger else None


def set_up(
    data: DataConfig,
    attack_config: AttackConfig,
    device: torch.device,
    quiet: bool,
    *,
    models: tuple[tuple[ModelMeta, str | Path], ...] = (),
    poison: bool = False,
    poison_store: str | Path | None = None,
) -> RunData:
    """The one set-up of every command: load the data, refuse a model (meta, path) of other images or classes,
    prepare the attack on the data and, with `poison`, poison the training set (or read it from `poison_store`, a
    folder of stored poisoned sets) less the samples `data.exclude` names."""
    bundle = prepare_data(data, device)
    for meta, path in models:
        check_model_data(meta, bundle, path)
    attack = build_attack(attack_config, bundle.num_classes, bundle.image_shape)
    attack.prepare(bundle, AttackContext(device, data.cache_path(), quiet))
    if not poison:
        return RunData(bundle, attack, None)
    store = None if poison_store is None else Path(poison_store)
    if store is None:
        poisoned = attack.poison(bundle.train)
    else:
        key = poison_key(bundle.name, bundle.train, attack_config)
        poisoned = load_poisoned(store / key, key, bundle.train)
        if poisoned is None:
            poisoned = attack.poison(bundle.train)
            store_poisoned(store / key, key, poisoned)
        else:
            log(f"poisoned set read from {store / key}")
    if data.exclude is not None:
        poisoned = without(poisoned, excluded_samples(Path(data.exclude), poisoned.train), data.exclude)
    return RunData(bundle, attack, poisoned)


def excluded_samples(path: Path, train: ImageSet) -> torch.Tensor:
    """bool (N,): the training samples that `data.exclude` names: a .npy file of flags or of indices, or a text file
    of file names, one per line (for a set read from files)."""
    where = f"data.exclude {path}"
    size = len(train)
    if path.suffix != ".npy":
        return _named_samples(path, train, where)
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BdguardError(f"{where}: not a readable .npy array ({exc})") from None
    if values.dtype == np.bool_ and values.shape == (size,):
        return torch.from_numpy(values.copy())
    if np.issubdtype(values.dtype, np.integer) and values.ndim == 1:
        if values.size and (values.min() < 0 or values.max() >= size):
            raise BdguardError(f"{where}: an index outside the {size} training samples")
        mask = torch.zeros(size, dtype=torch.bool)
        mask[torch.from_numpy(values.astype(np.int64))] = True
        return mask
    raise BdguardError(
        f"{where} holds {values.dtype} {tuple(values.shape)}: expected bool flags over the {size} training samples "
        "(detect's flagged.npy) or sample indices"
    )


def _named_samples(path: Path, train: ImageSet, where: str) -> torch.Tensor:
    if train.files is None:
        raise BdguardError(f"{where}: this data set was not read from files, so give a .npy of flags or indices")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BdguardError(f"{where}: not a readable text file of file names ({exc})") from None
    row = {name: i for i, name in enumerate(train.files)}
    unknown = [name for name in names if name not in row]
    if unknown:
        raise BdguardError(
            f"{where}: {len(unknown)} name(s) are not training files, e.g. {unknown[0]!r} (names are paths below the "
            f"data folder, as in detect's scores.csv, e.g. {train.files[0]!r})"
        )
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[[row[name] for name in names]] = True
    return mask


def without(poisoned: PoisonedSet, dropped: torch.Tensor, source: str) -> PoisonedSet:
    """The poisoned set less the `dropped` samples; the manifest counts them (and, from the ground truth the
    manifest already holds, how many were poisoned)."""
    dropped = dropped.to(poisoned.poison_mask.device)
    if bool(dropped.all()):
        raise BdguardError(f"data.exclude {source} leaves out every training sample")
    keep = ~dropped
    log(f"left out {int(dropped.sum())} of {len(dropped)} training samples listed in {source}")
    manifest = {
        **poisoned.manifest,
        "excluded": int(dropped.sum()),
        "excluded_poisoned": int((dropped & poisoned.poison_mask).sum()),
        "excluded_from": source,
    }
    masks = (poisoned.poison_mask[keep], poisoned.cross_mask[keep], poisoned.original_labels[keep])
    return PoisonedSet(poisoned.train.subset(keep), *masks, manifest)


def recorded_attack(meta: ModelMeta) -> AttackConfig:
    """The attack a model file says it was trained under (no attack when it says nothing)."""
    recorded = meta.extra.get("attack")
    return from_dict(AttackConfig, recorded) if recorded else AttackConfig()


def check_model_data(meta: ModelMeta, bundle: DataBundle, model_path: str | Path) -> None:
    """Refuse a model of other images or classes than the data set's; a model of another data set with the same
    classes (a copy of it, an image folder of it) is taken, with a word."""
    if list(bundle.image_shape) != list(meta.input_shape) or bundle.num_classes != meta.num_classes:
        raise BdguardError(
            f"model {model_path} expects {meta.num_classes} classes of {tuple(meta.input_shape)} images, "
            f"but {bundle.name} has {bundle.num_classes} classes of {bundle.image_shape} images"
        )
    if list(meta.classes) != list(bundle.classes):
        pairs = zip(meta.classes, bundle.classes, strict=True)
        shown = [f"{mine!r} / {theirs!r}" for mine, theirs in pairs if mine != theirs]
        raise BdguardError(
            f"model {model_path} was trained on {meta.dataset}, whose classes differ from {bundle.name}'s "
            f"({', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}): its figures would be meaningless"
        )
    if meta.dataset != bundle.name:
        log(f"note: model {model_path} was trained on {meta.dataset}; it reads {bundle.name}, of the same classes")


def write_scores(
    path: Path, scores: torch.Tensor, flagged: torch.Tensor, data: ImageSet, truth: torch.Tensor | None = None
) -> None:
    """A detector's verdict per training sample as CSV: index, label, score (higher = more suspicious), flagged, the
    file for a set read from files (data.exclude takes those names), and `poisoned` where the truth is given."""
    columns = [np.arange(scores.numel()).astype(str), data.labels.cpu().numpy().astype(str)]
    columns += [np.char.mod("%.6g", scores.float().cpu().numpy()), np.where(flagged.cpu().numpy(), "yes", "no")]
    header = "index,label,score,flagged"
    if data.files is not None:
        columns.append(np.array([_csv_field(name) for name in data.files], dtype=str))
        header += ",file"
    if truth is not None:
        columns.append(np.where(truth.cpu().numpy(), "yes", "no"))
        header += ",poisoned"
    rows = columns[0]
    for column in columns[1:]:
        rows = np.char.add(np.char.add(rows, ","), column)
    write_text(path, header + "\n" + "".join(np.char.add(rows, "\n")))


def _csv_field(text: str) -> str:
    """A file name as one CSV field: quoted (quotes doubled) where it holds a comma, a quote or a line break."""
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text
