from bdguard.registry import Registry

ATTACKS: Registry = Registry("attack")
