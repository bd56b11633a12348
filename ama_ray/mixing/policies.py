"""Mixing policies: the baselines, AMA-R (Group-DRO mirror ascent) and AMA-S (EXP3).

One policy holds alpha_t, the mixture used by optimizer step t (steps count from 0), and
answers every question the training step asks about its algorithm: `labels(alpha_t, n, rng)`
(which task each example comes from), `objective(loss, specialist_loss)` (the per-example e
theta minimises) and `loss_weights(alpha_t)` (AMA-R's per-task multipliers). These three take
alpha_t as an argument, so a worker that gets alpha_t from a shared service (`service.py`)
asks its own copy of the policy. After step t, `update` takes the step's per-task sums,
returns the step's history record and moves to alpha_{t+1}. All state is float64 and
round-trips exactly through `state_dict`. No other module knows an algorithm's name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ama_ray.errors import ConfigError
from ama_ray.mixing.excess import check_stats, clipped_excess, task_excess_sums
from ama_ray.mixing.settings import (
    ALGORITHMS, HELDOUT_KEYS, HELDOUT_PREFIX, STAT_KEYS, MixingSettings, weights_vector,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def largest_remainder(weights: np.ndarray, n: int,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Integer counts, shape (k,), summing to n and each within 1 of n * weights / sum(weights).

    Each task gets floor(n w_i); the leftover units go to the largest fractional parts. Ties go
    to the lower index, or are broken at random when `rng` is given (so no task is favoured
    on average). Raises ValueError for negative or all-zero weights or n < 0.
    """
    w = np.asarray(weights, dtype=np.float64)
    if n < 0 or w.ndim != 1 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"need n >= 0 and non-negative weights with a positive sum, got {w}, {n}")
    quota = w / w.sum() * n
    counts = np.floor(quota).astype(np.int64)
    frac = quota - counts
    tiebreak = np.arange(len(w)) if rng is None else rng.permutation(len(w))
    order = np.lexsort((tiebreak, -frac))
    counts[order[: n - int(counts.sum())]] += 1
    return counts


def draw_tasks(mode: str, alpha: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Task index of each of a worker's n examples, shape (n,), int64.

    mode "sample": i.i.d. draws from alpha. mode "reweight" (AMA-R): stratified, equal shares
    by largest remainder (ties broken by `rng`), shuffled; alpha enters the loss instead, and a
    per-worker batch n < k raises ConfigError naming `generalist.optim.batch_size` (the config
    refuses it when loaded; this guards direct callers).
    Workers that get alpha from the mixing actor call this with the actor's reply.
    """
    k = len(alpha)
    if mode == "sample":
        return rng.choice(k, size=n, p=alpha)
    if n < k:
        raise ConfigError(f"ama_r needs every task in every per-worker batch: batch {n} < "
                          f"{k} tasks", where="generalist.optim.batch_size",
                          fix=f"use a per-worker batch of at least {k}")
    counts = largest_remainder(np.ones(k), n, rng)
    return rng.permutation(np.repeat(np.arange(k), counts))


class MixingPolicy:
    """Base class: alpha, sampling, the history record, the running mean and the state.

    Subclasses set `algorithm` and `mode` and implement `weights()`; the AMA policies also
    override `_estimate` (the per-task gradient estimate) and `_move` (the alpha update).
    mode "sample": labels drawn from alpha, theta steps on the plain batch mean;
    mode "reweight": stratified batches, theta steps on alpha-weighted per-task means.
    """

    algorithm = ""
    mode = "sample"
    uses_heldout = False  # ama_h: alpha moves on held-out sums, sent with the steps `wants_heldout` names
    _state_arrays: tuple[str, ...] = ()  # float64 attributes that `state_dict` carries

    def __init__(self, tasks: Sequence[str], settings: MixingSettings):
        self.tasks = tuple(tasks)
        self.settings = settings
        self.step = 0
        self.bound_hits = 0
        self._alpha_sum = np.zeros(len(self.tasks))

    @property
    def k(self) -> int:
        return len(self.tasks)

    def weights(self) -> np.ndarray:
        """alpha_t: the mixture for step `self.step`, shape (k,), float64, sums to 1."""
        raise NotImplementedError

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Task index of each of n examples, shape (n,), for step `self.step` (see `draw_tasks`)."""
        return self.labels(self.weights(), n, rng)

    def labels(self, alpha: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """Task index of each of n examples of a step that uses mixture `alpha` (`draw_tasks`)."""
        return draw_tasks(self.mode, alpha, n, rng)

    def loss_weights(self, alpha: np.ndarray) -> np.ndarray | None:
        """Multipliers on per-task means in theta's objective at mixture `alpha`; None: plain mean."""
        return None

    @classmethod
    def reads_target(cls, settings: MixingSettings) -> bool:
        """Whether theta's objective or alpha's update reads the excess target (a specialist's
        loss): the AMA policies do, the baselines only with `baseline_objective: excess`."""
        return True

    def wants_heldout(self, step: int) -> bool:
        """Whether step `step`'s report must carry the held-out sums (HELDOUT_KEYS) of the model as
        it is before that step's update; only `ama_h` ever wants them."""
        return False

    @property
    def min_batch_size(self) -> int:
        """The smallest per-worker batch the algorithm accepts (AMA-R: one example per task)."""
        return self.k if self.mode == "reweight" else 1

    def objective(self, loss: "torch.Tensor", specialist_loss: "torch.Tensor") -> "torch.Tensor":
        """Per-example e that theta minimises (AMA: the excess per `clip`/`excess_target`)."""
        return clipped_excess(loss, specialist_loss, self.settings.clip,
                              self.settings.excess_target)

    def update(self, stats: dict[str, np.ndarray]) -> dict:
        """Apply step t's per-task sums (summed over workers and micro-batches); return its record.

        `stats` holds STAT_KEYS, each shape (k,). The record has `step` and numpy arrays of
        shape (k,) (numpy, not lists: 6k numbers a step add up in a long history): `alpha`
        (alpha_t, the mixture that step used), `g_hat` (the per-task estimate that moved the
        log-weights; the mean excess for the baselines, which do not move), `bound_fired`
        (bool, AMA-S only), the three float sums and `count` (int64). ValueError on bad stats.
        """
        stats = check_stats(stats, self.k)
        heldout = {key[len(HELDOUT_PREFIX):]: stats.pop(key) for key in HELDOUT_KEYS if key in stats} or None
        if (heldout is not None) != self.wants_heldout(self.step):
            raise ValueError(f"{self.algorithm} step {self.step}: held-out sums "
                             f"{'sent but not wanted' if heldout is not None else 'wanted but not sent'}")
        alpha = self.weights()
        sums = task_excess_sums(stats, self.settings.clip, self.settings.excess_target)
        g_hat, fired = self._estimate(sums, stats["count"], alpha, heldout)
        self._move(g_hat)
        record = {"step": self.step, "alpha": alpha, "g_hat": g_hat, "bound_fired": fired,
                  **stats, "count": stats["count"].astype(np.int64)}
        if self.uses_heldout:  # every record has the same fields (zeros where nothing was measured)
            measured = heldout or {key: np.zeros(self.k) for key in STAT_KEYS}
            record.update({HELDOUT_PREFIX + key: value for key, value in measured.items()})
            record[HELDOUT_PREFIX + "count"] = record[HELDOUT_PREFIX + "count"].astype(np.int64)
        self._alpha_sum += alpha
        self.step += 1
        return record

    def running_mean(self) -> np.ndarray:
        """Mean of alpha_0..alpha_{t-1} over the steps applied so far (alpha_0 before any)."""
        return self._alpha_sum / self.step if self.step else self.weights()

    def _estimate(self, sums: np.ndarray, count: np.ndarray, alpha: np.ndarray,
                  heldout: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        # Mean excess per task in this step; a task absent from the step gets 0 (no evidence).
        return _task_means(sums, count), np.zeros(self.k, dtype=bool)

    def _move(self, g_hat: np.ndarray) -> None:
        """Baselines do not move."""

    def state_dict(self) -> dict:
        """JSON-serialisable state (floats as Python floats: float64 survives JSON exactly)."""
        state = {"algorithm": self.algorithm, "tasks": list(self.tasks), "step": self.step,
                 "bound_hits": self.bound_hits, "alpha_sum": self._alpha_sum.tolist()}
        state.update({name: getattr(self, name).tolist() for name in self._state_arrays})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output; ConfigError if it belongs to another algorithm/task set."""
        if state.get("algorithm") != self.algorithm or tuple(state.get("tasks", ())) != self.tasks:
            raise ConfigError(
                f"saved mixing state is for {state.get('algorithm')!r} over "
                f"{state.get('tasks')}, this run is {self.algorithm!r} over {list(self.tasks)}",
                where="checkpoint mixing state", fix="resume with the same algorithm and tasks")
        arrays = {name: np.array(state[name], dtype=np.float64)
                  for name in ("alpha_sum", *self._state_arrays)}
        if any(a.shape != (self.k,) for a in arrays.values()):
            raise ValueError(f"saved mixing state arrays must have {self.k} entries")
        self.step, self.bound_hits = int(state["step"]), int(state["bound_hits"])
        self._alpha_sum = arrays.pop("alpha_sum")
        for name, value in arrays.items():
            setattr(self, name, value)


class _StaticPolicy(MixingPolicy):
    """A mixture that never moves; theta minimises the plain loss unless `baseline_objective`."""

    def __init__(self, tasks: Sequence[str], settings: MixingSettings, alpha: Sequence[float]):
        super().__init__(tasks, settings)
        self._alpha = np.asarray(alpha, dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._alpha.copy()

    @classmethod
    def reads_target(cls, settings: MixingSettings) -> bool:
        return settings.baseline_objective == "excess"

    def objective(self, loss: "torch.Tensor", specialist_loss: "torch.Tensor") -> "torch.Tensor":
        if self.settings.baseline_objective == "loss":
            return loss
        return super().objective(loss, specialist_loss)


class Proportional(_StaticPolicy):
    """alpha proportional to the tasks' training-set sizes (the union of the data)."""

    algorithm = "proportional"

    def __init__(self, tasks: Sequence[str], settings: MixingSettings, sizes: Sequence[int]):
        sizes = np.asarray(sizes, dtype=np.float64)
        super().__init__(tasks, settings, sizes / sizes.sum())


class Balanced(_StaticPolicy):
    """alpha uniform over tasks."""

    algorithm = "balanced"

    def __init__(self, tasks: Sequence[str], settings: MixingSettings):
        super().__init__(tasks, settings, np.full(len(tasks), 1.0 / len(tasks)))


class Fixed(_StaticPolicy):
    """alpha = `mixing.fixed_weights`, normalised."""

    algorithm = "fixed"

    def __init__(self, tasks: Sequence[str], settings: MixingSettings):
        if settings.fixed_weights is None:
            raise ConfigError("the fixed algorithm needs weights", where="mixing.fixed_weights",
                              fix="set one non-negative weight per task")
        alpha = weights_vector("mixing.fixed_weights", settings.fixed_weights, tasks,
                               positive=False)
        super().__init__(tasks, settings, alpha)


class Specialist(_StaticPolicy):
    """One task, alpha = [1], theta on the plain loss: a specialist is the loop with k = 1."""

    algorithm = "specialist"

    def __init__(self, tasks: Sequence[str], settings: MixingSettings):
        if len(tasks) != 1:
            raise ConfigError(f"a specialist trains one task, got {list(tasks)}", where="data.tasks",
                              fix="train one specialist per task")
        super().__init__(tasks, settings, [1.0])

    @classmethod
    def reads_target(cls, settings: MixingSettings) -> bool:
        return False

    def objective(self, loss: "torch.Tensor", specialist_loss: "torch.Tensor | None") -> "torch.Tensor":
        return loss


class _LogWeightPolicy(MixingPolicy):
    """alpha = (1 - c) softmax(w) + c / k with log-weights w (no underflow); w += eta_alpha g."""

    _state_arrays = ("log_weights",)

    def __init__(self, tasks: Sequence[str], settings: MixingSettings):
        super().__init__(tasks, settings)
        start = np.full(len(tasks), 1.0 / len(tasks))
        if settings.initial_weights is not None:
            start = np.array(weights_vector("mixing.initial_weights", settings.initial_weights,
                                            tasks, positive=True))
        self.log_weights = np.log(start)

    def weights(self) -> np.ndarray:
        c = self.settings.smoothing
        q = np.exp(self.log_weights - self.log_weights.max())
        return (1.0 - c) * q / q.sum() + c / self.k

    def _move(self, g_hat: np.ndarray) -> None:
        w = self.log_weights + self.settings.eta_alpha * g_hat
        # softmax ignores a shift; keeping max(w) = 0 stops w growing without bound.
        self.log_weights = w - w.max()


class AmaR(_LogWeightPolicy):
    """AMA-R: stratified batches, theta on sum_i alpha_i mean_i(e); w += eta * mean excess."""

    algorithm = "ama_r"
    mode = "reweight"

    def loss_weights(self, alpha: np.ndarray) -> np.ndarray:
        return np.asarray(alpha, dtype=np.float64)


class AmaS(_LogWeightPolicy):
    """AMA-S (EXP3): labels from alpha; g_hat_i = S_i / (B alpha_t,i), clipped at g_bound."""

    algorithm = "ama_s"

    def _estimate(self, sums: np.ndarray, count: np.ndarray, alpha: np.ndarray,
                  heldout: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        batch = count.sum()
        if batch <= 0:
            raise ValueError("an AMA-S step needs at least one example (sum of counts is 0)")
        g_hat = sums / (batch * alpha)
        bound = self.settings.g_bound
        fired = np.abs(g_hat) > bound
        if fired.any():
            self.bound_hits += int(fired.sum())
            logger.warning("AMA-S step %d: g_hat %s clipped to +-%g for tasks %s (%d hits so far)",
                           self.step, g_hat[fired].tolist(), bound,
                           [self.tasks[i] for i in np.flatnonzero(fired)], self.bound_hits)
        return np.clip(g_hat, -bound, bound), fired


class AmaH(_LogWeightPolicy):
    """AMA-H: AMA-S's sampling and theta objective, with alpha moved by held-out excess.

    Before every m-th step (m = `heldout_every`; steps 0, m, 2m, ...) the loop measures every
    task's mean excess on its held-out `signal` split with the current model (forward only) and
    sends the sums with that step's report. The update is full-information exponentiated gradient
    (every task is measured, so no importance weights and no g_bound): w <- w + eta_alpha m e_i,
    e_i the held-out mean excess of task i under `clip`/`excess_target` (`task_excess_sums` of the
    held-out sums over their counts). The factor m keeps alpha's drift per training step that of
    AMA-S, whose per-step estimate has expectation e_i on the training batches. Between
    measurements alpha stays put. `g_hat` in the record is m e_i at measured steps, else 0.
    """

    algorithm = "ama_h"
    uses_heldout = True

    def wants_heldout(self, step: int) -> bool:
        return step % int(self.settings.heldout_every) == 0

    def _estimate(self, sums: np.ndarray, count: np.ndarray, alpha: np.ndarray,
                  heldout: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        fired = np.zeros(self.k, dtype=bool)
        if heldout is None:
            return np.zeros(self.k), fired
        held = task_excess_sums(heldout, self.settings.clip, self.settings.excess_target)
        return int(self.settings.heldout_every) * _task_means(held, heldout["count"]), fired


def _task_means(sums: np.ndarray, count: np.ndarray) -> np.ndarray:
    """sums / count per task, 0 where the count is 0."""
    return np.divide(sums, count, out=np.zeros(len(sums)), where=count > 0)


def make_policy(algorithm: str, tasks: Sequence[str], sizes: Sequence[int],
                settings: MixingSettings) -> MixingPolicy:
    """Build the policy for `algorithm` over `tasks` (train sizes `sizes`, same order).

    Raises ConfigError naming the setting: unknown algorithm, empty or repeated task names,
    sizes that are not positive integers, smoothing 0 for ama_s, bad fixed/initial weights.
    """
    if algorithm not in POLICIES:
        raise ConfigError(f"unknown algorithm {algorithm!r}", where="generalist.algorithms",
                          fix=f"use some of {', '.join(ALGORITHMS)}")
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"need distinct task names, got {list(tasks)}", where="data.tasks",
                          fix="give each task a unique name")
    if len(sizes) != len(tasks) or any(int(s) != s or s < 1 for s in sizes):
        raise ConfigError(f"need one positive training-set size per task, got {list(sizes)}",
                          where="data.tasks", fix="give every task at least one training example")
    if algorithm == "ama_s" and settings.smoothing == 0:
        raise ConfigError("ama_s needs smoothing c > 0 (alpha_i >= c/k bounds the importance "
                          "weights)", where="mixing.smoothing", fix="use e.g. 0.1")
    if algorithm == "proportional":
        return Proportional(tasks, settings, sizes)
    return POLICIES[algorithm](tasks, settings)


POLICIES: dict[str, type[MixingPolicy]] = {
    cls.algorithm: cls for cls in (Proportional, Balanced, Fixed, AmaR, AmaS, AmaH, Specialist)
}
"""Every policy by name: the generalist's ALGORITHMS, plus `specialist` (one task, plain loss)."""
assert set(ALGORITHMS) < set(POLICIES)
