"""abl: ABL's isolation (Li et al., NeurIPS 2021; docs/methods/abl.md) as a stand-alone detector, through the same
functions the defense runs: a fresh network trained with the LGA loss (which stops every batch's loss at gamma, so
only what is learned fastest, mostly poison, goes far below it), then each sample's loss; the `isolation_ratio`
lowest are flagged. Score: the negative loss. The isolation lasts `isolation_epochs`, or `isolation_share` of the
run's --epochs."""

from __future__ import annotations

from dataclasses import dataclass

from bdguard.defenses.abl import IsolationParams, isolate, isolation_config, sample_losses, train_isolation_model
from bdguard.detectors.base import Detection, DetectionJob, Detector
from bdguard.detectors.registry import DETECTORS
from bdguard.training.factory import new_model
from bdguard.training.runtime import Runtime


@dataclass
class AblDetectorParams(IsolationParams):
    pass


@DETECTORS.register
class AblDetector(Detector):
    name = "abl"
    description = "ABL's isolation (Li et al., NeurIPS 2021): trained with LGA, the lowest-loss samples are poison"
    uses_model = False
    Params = AblDetectorParams

    def detect(self, job: DetectionJob) -> Detection:
        params: IsolationParams = self.params
        config = isolation_config(job.train, params)
        model = new_model(job.bundle, config, job.device)
        train_isolation_model(model, job.data, config, params.gamma, device=job.device, quiet=job.quiet)
        losses = sample_losses(model, job.data, job.train.eval_batch_size, Runtime(job.device, amp=False))
        flagged = isolate(losses, params.isolation_ratio)
        rule = (
            f"the lowest {params.isolation_ratio:g} of losses after {config.epochs} LGA epochs (gamma {params.gamma:g})"
        )
        return Detection(-losses, flagged, rule)
