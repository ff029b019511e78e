"""Training and evaluation: one loop, one set of metrics, used by every method."""

from bdguard.training.config import TrainConfig
from bdguard.training.metrics import Evaluator, evaluate, predict
from bdguard.training.runtime import resolve_device, seed_everything
from bdguard.training.trainer import Trainer, fit

__all__ = ["Evaluator", "TrainConfig", "Trainer", "evaluate", "fit", "predict", "resolve_device", "seed_everything"]
