"""vab: V&B's Victim as a stand-alone detector (docs/methods/vab.md), running the defense's own warm-up
(splitter.py): one Victim epoch on all data, then `warm_up - 1` epochs on what it flags, each followed by a scoring
round (prediction entropy, smoothed, min-max normalised); flagged = normalised entropy at or below the round's tau,
and with `split_rule=labels` (the default) only inside the labels the label rule finds attacked, as the defense's
first split."""

from __future__ import annotations

from dataclasses import dataclass

from bdguard.defenses.vab.config import VictimParams
from bdguard.defenses.vab.splitter import Splitter
from bdguard.detectors.base import Detection, DetectionJob, Detector
from bdguard.detectors.registry import DETECTORS
from bdguard.progress import log
from bdguard.training.runtime import Runtime


@dataclass
class VabDetectorParams(VictimParams):
    pass


@DETECTORS.register
class VabDetector(Detector):
    name = "vab"
    description = "V&B's Victim (Zhu et al., ICCV 2023): trained on what it flags, low prediction entropy = poisoned"
    uses_model = False
    Params = VabDetectorParams

    def detect(self, job: DetectionJob) -> Detection:
        params: VictimParams = self.params
        runtime = Runtime(job.device, job.train.amp, job.train.channels_last, job.quiet)
        victim = Splitter(job.bundle, job.data, job.train, params, runtime)
        rounds = []

        def scored(tau: float) -> None:
            flagged = int(victim.flagged.sum())
            rounds.append({"round": victim.detector.rounds, "tau": tau, "flagged": flagged})
            log(f"vab: round {victim.detector.rounds} (tau {tau:g}): {flagged} of {len(job.data)} flagged")

        victim.warm_up(scored)
        rule = f"normalised entropy <= {rounds[-1]['tau']:g} (round {victim.detector.rounds})"
        extra = {"rounds": rounds}
        flagged = victim.guarded()
        if params.split_rule == "labels":
            extra["attacked_labels"] = victim.guard.attacked.nonzero().flatten().tolist()
            if victim.guard.attacked.any():
                rule += ", inside the attacked label(s) " + ", ".join(map(str, extra["attacked_labels"]))
        return Detection(scores=1.0 - victim.detector.normalised(), flagged=flagged, threshold=rule, extra=extra)
