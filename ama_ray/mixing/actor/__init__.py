"""The Ray side of the mixing protocol (`ama_ray.mixing.service`): one actor holds the policy for
every worker of a generalist unit, and `RayMixer` is each worker's client.

Every worker asks `get_alpha(t)` (it waits until alpha_t exists, so all workers of a step see
the same alpha); after step t, rank 0 sends `report(t, stats)` with the step's all-reduced
per-task sums, which moves the policy to alpha_{t+1}. Rank 0 sends the report with `.remote()`
while the optimizer steps and fetches alpha_{t+1} right after, so the round trip overlaps the
step. The actor does no compute (num_cpus=0) and receives 4k numbers per step. Only Ray-facing
code imports this module; the policies and `LocalMixer` stay importable without Ray.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import numpy as np
import ray

from ama_ray.errors import AmaError, ConfigError
from ama_ray.mixing.policies import make_policy
from ama_ray.mixing.settings import STAT_KEYS, MixingSettings

logger = logging.getLogger(__name__)

NAMESPACE = "ama_ray"
WAIT_S = 600.0  # the longest a worker waits for alpha_t (a step's report lost or a rank stuck): then a clear error


class MixingActor:
    """Holds one policy and the history of its records; run as a Ray async actor.

    All methods run on the actor's single event loop, so an update is atomic with respect to
    every other call; only `get_alpha` suspends (waiting for a step that has not happened).
    """

    def __init__(self, algorithm: str, tasks: Sequence[str], sizes: Sequence[int],
                 settings: MixingSettings, state: dict | None = None,
                 history: list[dict] | None = None):
        self._config = {"algorithm": algorithm, "tasks": list(tasks), "sizes": list(sizes),
                        "settings": settings.to_dict()}
        self._policy = make_policy(algorithm, tasks, sizes, settings)
        self._records: dict[int, dict] = {}
        self._advanced = asyncio.Condition()
        if state is not None:
            self._load(state, int(state["step"]), history)

    def describe(self) -> dict:
        """The constructor's configuration (algorithm, tasks, sizes, settings as a dict)."""
        return self._config

    async def get_alpha(self, step: int, timeout_s: float | None = None) -> dict:
        """{"step", "alpha" (shape (k,)), "loss_weights" (AMA-R: alpha, else None), "mode"}.

        Waits until step `step` is reached (all earlier steps reported); raises TimeoutError
        after `timeout_s` seconds (None: wait for ever). Past steps are served from the history.
        """
        if step < 0:
            raise ValueError(f"steps count from 0, got {step}")
        async with self._advanced:
            await asyncio.wait_for(self._advanced.wait_for(lambda: self._policy.step >= step),
                                   timeout_s)
        if step == self._policy.step:
            alpha = self._policy.weights()
        elif step in self._records:
            alpha = np.asarray(self._records[step]["alpha"], dtype=np.float64)
        else:
            raise ValueError(f"alpha of step {step} is not in the restored history")
        return {"step": step, "alpha": alpha, "loss_weights": self._policy.loss_weights(alpha),
                "mode": self._policy.mode}

    async def report(self, step: int, stats: dict[str, np.ndarray],
                     timeout_s: float | None = 300.0) -> dict:
        """Apply step `step`'s per-task sums (STAT_KEYS, shape (k,)) and return its record.

        In order: Ray does not keep an async actor's calls in submission order, so a report
        that overtakes the previous step's waits for it (TimeoutError after `timeout_s`: a
        report went missing). Idempotent: a step already applied (e.g. re-sent by a restarted
        rank 0) is not applied again; its stored record comes back, and a warning is logged
        when the statistics differ.
        """
        async with self._advanced:
            await asyncio.wait_for(self._advanced.wait_for(lambda: self._policy.step >= step),
                                   timeout_s)
            if step < self._policy.step:
                return self._repeated(step, stats)
            record = self._policy.update(stats)
            self._records[step] = record
            self._advanced.notify_all()
        return record

    def _repeated(self, step: int, stats: dict[str, np.ndarray]) -> dict | None:
        record = self._records.get(step)
        if record is not None and any(not np.array_equal(record[key], stats[key])
                                      for key in STAT_KEYS):
            logger.warning("mixing step %d re-sent with different statistics; kept the first", step)
        return record

    def state(self) -> tuple[dict, list[dict]]:
        """(policy.state_dict(), history): what a checkpoint stores."""
        return self._policy.state_dict(), self.history()

    async def restore(self, state: dict, step: int, history: list[dict] | None = None) -> int:
        """Load a checkpoint's policy state taken after `step` steps; drop history from `step` on.

        `history` replaces the actor's own when given (a fresh actor after a crash). Raises
        ValueError when state["step"] != step. Returns `step`.
        """
        self._load(state, step, history)
        async with self._advanced:
            self._advanced.notify_all()
        return step

    def history(self) -> list[dict]:
        """Every record kept, in step order."""
        return [self._records[s] for s in sorted(self._records)]

    def _load(self, state: dict, step: int, history: list[dict] | None) -> None:
        if int(state["step"]) != step:
            raise ValueError(f"mixing state is from step {state['step']}, not {step}")
        self._policy.load_state_dict(state)
        records = self._records.values() if history is None else history
        self._records = {r["step"]: r for r in records if r["step"] < step}
        if len(self._records) != step:
            logger.warning("restored mixing state at step %d with %d history records",
                           step, len(self._records))


def create_mixing_actor(name: str, algorithm: str, tasks: Sequence[str], sizes: Sequence[int],
                        settings: MixingSettings, state: dict | None = None,
                        history: list[dict] | None = None,
                        namespace: str = NAMESPACE) -> ray.actor.ActorHandle:
    """Get the actor `namespace/name`, creating it (num_cpus=0) if it does not exist.

    Creation is atomic in Ray (get_if_exists), so concurrent callers share one actor. An
    existing actor keeps its own state (`state`/`history` only seed a new one). Raises
    ConfigError if the existing actor was built for another algorithm, tasks or settings.
    """
    handle = ray.remote(MixingActor).options(
        name=name, namespace=namespace, get_if_exists=True, num_cpus=0,
    ).remote(algorithm, tasks, sizes, settings, state, history)
    found = ray.get(handle.describe.remote())
    wanted = {"algorithm": algorithm, "tasks": list(tasks), "sizes": list(sizes),
              "settings": settings.to_dict()}
    if found != wanted:
        raise ConfigError(f"a mixing actor with this name already exists for {found}",
                          where=f"actor {namespace}/{name}",
                          fix="use a new run name, or kill the old actor (ray.kill)")
    return handle


def get_mixing_actor(name: str, namespace: str = NAMESPACE) -> ray.actor.ActorHandle:
    """Look up an existing mixing actor (from a training worker). Raises ValueError if absent."""
    return ray.get_actor(name, namespace=namespace)


class RayMixer:
    """A training worker's client of the unit's mixing actor (`MixingService`).

    Every rank fetches alpha by step number; only rank 0 reports and restores.
    """

    def __init__(self, actor_name: str, rank: int, namespace: str = NAMESPACE):
        self.rank, self.name = rank, actor_name
        self.actor = get_mixing_actor(actor_name, namespace)
        self._pending: tuple[int, ray.ObjectRef] | None = None
        self._report_ref: ray.ObjectRef | None = None

    def prefetch(self, step: int) -> None:
        self._pending = (step, self.actor.get_alpha.remote(step, timeout_s=WAIT_S))

    def alpha(self, step: int) -> np.ndarray:
        if self._pending is None or self._pending[0] != step:
            self.prefetch(step)
        try:
            reply = ray.get(self._pending[1], timeout=WAIT_S + 30)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError) as err:
            if "TimeoutError" not in type(err).__name__ and "TimeoutError" not in str(err):
                raise
            raise AmaError(
                f"the mixing actor had no alpha for step {step} after {WAIT_S:.0f} s: step {step - 1}'s report never arrived",
                where=f"actor {NAMESPACE}/{self.name}",
                fix="look for the failed worker in the Ray logs, then rerun the same command (it resumes from the last checkpoint)",
            ) from None
        return np.asarray(reply["alpha"], dtype=np.float64)

    def report(self, step: int, stats: dict[str, list[float]]) -> None:
        if self.rank == 0:
            if self._report_ref is not None:
                ray.get(self._report_ref)  # surface an actor error of the previous step
            self._report_ref = self.actor.report.remote(step, stats)

    def state(self) -> dict:
        # Step t's report went out with .remote(): wait until it is applied, or the state (and
        # so the checkpoint) would be of step t - 1 and not resumable at step t.
        if self._report_ref is not None:
            ray.get(self._report_ref)
        policy_state, history = ray.get(self.actor.state.remote())
        return {"policy": policy_state, "history": history}

    def restore(self, saved: dict, step: int) -> None:
        if self.rank == 0:
            ray.get(self.actor.restore.remote(saved["policy"], step, saved["history"]))

    def history(self) -> list[dict]:
        return ray.get(self.actor.history.remote())
