"""V&B, "The Victim and the Beneficiary" (Zhu et al., ICCV 2023), as specified in docs/methods/vab.md."""

from bdguard.defenses.vab.config import PRESETS, VabParams
from bdguard.defenses.vab.defense import VabDefense
from bdguard.defenses.vab.schedule import VabSchedule, make_vab_schedule, threshold

__all__ = ["PRESETS", "VabDefense", "VabParams", "VabSchedule", "make_vab_schedule", "threshold"]
