"""V&B as a training defense: the Victim/Beneficiary schedule of docs/methods/vab.md 5 on the run's budget, a checkpoint
after the Victim's warm-up and after every Beneficiary epoch, and the run folder's V&B files.

Three masks: the Victim's flags (the entropy rule of docs/methods/vab.md 1; the Victim trains on them), the guarded
split (with `split_rule=labels`, the default, only the flags inside the labels found attacked: labels.py), and the
Beneficiary's, which with `refine` (off by default) hands back to C the guarded samples whose given label the
Beneficiary already predicts, during the first `refine_until` of the run.

Run folder: checkpoint.pt (both networks and optimisers, entropy history, splits, counters, metrics), metrics.jsonl
(one row per Beneficiary epoch), detector.jsonl (one row per scoring round), and at the end victim.safetensors,
suspicious.csv (index, normalised entropy, suspicious yes/no: the Beneficiary's last split) and entropy_hist.png.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bdguard import distributed
from bdguard.config import to_dict
from bdguard.defenses.base import DefenseResult, Figure, TrainingDefense, TrainingJob, detector_entry
from bdguard.defenses.registry import DEFENSES
from bdguard.defenses.vab.beneficiary import (
    Beneficiary,
    confirmed_labels,
    label_agreement,
    stage_a_epoch,
    stage_b_epoch,
    unlearn_epoch,
)
from bdguard.defenses.vab.config import PRESETS, VabParams
from bdguard.defenses.vab.labels import disputed
from bdguard.defenses.vab.report import plot_entropy_hist, split_metrics, stage_b_diagnostics, write_suspicious_csv
from bdguard.defenses.vab.schedule import make_vab_schedule
from bdguard.defenses.vab.splitter import Splitter
from bdguard.models import save_model
from bdguard.progress import log, number
from bdguard.training.factory import model_meta
from bdguard.training.runtime import Checkpoint, Runtime, check_finite, epoch_generator
from bdguard.training.schedule import lr_factor, make_optimizer
from bdguard.training.trainer import make_augment

SPLIT_KEYS = ("suspicious", "credible", "residual")  # beyond the contract's detector summary
ENTROPY_CAPTION = "V&B: normalised prediction entropy of clean and poisoned training samples at key rounds"


@DEFENSES.register
class VabDefense(TrainingDefense):
    name = "vab"
    reads_feature_map = True  # AttentionMix
    description = (
        "V&B (Zhu et al., ICCV 2023): a Victim learns the backdoor and flags low-entropy samples, kept only inside "
        "the label(s) a check model finds attacked; the Beneficiary trains on the rest, then unlearns the label of "
        "the flagged samples the check model disputes (preset=paper: the reference method and schedule)"
    )
    Params = VabParams
    presets = {name: preset.params for name, preset in PRESETS.items()}
    data_parallel = True  # both networks; the scoring passes are split over the ranks and gathered

    def train(self, job: TrainingJob) -> DefenseResult:
        return _VabRun(job, self.params).run()


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


class _VabRun:
    """One V&B training run: its networks, the detector's state, and the metrics so far."""

    def __init__(self, job: TrainingJob, params: VabParams) -> None:
        self.job, self.params = job, params
        self.data = job.poisoned.train
        self.schedule = make_vab_schedule(job.train.epochs, params)
        self.runtime = Runtime(job.device, job.train.amp, job.train.channels_last, job.quiet)
        net = self.runtime.prepare(job.new_model())
        self.beneficiary = Beneficiary(
            net,
            make_optimizer(net.parameters(), job.train),
            make_augment(job.train, job.bundle.flip),
            job.train.batch_size,
            job.bundle.num_classes,
            params,
            self.runtime,
        )
        self.victim = Splitter(job.bundle, self.data, job.train, params, self.runtime)
        self.guarded = self.victim.flagged  # the split after the label rule (the Victim's own with split_rule=global)
        self.suspicious = self.guarded  # the Beneficiary's split: the guarded one, less what `refine` took back
        self.taken_back = torch.zeros_like(self.guarded)  # what the last refinement took back from the flagged set
        self.warned_fallback = False
        self.epoch = 0  # the last finished Beneficiary epoch
        self.history: list[dict[str, Any]] = []  # one row per Beneficiary epoch
        self.rounds: list[dict[str, Any]] = []  # one row per scoring round
        self.snapshots: dict[int, dict[str, Any]] = {}  # normalised entropy at the key rounds, for the histogram
        self.seconds = dict.fromkeys(("warm_up", "stage_a", "stage_b", "victim", "evaluation"), 0.0)
        self.key_rounds = self._key_rounds()
        self.checkpoint = (
            Checkpoint(job.run_dir, job.fingerprint, {"metrics.jsonl": "history", "detector.jsonl": "rounds"})
            if job.run_dir is not None
            else None
        )

    def _key_rounds(self) -> dict[int, str]:
        first = self.params.warm_up
        updates = self.schedule.victim_updates
        rounds = {r: "warm-up" for r in range(1, first)}
        rounds[first] = "first split"
        in_a = sum(u <= self.schedule.stage_a for u in updates)
        if in_a and self.schedule.stage_a < self.schedule.epochs:
            rounds[first + in_a] = "end of stage A"
        rounds[first + len(updates)] = "final"
        return rounds

    def run(self) -> DefenseResult:
        name = self.params.preset
        if name is not None and PRESETS[name].epochs != self.schedule.epochs:
            log(f"V&B: preset {name} was made for {PRESETS[name].epochs} epochs ({PRESETS[name].note}); rescaling")
        if self.job.resume and self.checkpoint is not None and self.checkpoint.exists():
            self._load()
            log(f"V&B: resuming after epoch {self.epoch} from {self.checkpoint.path}")
        else:
            began = time.perf_counter()
            self._warm_up()
            self.seconds["warm_up"] += time.perf_counter() - began
            self._save()
        for epoch in range(self.epoch + 1, self.schedule.epochs + 1):
            self._epoch(epoch)
            self._save()
        return self._finish()

    # -- the Victim --------------------------------------------------------------------------------------------

    def _score(self, after_epoch: int) -> None:
        """A scoring round of the Victim, its split guarded, reported against ground truth."""
        self._record(self.victim.score(), after_epoch)

    def _record(self, tau: float, after_epoch: int) -> None:
        self.guarded = self.suspicious = self.victim.guarded()
        number = self.victim.detector.rounds
        row = {"round": number, "after_epoch": after_epoch, "tau": tau}
        row["flagged_by_victim"] = int(self.victim.flagged.sum())
        row["attacked_labels"] = self.victim.guard.attacked.nonzero().flatten().tolist()
        normalised = self.victim.detector.normalised()
        row.update(split_metrics(normalised, self.suspicious, self.job.poisoned))
        self.rounds.append(row)
        if number in self.key_rounds:
            self.snapshots[number] = {"label": self.key_rounds[number], "tau": tau, "normalised": normalised.cpu()}
        log(_round_summary(row))

    def _warm_up(self) -> None:
        """The Victim's warm-up, a round row for each of its scoring rounds; with the label rule, the first split
        guarded by the check model trained after it."""
        self.victim.warm_up(lambda tau: self._record(tau, after_epoch=0))
        if self.params.split_rule == "labels":
            self.guarded = self.suspicious = self.victim.guarded()
            last = self.rounds[-1]
            last["attacked_labels"] = self.victim.guard.attacked.nonzero().flatten().tolist()
            last.update(split_metrics(self.victim.detector.normalised(), self.suspicious, self.job.poisoned))
            log(_round_summary(last))

    # -- the Beneficiary ---------------------------------------------------------------------------------------

    def _lr(self, epoch: int):
        """The Beneficiary's lr within `epoch`, as a function of the share of the epoch done."""
        train, epochs = self.job.train, self.schedule.epochs
        if self.params.lr_schedule == "vab":
            lr = train.lr * self.schedule.lr_factor(epoch, train.gamma)
            return lambda done: lr
        return lambda done: train.lr * lr_factor(train, (epoch - 1 + done) / epochs)

    def _refine(self) -> int:
        """The Beneficiary's split: the guarded suspicious samples minus those whose given label the Beneficiary
        already predicts (with `refine_label_share`, only from labels whose flagged samples it confirms that often).
        After `refine_until` of the run the samples taken back by then stay in C and no new ones are taken back.
        Returns how many flagged samples are in C."""
        flagged = _indices(self.guarded)
        if not self.params.refine or self.epoch == 0 or flagged.numel() == 0:
            self.suspicious = self.guarded
            return 0
        if self.epoch >= round(self.params.refine_until * self.schedule.epochs):
            self.suspicious = self.guarded & ~self.taken_back
            return int((self.guarded & self.taken_back).sum())
        agree = label_agreement(
            self.beneficiary.model,
            self.data,
            flagged,
            self.job.train.eval_batch_size,
            self.runtime,
            self.params.refine_confidence,
        )
        agree &= confirmed_labels(self.data.labels[flagged], agree, self.params.refine_label_share)
        self.suspicious = self.guarded.clone()
        self.suspicious[flagged[agree]] = False
        self.taken_back = self.guarded & ~self.suspicious
        return int(agree.sum())

    def _suppressed(self) -> torch.Tensor | None:
        """The labels whose credible samples the Victim's beliefs suppress: with `suppress_labels=attacked` those the
        label rule found attacked (when it found any), else all (None)."""
        if self.params.suppress_labels == "attacked" and bool(self.victim.guard.attacked.any()):
            return self.victim.guard.attacked
        return None

    def _unlearns(self) -> bool:
        """Stage B unlearns or relabels (`stage_b`) only where the label rule found the attacked label(s): the
        Victim's global split also holds whole easy clean classes, and no check model disputes a clean-label poison."""
        if self.params.stage_b == "suppress":
            return False
        if bool(self.victim.guard.attacked.any()):
            return True
        if not self.warned_fallback:
            wanted = self.params.stage_b
            log(f"V&B: no attacked label found; stage B suppresses as the reference does ({wanted} needs one)")
            self.warned_fallback = True
        return False

    def _epoch(self, epoch: int) -> None:
        train, schedule = self.job.train, self.schedule
        began = time.perf_counter()
        returned = self._refine()
        stage = schedule.stage(epoch)
        generator = epoch_generator(train.seed, epoch, self.job.device)
        credible, suspicious = _indices(~self.suspicious), _indices(self.suspicious)
        label = f"V&B stage {stage} epoch {epoch}/{schedule.epochs}"
        lr = self._lr(epoch)
        row: dict[str, Any] = {"epoch": epoch, "stage": stage, "lr": lr(0.0), "returned": returned}
        row["split"] = split_metrics(self.victim.detector.normalised(), self.suspicious, self.job.poisoned)
        if stage == "A":
            row["alpha"] = None
            beliefs = self.victim.logits if self.params.suppress_stage_a else None
            row.update(
                stage_a_epoch(self.beneficiary, self.data, credible, generator, label, lr, beliefs, self._suppressed())
            )
        elif self._unlearns():
            row["alpha"] = None
            predicted, labels = self.victim.guard.predicted, self.data.labels
            diverse = self.params.unlearn_among == "diverse"
            classes = self.job.bundle.num_classes
            contradicted = _indices(self.suspicious & disputed(labels, predicted, ~self.suspicious, classes, diverse))
            relabel = predicted if self.params.stage_b == "relabel" else None
            args = (self.data, credible, contradicted, self.params.unlearn_weight, generator, label, lr, relabel)
            row.update(unlearn_epoch(self.beneficiary, *args))
            row["unlearned"] = contradicted.numel()
        else:
            row["alpha"] = alpha = schedule.alpha(epoch, self.params)
            args = (self.data, credible, suspicious, alpha, generator, label, lr, self._suppressed())
            result = stage_b_epoch(self.beneficiary, self.victim.logits, *args)
            row.update(result.metrics)
            row.update(stage_b_diagnostics(result.suppression_weight, result.pseudo_label, self.job.poisoned))
        check_finite(row["loss"], label, f"the learning rate (train.lr = {train.lr:g})")
        row["train_seconds"] = time.perf_counter() - began
        self.seconds["stage_a" if stage == "A" else "stage_b"] += row["train_seconds"]

        row["victim_updated"] = epoch in schedule.victim_updates
        row["victim_loss"] = None
        if row["victim_updated"]:
            began_victim = time.perf_counter()
            row["victim_loss"] = self.victim.train_on_flags(f"victim after epoch {epoch}")
            self._score(after_epoch=epoch)
            self.seconds["victim"] += time.perf_counter() - began_victim

        began_eval = time.perf_counter()
        row["victim_ba"] = row["victim_asr"] = None
        main = distributed.is_main()  # the one rank that evaluates and reports; the others go on
        if main:
            row.update(self.job.evaluate(self.beneficiary.model))
        if main and (self.params.evaluate_victim == "every" or epoch == schedule.epochs):
            victim = self.job.evaluate(self.victim.model)
            row["victim_ba"], row["victim_asr"] = victim["ba"], victim["asr"]
        self.seconds["evaluation"] += time.perf_counter() - began_eval
        row["detector"] = dict(self.rounds[-1])
        row["seconds"] = time.perf_counter() - began
        self.history.append(row)
        self.epoch = epoch
        if main:
            log(_epoch_summary(row, schedule.epochs))

    # -- checkpoint and results --------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.checkpoint is None or not distributed.is_main():
            return
        state = {
            "epoch": self.epoch,
            "beneficiary": self.beneficiary.model.state_dict(),
            "beneficiary_optimizer": self.beneficiary.optimizer.state_dict(),
            **self.victim.state_dict(),
            "guarded": self.guarded,
            "suspicious": self.suspicious,
            "taken_back": self.taken_back,
            "history": self.history,
            "rounds": self.rounds,
            "snapshots": self.snapshots,
            "seconds": self.seconds,
        }
        self.checkpoint.save(state, self.job.clock)

    def _load(self) -> None:
        state = self.checkpoint.load(self.job.device, self.job.clock)
        with self.checkpoint.restoring():
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.beneficiary.model.load_state_dict(state["beneficiary"])
        self.beneficiary.optimizer.load_state_dict(state["beneficiary_optimizer"])
        self.victim.load_state_dict(state)
        self.guarded = state["guarded"]
        self.suspicious = state["suspicious"]
        self.taken_back = state["taken_back"]
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.rounds = list(state["rounds"])
        self.snapshots = dict(state["snapshots"])
        self.seconds = dict(state["seconds"])

    def _finish(self) -> DefenseResult:
        returned = self._refine()  # the split the final Beneficiary would train on next
        run_dir = self.job.run_dir
        if run_dir is not None and distributed.is_main():
            self._write_outputs(run_dir)
        last = self.history[-1]
        schedule = self.schedule
        # the split the Beneficiary trained on last; `flagged_by_victim` is the Victim's entropy rule alone
        split_now = split_metrics(self.victim.detector.normalised(), self.suspicious, self.job.poisoned)
        details = {
            "victim": {"ba": last["victim_ba"], "asr": last["victim_asr"]},
            "split": {
                "rounds": len(self.rounds),
                **{key: split_now[key] for key in SPLIT_KEYS},
                "flagged_by_victim": int(self.victim.flagged.sum()),
                "attacked_labels": self.victim.guard.attacked.nonzero().flatten().tolist(),
                "returned": returned,
            },
            "seconds_by_stage": {key: round(value, 2) for key, value in self.seconds.items()},
            "vab_schedule": {
                "stage_a_epochs": schedule.stage_a,
                "victim_updates": list(schedule.victim_updates),
                "lr_drops": list(schedule.lr_drops) if self.params.lr_schedule == "vab" else None,
                "alpha_switch": schedule.alpha_switch,
            },
        }
        figures = (Figure("entropy_hist.png", ENTROPY_CAPTION),) if run_dir is not None else ()
        return DefenseResult(
            self.beneficiary.model,
            detector_entry(split_now),
            figures=figures,
            details=details,
            scores=1.0 - self.victim.detector.normalised(),  # low entropy = suspicious
            flagged=self.suspicious,
            series={"victim_asr": "V&B Victim ASR"},
            rounds_file="detector.jsonl",
        )

    def _write_outputs(self, run_dir: Path) -> None:
        config = self.victim.config
        extra = {"role": "V&B Victim: backdoored on purpose, never deploy", "train": to_dict(config)}
        victim = self.victim.model.to(memory_format=torch.contiguous_format)
        save_model(victim, run_dir / "victim.safetensors", model_meta(victim, self.job.bundle, extra))
        normalised = self.victim.detector.normalised()
        write_suspicious_csv(run_dir / "suspicious.csv", normalised, self.suspicious)
        plot_entropy_hist(run_dir / "entropy_hist.png", self.snapshots, self.job.poisoned)


def _round_summary(row: dict[str, Any]) -> str:
    parts = [
        f"V&B round {row['round']} (tau {row['tau']:g})",
        f"|S| {row['suspicious']}",
        f"|C| {row['credible']}",
        f"TPR {number(row['tpr'])}",
        f"FPR {number(row['fpr'])}",
        f"precision {number(row['precision'])}",
        f"residual {number(row['residual'])}",
        f"AUROC {number(row['auroc'])}",
    ]
    if row["cross_in_suspicious"] is not None:
        parts.append(f"cross in S {number(row['cross_in_suspicious'])}")
    return "  ".join(parts)


def _epoch_summary(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs} [{row['stage']}]", f"loss {number(row['loss'], 4)}"]
    for key in ("ba", "asr", "ra"):
        if row.get(key) is not None:
            parts.append(f"{key.upper()} {row[key]:.3f}")
    if row["victim_ba"] is not None:
        parts.append(f"victim BA {number(row['victim_ba'])} ASR {number(row['victim_asr'])}")
    split_now = row["split"]
    parts.append(f"|S| {split_now['suspicious']} (returned {row['returned']})")
    parts.append(f"TPR {number(split_now['tpr'])} FPR {number(split_now['fpr'])}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
