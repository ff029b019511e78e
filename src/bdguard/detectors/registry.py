from bdguard.registry import Registry

DETECTORS: Registry = Registry("detector")
