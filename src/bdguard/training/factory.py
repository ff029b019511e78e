"""A fresh model for a data set and its model-file description: the two things every trained model needs."""

from __future__ import annotations

from typing import Any

import torch

from bdguard.data.base import DataBundle
from bdguard.models import BackdoorModel, ModelMeta, build_model
from bdguard.training.config import TrainConfig
from bdguard.training.runtime import seed_everything


def new_model(bundle: DataBundle, config: TrainConfig, device: torch.device) -> BackdoorModel:
    """The architecture of `config`, initialised from `config.seed`, on `device`."""
    seed_everything(config.seed)
    channels = bundle.image_shape[0]
    model = build_model(config.model, bundle.num_classes, channels, bundle.mean, bundle.std, **config.model_kwargs)
    return model.to(device)


def model_meta(bundle: DataBundle, config: TrainConfig, extra: dict[str, Any]) -> ModelMeta:
    return ModelMeta(
        architecture=config.model,
        arch_kwargs=dict(config.model_kwargs),
        num_classes=bundle.num_classes,
        classes=list(bundle.classes),
        input_shape=list(bundle.image_shape),
        mean=list(bundle.mean),
        std=list(bundle.std),
        dataset=bundle.name,
        extra=extra,
    )
