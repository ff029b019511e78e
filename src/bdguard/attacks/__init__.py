"""Poisoning attacks, one file each, registered by name in `ATTACKS`."""

from bdguard.attacks.base import Attack, AttackConfig, AttackContext
from bdguard.attacks.registry import ATTACKS
from bdguard.registry import import_modules

import_modules(__name__, __path__)  # every file registers what it defines


def check_attack(config: AttackConfig) -> None:
    """Refuse an unknown attack or a bad option of it before any data is read (the target's range needs the data
    set and is checked when the attack is built)."""
    ATTACKS.get(config.name).parse_params(config.params)


def build_attack(config: AttackConfig, num_classes: int, image_shape: tuple[int, int, int]) -> Attack:
    """The attack named in `config`, its parameters validated."""
    return ATTACKS.get(config.name)(config, num_classes, image_shape)


__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "build_attack",
    "check_attack",
]
