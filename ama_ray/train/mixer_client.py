"""A training worker's view of the mixing policy: the shared actor (generalist) or alpha = uniform (k=1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ama_ray.train.loop import UnitSpec

class MixerClient:
    """A worker's view of the mixing policy: the shared actor (generalist) or a fixed alpha (k=1)."""

    def __init__(self, spec: UnitSpec, rank: int):
        import ray

        self.rank, self.k = rank, len(spec.tasks)
        self.actor = ray.get_actor(spec.actor_name, namespace="ama_ray") if spec.actor_name else None
        self.progress_actor = _progress_actor(spec.progress_name)
        self.unit = "/".join(spec.out_unit)
        self._pending = None
        self._report_ref = None

    def prefetch(self, step: int) -> None:
        if self.actor is not None:
            self._pending = (step, self.actor.get_alpha.remote(step))

    def alpha(self, step: int) -> np.ndarray:
        if self.actor is None:
            return np.full(self.k, 1.0 / self.k)
        import ray

        if self._pending is None or self._pending[0] != step:
            self.prefetch(step)
        reply = ray.get(self._pending[1])
        return np.asarray(reply["alpha"], dtype=np.float64)

    def report(self, step: int, stats: dict[str, list[float]]) -> None:
        if self.actor is not None and self.rank == 0:
            import ray

            if self._report_ref is not None:
                ray.get(self._report_ref)  # surface an actor error of the previous step
            self._report_ref = self.actor.report.remote(step, stats)

    def state(self) -> dict | None:
        if self.actor is None:
            return None
        import ray

        policy_state, history = ray.get(self.actor.state.remote())
        return {"policy": policy_state, "history": history}

    def restore(self, saved: dict | None, step: int) -> None:
        """Put the actor back to the checkpoint's policy state; history after `step` is dropped."""
        if self.actor is not None and self.rank == 0:
            import ray

            ray.get(self.actor.restore.remote(saved["policy"], step, saved["history"]))

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self.progress_actor is not None and (step % 10 == 0 or step == total):
            keep = {k: v for k, v in metrics.items() if k in ("train/loss/mean", "eval/dpo_loss/mean", "eval/excess_loss/worst")}
            self.progress_actor.update.remote(self.unit, step, total, keep)


def _progress_actor(name: str | None):
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace="ama_ray")
    except ValueError:
        return None
