from bdguard.registry import Registry

DEFENSES: Registry = Registry("defense")
