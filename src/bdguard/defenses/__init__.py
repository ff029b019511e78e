"""Defenses, one file each, registered by name in `DEFENSES`."""

from bdguard.defenses.base import (
    Defense,
    DefenseConfig,
    DefenseResult,
    Figure,
    PostTrainingDefense,
    RepairJob,
    TrainingDefense,
    TrainingJob,
)
from bdguard.defenses.registry import DEFENSES
from bdguard.registry import import_modules

import_modules(__name__, __path__)  # every file registers what it defines


def build_defense(config: DefenseConfig) -> Defense:
    return DEFENSES.get(config.name)(config)


__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseConfig",
    "DefenseResult",
    "Figure",
    "PostTrainingDefense",
    "RepairJob",
    "TrainingDefense",
    "TrainingJob",
    "build_defense",
]
