"""What one training run trains (`UnitSpec`, handed to every Ray Train worker) and the state a
worker carries from step to step and through checkpoints (`WorkerState`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class UnitSpec:
    """What one training run trains: passed to every worker as `train_loop_config`."""

    cfg: dict
    kind: str  # "specialist" | "generalist"
    tasks: list[str]
    algorithm: str  # a `ama_ray.mixing.POLICIES` name: "specialist" for specialists
    seed: int
    steps: int
    model_path: str
    out_unit: list[str]  # path parts of the output unit under the run directory (`RunDir` layout)
    sizes: list[int] = field(default_factory=list)  # training rows per task (the policy's input)
    settings: dict = field(default_factory=dict)  # `MixingSettings` fields
    actor_name: str | None = None  # the shared mixing actor; None: the policy in each worker
    progress_name: str | None = None
    fault: str | None = None  # fault-injection spec, see maybe_inject_fault
    raw_tasks: list[str] = field(default_factory=list)  # tasks whose excess target is 0 (weak specialists, on_weak raw_loss)

    def policy(self):
        """A fresh copy of the unit's mixing policy (the rules of its algorithm)."""
        from ama_ray.mixing import MixingSettings, make_policy

        return make_policy(self.algorithm, self.tasks, self.sizes or [1] * len(self.tasks), MixingSettings(**self.settings))

    def reads_scores(self, cfg) -> bool:
        """Whether this unit trains on the score stage's rows (with each example's specialist
        loss) rather than the reference stage's: generalists of a run that has specialists."""
        return self.kind == "generalist" and cfg.uses_specialists

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class WorkerState:
    step: int = 0
    best_eval: float = math.inf
    best_step: int = -1
    positions: dict[str, list[int]] = field(default_factory=dict)
    resumed_at: int = 0  # the checkpoint step this attempt started from (0: a fresh start)
