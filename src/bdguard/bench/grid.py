"""The grid of a bench: its steps in the order they run, each with its folder, its settings and the command that
redoes it alone.

Folders under the bench's DIR:
  cells/<attack>/<defense>/seed<k>/  one cell: the run folder of `bdguard train` (training-time defenses) or
                                     `bdguard repair` (post-training ones), plus run.yaml (its settings), analysis/
                                     (`bdguard analyze`, when the suite asks) and cell.json, written last: the cell
                                     is finished when cell.json exists
  detections/<attack>/<detector>/seed<k>/  one detection: the folder of `bdguard detect` on the cell's poisoned
                                     set (model-based detectors read the `none` cell's model), run.yaml, cell.json
  poison/<attack>/                   the poisoning gallery of `bdguard poison` (first seed), with run.yaml, cell.json
  poisoned-sets/                     the stored poisoned sets (attacks/store.py) the training cells share
A post-training defense repairs, and a model-based detector inspects, the `none` cell's model of the same attack
and seed, so that cell runs whenever one of them is in the grid, listed or not.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bdguard.attacks import ATTACKS
from bdguard.bench.config import BenchConfig
from bdguard.defenses import DEFENSES, PostTrainingDefense
from bdguard.detectors import DETECTORS
from bdguard.hashing import digest, settings_dict
from bdguard.runs.analyze import AnalyzeConfig
from bdguard.runs.detect import DetectConfig
from bdguard.runs.repair import RepairConfig
from bdguard.runs.train import RunConfig

UNDEFENDED = "none"
DONE = "cell.json"  # written last in a step's folder: the step is finished
SETTINGS = "run.yaml"  # the step's settings, as `--config` reads them
POISON_STORE = "poisoned-sets"


def step_fingerprint(config: Any, *parents: str) -> str:
    """A step's fingerprint: its run's settings (as `runs.common.fingerprint` reads them) and the fingerprints of
    the steps it builds on."""
    return digest([settings_dict(config), *parents])


def is_post_training(config: BenchConfig, defense: str) -> bool:
    return issubclass(DEFENSES.get(config.defense_name(defense)), PostTrainingDefense)


def defense_order(config: BenchConfig) -> list[str]:
    """The defenses of the grid: the suite's, with `none` first where post-training defenses or model-based
    detectors need its model."""
    needs_model = any(is_post_training(config, name) for name in config.defenses) or any(
        DETECTORS.get(name).uses_model for name in config.detectors
    )
    implied = [UNDEFENDED] if needs_model and UNDEFENDED not in config.defenses else []
    return implied + list(config.defenses)


@dataclass(frozen=True)
class Step:
    kind: Literal["poison", "train", "repair", "detect"]
    attack: str
    defense: str | None  # the detector of a detection; None for a poisoning gallery
    seed: int
    folder: Path
    config: RunConfig | RepairConfig | DetectConfig
    fingerprint: str
    source: Path | None = None  # repair: the model it repairs; detect: the model it inspects, if any
    analysis: AnalyzeConfig | None = None  # analyze the cell's model after its run

    @property
    def is_cell(self) -> bool:
        """A cell of the attack x defense table."""
        return self.kind in ("train", "repair")

    @property
    def label(self) -> str:
        if self.kind == "poison":
            return f"{self.attack} gallery"
        if self.kind == "detect":
            return f"{self.attack} / detector {self.defense} / seed {self.seed}"
        return f"{self.attack} / {self.defense} / seed {self.seed}"

    def commands(self) -> list[str]:
        """The commands that redo this step alone, from the settings in its run.yaml."""
        settings = str(self.folder / SETTINGS)
        if self.kind == "poison":
            return [shlex.join(["bdguard", "poison", "--config", settings, "--out", str(self.folder)])]
        if self.kind == "detect":
            model = [] if self.source is None else ["--model", str(self.source)]
            return [shlex.join(["bdguard", "detect", "--config", settings, *model, "--out", str(self.folder)])]
        if self.kind == "train":
            run = ["bdguard", "train", "--config", settings, "--out", str(self.folder), "--resume"]
        else:
            run = ["bdguard", "repair", "--model", str(self.source), "--config", settings, "--out", str(self.folder)]
        commands = [shlex.join(run)]
        if self.analysis is not None:
            model, folder = self.folder / "model.safetensors", self.folder / "analysis"
            analyze = ["bdguard", "analyze", "--model", str(model), "--config", str(folder / SETTINGS)]
            commands.append(shlex.join([*analyze, "--out", str(folder)]))
        return commands


def cell_folder(out: Path, attack: str, defense: str, seed: int) -> Path:
    return out / "cells" / attack / defense / f"seed{seed}"


def _analysis(config: BenchConfig, attack: str, defense: str, seed: int) -> AnalyzeConfig | None:
    if not config.analyze or not ATTACKS.get(attack).has_trigger:
        return None
    return AnalyzeConfig(
        data=config.data,
        attack=config.attack_config(attack, seed),
        probe=config.probe_config(seed),
        train=config.train_config(defense, seed),
    )


def plan(config: BenchConfig, out: str | Path) -> list[Step]:
    """Every step of the grid in the order it runs: per attack its gallery, then per seed the `none` cell
    (where needed) before the other training-time defenses and the post-training ones that repair its model."""
    out = Path(out)
    steps: list[Step] = []
    defenses = defense_order(config)
    for attack in config.attacks:
        if config.gallery and ATTACKS.get(attack).has_trigger:
            seed = config.seeds[0]
            run = RunConfig(data=config.data, attack=config.attack_config(attack, seed), train=config.train)
            folder = out / "poison" / attack
            steps.append(Step("poison", attack, None, seed, folder, run, step_fingerprint(run)))
        for seed in config.seeds:
            trained: dict[str, Step] = {}
            # training-time ones first, `none` first of all
            for defense in sorted(defenses, key=lambda name: is_post_training(config, name)):
                folder = cell_folder(out, attack, defense, seed)
                analysis = _analysis(config, attack, defense, seed)
                if not is_post_training(config, defense):
                    run = RunConfig(
                        data=config.data,
                        attack=config.attack_config(attack, seed),
                        defense=config.defense_config(defense),
                        train=config.train_config(defense, seed),
                    )
                    step = Step("train", attack, defense, seed, folder, run, step_fingerprint(run), None, analysis)
                    trained[defense] = step
                else:
                    base = trained[UNDEFENDED]
                    repair = RepairConfig(
                        data=config.data,
                        attack=config.attack_config(attack, seed),
                        defense=config.defense_config(defense),
                        probe=config.probe_config(seed),
                        train=config.train_config(defense, seed),
                    )
                    fingerprint = step_fingerprint(repair, base.fingerprint)
                    source = base.folder / "model.safetensors"
                    step = Step("repair", attack, defense, seed, folder, repair, fingerprint, source, analysis)
                steps.append(step)
            steps += _detections(config, out, attack, seed, trained.get(UNDEFENDED))
    return steps


def _detections(config: BenchConfig, out: Path, attack: str, seed: int, undefended: Step | None) -> list[Step]:
    """The detection steps of one poisoned set: every detector of the suite, on the set the cells train on."""
    if not ATTACKS.get(attack).has_trigger:
        return []
    steps = []
    for detector in config.detectors:
        detect = DetectConfig(
            data=config.data,
            attack=config.attack_config(attack, seed),
            detector=config.detector_config(detector),
            train=config.detector_train_config(detector, seed),
        )
        source, parents = None, []
        if DETECTORS.get(detector).uses_model:
            source, parents = undefended.folder / "model.safetensors", [undefended.fingerprint]
        folder = out / "detections" / attack / detector / f"seed{seed}"
        steps.append(Step("detect", attack, detector, seed, folder, detect, step_fingerprint(detect, *parents), source))
    return steps


def cell_order(config: BenchConfig) -> dict[tuple[str, str, int], int]:
    """(attack, defense, seed) -> its place in the results: by attack, then defense, then seed, as listed."""
    defenses = defense_order(config)
    keys = [(attack, defense, seed) for attack in config.attacks for defense in defenses for seed in config.seeds]
    return {key: i for i, key in enumerate(keys)}
