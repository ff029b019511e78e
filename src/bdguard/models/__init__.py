"""Image classifiers with one interface (`features` -> `classify`), a registry, and safetensors model files."""

from bdguard.models import alexnet, preact_resnet, resnet, small_cnn  # noqa: F401 (importing registers the architectures)
from bdguard.models.base import MODELS, BackdoorModel, build_model
from bdguard.models.io import ModelMeta, load_model, save_model

__all__ = ["MODELS", "BackdoorModel", "ModelMeta", "build_model", "load_model", "save_model"]
