"""Defenses, one file each, registered by name in `DEFENSES`."""

from bdguard.defenses import abl, anp, neural_cleanse, none, pruning, vab  # noqa: F401  (registration)
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
