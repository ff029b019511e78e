"""The data layer: registered data sets, loaded once into uint8 tensors and cached decoded on disk."""

from bdguard.data.base import DataBundle, ImageSet
from bdguard.data.config import DataConfig
from bdguard.data.loading import dataset_status, load_dataset
from bdguard.data.sources import DATASETS

__all__ = ["DATASETS", "DataBundle", "DataConfig", "ImageSet", "dataset_status", "load_dataset"]
