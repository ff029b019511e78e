"""Poisoned-sample detectors, one file each, registered by name in `DETECTORS`."""

from bdguard.detectors import abl, activation_clustering, spectral, strip, vab  # noqa: F401  (registration)
from bdguard.detectors.base import Detection, DetectionJob, Detector, DetectorConfig
from bdguard.detectors.registry import DETECTORS


def build_detector(config: DetectorConfig) -> Detector:
    return DETECTORS.get(config.name)(config)


__all__ = ["DETECTORS", "Detection", "DetectionJob", "Detector", "DetectorConfig", "build_detector"]
