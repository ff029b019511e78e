"""A clean model trained once per (data set, settings) and cached: the surrogate that LC perturbs against and the
model whose neurons Trojan excites. Trained with the one trainer, stored as a bdguard model file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bdguard.config import check_range, to_dict
from bdguard.data.base import DataBundle
from bdguard.errors import BdguardError
from bdguard.hashing import digest
from bdguard.models import MODELS, BackdoorModel, load_model, save_model
from bdguard.progress import log
from bdguard.training.config import TrainConfig
from bdguard.training.factory import model_meta, new_model
from bdguard.training.metrics import accuracy, predict
from bdguard.training.runtime import steps_per_epoch
from bdguard.training.trainer import Trainer, fit, make_augment

if TYPE_CHECKING:  # the attacks import this module: a runtime import of them would be circular
    from bdguard.attacks.base import AttackContext


def _key(bundle: DataBundle, config: TrainConfig) -> str:
    settings = to_dict(config)
    for volatile in ("device", "threads", "eval_batch_size"):
        settings.pop(volatile)
    return digest(bundle.name, settings, bundle.train.images, bundle.train.labels)


def clean_model(
    bundle: DataBundle, config: TrainConfig, cache_dir: Path, device: torch.device, quiet: bool = False
) -> BackdoorModel:
    """A model trained on `bundle.train` (clean) with `config`, loaded from `cache_dir/models` when it exists."""
    name = bundle.name.replace(":", "_").replace("/", "_")
    path = Path(cache_dir) / "models" / f"clean-{name}-{config.model}-{_key(bundle, config)}.safetensors"
    if path.exists():
        model, _ = load_model(path, device)
        return model
    log(f"training a clean {config.model} on {bundle.name} for {config.epochs} epochs (cached in {path})")
    model = new_model(bundle, config, device)
    steps = steps_per_epoch(len(bundle.train), config.batch_size)
    trainer = Trainer(model, config, device, make_augment(config, bundle.flip), steps)
    fit(trainer, bundle.train, lambda m: {}, quiet=quiet)
    meta = model_meta(model, bundle, {"train": to_dict(config), "purpose": "clean surrogate"})
    save_model(model.to(memory_format=torch.contiguous_format).eval(), path, meta)
    return model.eval()


def check_surrogate(prefix: str, model: str, epochs: int) -> None:
    """Refuse an unknown surrogate architecture or epoch count where the parameters enter."""
    if model not in MODELS:
        raise BdguardError(f"{prefix}.surrogate_model must be one of {', '.join(MODELS.names())}; got {model!r}")
    check_range(f"{prefix}.surrogate_epochs", epochs, 1)


def train_surrogate(
    bundle: DataBundle, context: AttackContext, model: str, epochs: int
) -> tuple[BackdoorModel, dict[str, Any]]:
    """The cached clean model an attack learns from, in eval mode, and its description for the manifest."""
    config = TrainConfig(model=model, epochs=epochs)
    surrogate = clean_model(bundle, config, context.cache_dir, context.device, context.quiet).eval()
    test_accuracy = accuracy(predict(surrogate, bundle.test.images), bundle.test.labels)
    return surrogate, {"model": model, "epochs": epochs, "test_accuracy": test_accuracy}
