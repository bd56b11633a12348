"""How a training worker talks to the mixing policy: one small protocol, two implementations.

Steps count from 0 and alpha_t is the mixture of optimizer step t. Per step a worker calls
`alpha(t)` (every worker of a step gets the same alpha_t), trains, and calls `report(t, stats)`
with the step's all-reduced per-task sums (STAT_KEYS), which moves the policy to alpha_{t+1};
`prefetch(t + 1)` may ask for the next alpha early so the answer overlaps the optimizer step.
`state()` goes into every checkpoint and `restore(state, step)` puts the policy back on resume,
dropping history from `step` on, so a resumed run replays the trajectory of an uninterrupted one.

- `LocalMixer` (here, no Ray): the policy in the worker's own process. Right for one worker,
  for policies that never move (every rank holds an identical copy), and for tests and
  benchmarks.
- `RayMixer` (`ama_ray.mixing.actor`): the client of one Ray actor that holds the policy
  for every worker of a generalist unit.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ama_ray.mixing.policies import MixingPolicy


class MixingService(Protocol):
    """What the training loop needs from wherever the policy lives."""

    def prefetch(self, step: int) -> None:
        """Start fetching alpha_step (optional: `alpha` fetches what was not prefetched)."""

    def alpha(self, step: int) -> np.ndarray:
        """alpha_step, shape (k,), float64; waits until every earlier step was reported."""

    def report(self, step: int, stats: dict[str, list[float]]) -> None:
        """Step `step`'s per-task sums (the same on every rank, after the all-reduce)."""

    def state(self) -> dict:
        """{"policy": state_dict, "history": [records]}: what a checkpoint stores."""

    def restore(self, saved: dict, step: int) -> None:
        """Load a checkpoint's `state()` taken after `step` steps; later history is dropped."""

    def history(self) -> list[dict]:
        """Every step's record (`MixingPolicy.update`), in step order."""


class LocalMixer:
    """The policy in this process: `report` applies each step's statistics at once."""

    def __init__(self, policy: MixingPolicy):
        self.policy = policy
        self.records: list[dict] = []

    def prefetch(self, step: int) -> None:
        pass

    def alpha(self, step: int) -> np.ndarray:
        if step == self.policy.step:
            return self.policy.weights()
        if 0 <= step < len(self.records):
            return np.asarray(self.records[step]["alpha"], dtype=np.float64)
        raise ValueError(f"alpha of step {step} asked at step {self.policy.step}: steps are taken in order")

    def report(self, step: int, stats: dict[str, list[float]]) -> None:
        if step != self.policy.step:
            raise ValueError(f"report of step {step} at step {self.policy.step}: steps are reported in order")
        self.records.append(self.policy.update(stats))

    def state(self) -> dict:
        return {"policy": self.policy.state_dict(), "history": list(self.records)}

    def restore(self, saved: dict, step: int) -> None:
        if int(saved["policy"]["step"]) != step:
            raise ValueError(f"mixing state is from step {saved['policy']['step']}, not {step}")
        self.policy.load_state_dict(saved["policy"])
        self.records = [r for r in saved["history"] if r["step"] < step]

    def history(self) -> list[dict]:
        return list(self.records)
