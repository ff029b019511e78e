"""digits: scikit-learn's bundled 8x8 handwritten digits (1797 images), split 80/20 by class with seed 0."""

from __future__ import annotations

import numpy as np

from bdguard.data.sources import DATASETS, DatasetSource, RawSplits
from bdguard.errors import BdguardError

SPLIT_SEED = 0


@DATASETS.register
class Digits(DatasetSource):
    name = "digits"
    num_classes = 10
    classes = tuple(str(digit) for digit in range(10))
    description = "scikit-learn digits: 10 classes of 8x8 grayscale digits, 1797 images split 80/20"
    flip = False  # a mirrored digit is another glyph
    cacheable = False  # bundled and tiny: building it is cheaper than a cache entry
    native_size = 8

    def locate(self) -> str | None:
        return "bundled with scikit-learn"

    def identity(self) -> str:
        return "digits-v1"

    def load(self) -> RawSplits:
        # Imported here: scikit-learn is slow to import.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        # Values are counts 0..16 (on-pixels in 4x4 blocks of the 32x32 originals); map them onto 0..255.
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
        labels = digits.target.astype(np.int64)
        train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=SPLIT_SEED)
        train, test = np.sort(train), np.sort(test)
        classes = tuple(str(name) for name in digits.target_names)
        if classes != self.classes:
            raise BdguardError(f"scikit-learn's digits have the classes {classes}, not {self.classes}")
        return RawSplits(images[train], labels[train], images[test], labels[test], classes, "scikit-learn load_digits")
