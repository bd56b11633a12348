"""Pure mixing algorithms (numpy; torch only inside the per-example helpers). No Ray here.

`policies` owns every algorithm's rules, `settings` their hyperparameters, `excess` the excess
they act on, and `service` how a training worker reaches the policy (`LocalMixer` in process;
the Ray actor and its client live in `actor`, which only Ray-facing code imports).
"""

from ama_ray.mixing.excess import batch_objective, clipped_excess, task_excess_sums
from ama_ray.mixing.policies import (
    POLICIES,
    AmaH,
    AmaR,
    AmaS,
    Balanced,
    Fixed,
    MixingPolicy,
    Proportional,
    Specialist,
    draw_tasks,
    largest_remainder,
    make_policy,
)
from ama_ray.mixing.service import LocalMixer, MixingService
from ama_ray.mixing.settings import ALGORITHMS, STAT_KEYS, USED_SETTINGS, MixingSettings

__all__ = [
    "ALGORITHMS", "STAT_KEYS", "USED_SETTINGS", "POLICIES", "MixingSettings", "MixingPolicy", "Proportional",
    "Balanced", "Fixed", "AmaR", "AmaS", "AmaH", "Specialist", "make_policy", "largest_remainder", "draw_tasks",
    "clipped_excess", "batch_objective", "task_excess_sums", "LocalMixer", "MixingService",
]
