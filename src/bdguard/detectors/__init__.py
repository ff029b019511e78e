"""Poisoned-sample detectors, one file each, registered by name in `DETECTORS`."""

from bdguard.detectors.base import Detection, DetectionJob, Detector, DetectorConfig
from bdguard.detectors.registry import DETECTORS
from bdguard.registry import import_modules

import_modules(__name__, __path__)  # every file registers what it defines


def build_detector(config: DetectorConfig) -> Detector:
    return DETECTORS.get(config.name)(config)


__all__ = ["DETECTORS", "Detection", "DetectionJob", "Detector", "DetectorConfig", "build_detector"]
