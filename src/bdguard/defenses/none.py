"""No defense: plain training on the training set as given."""

from __future__ import annotations

from bdguard.defenses.base import DefenseResult, TrainingDefense, TrainingJob
from bdguard.defenses.registry import DEFENSES
from bdguard.training.runtime import steps_per_epoch
from bdguard.training.trainer import Trainer, fit, make_augment


@DEFENSES.register
class NoDefense(TrainingDefense):
    name = "none"
    description = "plain training on the (possibly poisoned) training set"
    data_parallel = True

    def train(self, job: TrainingJob) -> DefenseResult:
        model = job.new_model()
        steps = steps_per_epoch(len(job.poisoned.train), job.train.batch_size)
        trainer = Trainer(model, job.train, job.device, make_augment(job.train, job.bundle.flip), steps)
        fit(
            trainer,
            job.poisoned.train,
            job.evaluate,
            job.run_dir,
            fingerprint=job.fingerprint,
            resume=job.resume,
            quiet=job.quiet,
            clock=job.clock,
        )
        return DefenseResult(model)
