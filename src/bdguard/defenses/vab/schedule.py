"""V&B's schedule for any epoch budget: a pure function of (epochs, params), exact for the paper's 200 epochs.

Rescaling rule (E = the Beneficiary's epochs, at(f) = floor(f * E + 1/2)):
- stage A = epochs 1 .. at(stage_a_fraction), stage B = the rest;
- the lr is multiplied by gamma from epoch at(m) + 1 on, for each milestone fraction m;
- stage B uses alpha2 from epoch at(alpha_switch) + 1 on, alpha1 before;
- the Victim is updated (one epoch on S, then a scoring round) after the epochs ceil(k * victim_every * E / R),
  k = 1, 2, ..., that fall in stage A, and after stage_a + ceil(k * victim_every_b * E / R) in stage B
  (R = reference_epochs, or E when it is None: then victim_every counts this run's epochs): the same update points,
  in shares of the run, as at R epochs; at most one per epoch.
For E = 200: stage A 1-100; updates after 5, 10, ..., 100 and after every epoch 101-200; lr drops at epochs
51, 101, 151; alpha2 from epoch 151.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bdguard.defenses.vab.config import VabParams, VictimParams


@dataclass(frozen=True)
class VabSchedule:
    epochs: int
    stage_a: int  # stage A is epochs 1..stage_a, stage B is stage_a+1..epochs
    victim_updates: tuple[int, ...]  # epochs after which the Victim trains one epoch on S and re-scores
    lr_drops: tuple[int, ...]  # first epochs of each lower learning rate
    alpha_switch: int  # first epoch that weighs the unlabelled loss with alpha2

    def stage(self, epoch: int) -> str:
        return "A" if epoch <= self.stage_a else "B"

    def lr_factor(self, epoch: int, gamma: float) -> float:
        return gamma ** sum(epoch >= drop for drop in self.lr_drops)

    def alpha(self, epoch: int, params: VabParams) -> float:
        return params.alpha2 if epoch >= self.alpha_switch else params.alpha1


def _at(fraction: float, epochs: int) -> int:
    return math.floor(fraction * epochs + 0.5)  # round half up, unlike round()


def _updates(start: int, end: int, every: int, epochs: int, reference: int) -> list[int]:
    """start + ceil(k * every * epochs / reference) for k = 1, 2, ... while <= end, without repeats."""
    points: list[int] = []
    k = 1
    while (point := start + -(-k * every * epochs // reference)) <= end:
        if not points or point != points[-1]:
            points.append(point)
        k += 1
    return points


def make_vab_schedule(epochs: int, params: VabParams) -> VabSchedule:
    stage_a = min(_at(params.stage_a_fraction, epochs), epochs)
    reference = params.reference_epochs or epochs
    updates = _updates(0, stage_a, params.victim_every, epochs, reference)
    updates += _updates(stage_a, epochs, params.victim_every_b, epochs, reference)
    return VabSchedule(
        epochs=epochs,
        stage_a=stage_a,
        victim_updates=tuple(updates),
        lr_drops=tuple(sorted(_at(m, epochs) + 1 for m in params.milestones)),
        alpha_switch=_at(params.alpha_switch, epochs) + 1,
    )


def threshold(scoring_round: int, params: VictimParams) -> float:
    """tau of scoring round 1, 2, ...: tau_warm during the warm-up rounds (its last value repeating), then tau."""
    if scoring_round < params.warm_up:
        return params.tau_warm[min(scoring_round, len(params.tau_warm)) - 1]
    return params.tau
