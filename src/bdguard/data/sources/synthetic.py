"""synthetic: a seeded toy set for tests and smoke runs, learnable to > 90% by a small CNN in a few epochs.

Each class has a smooth random prototype (a 4x4 random image upsampled to 16x16, made left-right symmetric so a
horizontal flip keeps the label); a sample is its class prototype plus Gaussian pixel noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bdguard.data.sources import DATASETS, DatasetSource, RawSplits

SEED = 0
NUM_CLASSES = 10
SHAPE = (3, 16, 16)
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50
NOISE = 40.0  # pixel std on the 0..255 scale: classes overlap per pixel, yet are far apart as images


@DATASETS.register
class Synthetic(DatasetSource):
    name = "synthetic"
    num_classes = NUM_CLASSES
    classes = tuple(f"class{i}" for i in range(NUM_CLASSES))
    description = "synthetic: seeded toy set, 10 classes of 3x16x16, 2000 train / 500 test (for tests)"
    flip = True
    cacheable = False  # generated in milliseconds
    native_size = SHAPE[1]

    def locate(self) -> str | None:
        return "generated in code (seed 0)"

    def identity(self) -> str:
        return "synthetic-v1"

    def load(self) -> RawSplits:
        rng = np.random.default_rng(SEED)
        coarse = torch.from_numpy(rng.uniform(0.0, 255.0, size=(NUM_CLASSES, SHAPE[0], 4, 4)))
        prototypes = F.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False).numpy()
        prototypes = (prototypes + prototypes[..., ::-1]) / 2

        def sample(per_class: int) -> tuple[np.ndarray, np.ndarray]:
            labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), per_class))
            images = prototypes[labels] + rng.normal(0.0, NOISE, size=(len(labels), *SHAPE))
            return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels

        train, test = sample(TRAIN_PER_CLASS), sample(TEST_PER_CLASS)
        return RawSplits(*train, *test, self.classes, "synthetic (seed 0, generated)")
