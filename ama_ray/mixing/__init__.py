"""Pure mixing algorithms (numpy; torch only inside the per-example helpers). No Ray here."""

from ama_ray.mixing.excess import batch_objective, clipped_excess, task_excess_sums
from ama_ray.mixing.policies import (
    AmaR,
    AmaS,
    Balanced,
    Fixed,
    MixingPolicy,
    Proportional,
    draw_tasks,
    largest_remainder,
    make_policy,
)
from ama_ray.mixing.settings import ALGORITHMS, STAT_KEYS, USED_SETTINGS, MixingSettings

__all__ = [
    "ALGORITHMS", "STAT_KEYS", "USED_SETTINGS", "MixingSettings", "MixingPolicy", "Proportional", "Balanced",
    "Fixed", "AmaR", "AmaS", "make_policy", "largest_remainder", "draw_tasks", "clipped_excess",
    "batch_objective", "task_excess_sums",
]
