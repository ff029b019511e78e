"""A fresh model for a data set and its model-file description: the two things every trained model needs."""

from __future__ import annotations

import copy
from typing import Any

import torch

from bdguard.data.base import DataBundle
from bdguard.errors import BdguardError
from bdguard.models import BackdoorModel, ModelMeta, build_model
from bdguard.models.base import check_image_size
from bdguard.training.config import TrainConfig
from bdguard.training.runtime import seed_everything


def new_model(
    bundle: DataBundle, config: TrainConfig, device: torch.device, initial: BackdoorModel | None = None
) -> BackdoorModel:
    """The architecture of `config`, initialised from `config.seed`, on `device`; or a copy of `initial`, a model
    a Python caller built (bdguard.api), each defense network starting from its weights."""
    if initial is not None:
        check_initial(initial, bundle)
        model = copy.deepcopy(initial).to(device)
    else:
        seed_everything(config.seed)
        channels = bundle.image_shape[0]
        model = build_model(config.model, bundle.num_classes, channels, bundle.mean, bundle.std, **config.model_kwargs)
        model = model.to(device)
    check_image_size(model, bundle.image_shape, bundle.name)
    return model


def check_initial(model: BackdoorModel, bundle: DataBundle) -> None:
    """Refuse a caller's model that does not take the data set's images or answer its classes."""
    if model.num_classes != bundle.num_classes or model.in_channels != bundle.image_shape[0]:
        raise BdguardError(
            f"the model answers {model.num_classes} classes of {model.in_channels}-channel images, but {bundle.name} "
            f"has {bundle.num_classes} classes of {bundle.image_shape[0]}-channel images"
        )


def model_meta(model: BackdoorModel, bundle: DataBundle, extra: dict[str, Any]) -> ModelMeta:
    """The model file's description of `model`, trained on `bundle`: its architecture, options and normalisation
    as it was built (the data's, unless a caller built it), the data set's classes and image shape."""
    return ModelMeta(
        architecture=model.architecture,
        arch_kwargs=dict(model.options),
        num_classes=bundle.num_classes,
        classes=list(bundle.classes),
        input_shape=list(bundle.image_shape),
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        dataset=bundle.name,
        extra=extra,
    )
