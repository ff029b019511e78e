"""Poisoning attacks, one file each, registered by name in `ATTACKS`."""

from bdguard.attacks import badnets, blended, iad, lc, none, sig, trojan, wanet  # noqa: F401  (registration)
from bdguard.attacks.base import Attack, AttackConfig, AttackContext
from bdguard.attacks.registry import ATTACKS


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
