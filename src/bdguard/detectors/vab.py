"""vab: V&B's Victim as a stand-alone detector (docs/methods/vab.md). The same functions the defense's warm-up
runs: one Victim epoch on all data, then `warm_up - 1` epochs on what it flags, each followed by a scoring round
(prediction entropy, smoothed, min-max normalised); flagged = normalised entropy at or below the round's tau, and
with `split_rule=labels` (the default) only inside the labels the label rule finds attacked, as the defense's first
split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdguard.defenses.vab.config import VictimParams
from bdguard.defenses.vab.defense import victim_train_config
from bdguard.defenses.vab.labels import LabelGuard
from bdguard.defenses.vab.schedule import threshold
from bdguard.defenses.vab.victim import EntropyDetector, entropy_scores, entropy_split, victim_epoch, victim_logits
from bdguard.detectors.base import Detection, DetectionJob, Detector
from bdguard.detectors.registry import DETECTORS
from bdguard.progress import log
from bdguard.training.factory import new_model
from bdguard.training.runtime import Runtime, check_finite, epoch_generator


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
        config = victim_train_config(job.train, params, len(job.data))
        runtime = Runtime(job.device, job.train.amp, job.train.channels_last, job.quiet)
        victim = runtime.prepare(new_model(job.bundle, config, job.device))
        optimizer = torch.optim.Adam(victim.parameters(), lr=params.victim_lr, weight_decay=params.victim_weight_decay)
        detector = EntropyDetector(params.ema)
        chosen = torch.arange(len(job.data), device=job.device)
        rounds = []
        for epoch in range(params.warm_up):
            generator = epoch_generator(config.seed, epoch, job.device)
            label = f"victim epoch {epoch + 1}/{params.warm_up}"
            loss = victim_epoch(victim, optimizer, job.data, chosen, config.batch_size, generator, runtime, label)
            check_finite(loss, label, f"the Victim's learning rate (vab.victim_lr = {params.victim_lr:g})")
            logits = victim_logits(victim, job.data.images, job.train.eval_batch_size, runtime)
            normalised = detector.update(entropy_scores(logits))
            tau = threshold(detector.rounds, params)
            flagged = entropy_split(normalised, tau)
            chosen = flagged.nonzero().flatten()
            rounds.append({"round": detector.rounds, "tau": tau, "flagged": chosen.numel()})
            log(f"vab: round {detector.rounds} (tau {tau:g}): {chosen.numel()} of {len(job.data)} flagged")
        rule = f"normalised entropy <= {tau:g} (round {detector.rounds})"
        extra = {"rounds": rounds}
        if params.split_rule == "labels":
            guard = LabelGuard(params.label_rule(), job.bundle.num_classes, job.bundle.classes)
            guard.train_check(job.bundle, job.data, flagged, job.train, params.check_epochs, runtime)
            flagged = guard.split(flagged, job.data.labels, detector.history)
            extra["attacked_labels"] = guard.attacked.nonzero().flatten().tolist()
            if guard.attacked.any():
                rule += ", inside the attacked label(s) " + ", ".join(map(str, extra["attacked_labels"]))
        return Detection(scores=1.0 - normalised, flagged=flagged, threshold=rule, extra=extra)
