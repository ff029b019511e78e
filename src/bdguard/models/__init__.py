"""Image classifiers with one interface (`features` -> `classify`), a registry, and safetensors model files."""

from bdguard.models.base import MODELS, BackdoorModel, build_model
from bdguard.models.io import ModelMeta, load_model, save_model
from bdguard.registry import import_modules

import_modules(__name__, __path__)  # every file registers what it defines

__all__ = ["MODELS", "BackdoorModel", "ModelMeta", "build_model", "load_model", "save_model"]
