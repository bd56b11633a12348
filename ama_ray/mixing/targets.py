"""The per-task target the excess is measured against, when it is not a specialist's loss.

`mixing.excess_target` names the source (docs/algorithms.md, "Targets"):

- `specialist`: each example's own specialist loss s_z, read from the rows the score stage wrote;
- `none`: no target (0): the excess is the raw loss;
- `history`: a specialist-free target T_i per task from the generalist's own training losses,
  kept by `HistoryTarget` below: the running minimum of a smoothed task loss.

Only `history` has state. Every worker keeps its own copy, updated from the same all-reduced
per-task sums, so the copies agree without communication; the loop's checkpoint stores it, so a
resumed run continues with the same targets.
"""

from __future__ import annotations

import math

import numpy as np

from ama_ray.mixing.settings import MixingSettings


class HistoryTarget:
    """T_i: the lowest smoothed training loss task i has reached so far.

    Smoothing: an exponential moving average over the task's training examples, decay
    beta = 1 - 1/W per example (W = `mixing.history_window`), bias-corrected as Adam does. A step
    whose batch holds n_i examples of task i with mean loss x_i updates

        m_i <- beta^n_i m_i + (1 - beta^n_i) x_i ;  N_i <- N_i + n_i ;  mhat_i = m_i / (1 - beta^N_i)

    (the per-example average when the n_i examples enter one after another with equal weight
    in the batch), so a small task is smoothed over as many examples as a large one, not over as
    many steps. T_i = min of mhat_i over the steps after which N_i >= W: a minimum taken over
    single noisy batch means would be biased low by about sigma sqrt(2 ln t) (sigma: the
    per-example spread), the smoothing divides sigma by about sqrt(2W - 1) first. Before task i
    has W examples, T_i = mhat_i (no evidence either way: its excess is noise around 0); before
    its first example, T_i = 0 (that first batch counts its raw loss).

    Targets are per task, never per example: every example of task i is compared with T_i.
    """

    def __init__(self, k: int, window: float):
        if not (window >= 1 and math.isfinite(window)):
            raise ValueError(f"history window must be a finite number >= 1, got {window!r}")
        self.k = k
        self.window = float(window)
        self.beta = 1.0 - 1.0 / self.window
        self.ema = np.zeros(k)  # m_i, not bias-corrected
        self.seen = np.zeros(k)  # N_i: examples of task i so far
        self.best = np.full(k, np.inf)  # running minimum of mhat_i once N_i >= W

    def smoothed(self) -> np.ndarray:
        """mhat_i, the bias-corrected average (NaN for a task with no example yet)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.seen > 0, self.ema / (1.0 - self.beta ** self.seen), np.nan)

    def targets(self) -> np.ndarray:
        """T_i for the next step, shape (k,), float64 (class docstring)."""
        smoothed = self.smoothed()
        out = np.where(np.isfinite(self.best), self.best, smoothed)
        return np.where(self.seen > 0, out, 0.0)

    def update(self, sum_loss, count) -> None:
        """Fold in one step's per-task sums (all workers, all micro-batches; shape (k,) each)."""
        sum_loss = np.asarray(sum_loss, dtype=np.float64)
        count = np.asarray(count, dtype=np.float64)
        seen = count > 0
        mean = np.divide(sum_loss, count, out=np.zeros(self.k), where=seen)
        keep = self.beta ** count  # 1 where the task is absent: nothing changes
        self.ema = keep * self.ema + (1.0 - keep) * np.where(seen, mean, 0.0)
        self.seen = self.seen + count
        full = seen & (self.seen >= self.window)
        self.best = np.where(full, np.minimum(self.best, self.smoothed()), self.best)

    def state_dict(self) -> dict:
        """Plain floats (JSON round-trips float64 exactly); `inf` is stored as None."""
        return {"window": self.window, "ema": self.ema.tolist(), "seen": self.seen.tolist(),
                "best": [None if not math.isfinite(b) else b for b in self.best.tolist()]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ema"]) != self.k or state["window"] != self.window:
            raise ValueError(f"a history target for {len(state['ema'])} tasks with window {state['window']} "
                             f"cannot be loaded into one for {self.k} tasks with window {self.window}")
        self.ema = np.array(state["ema"], dtype=np.float64)
        self.seen = np.array(state["seen"], dtype=np.float64)
        self.best = np.array([np.inf if b is None else b for b in state["best"]], dtype=np.float64)


def make_target(settings: MixingSettings, k: int) -> HistoryTarget | None:
    """The stateful target of `settings.excess_target` (`history`), or None (specialist, none)."""
    if settings.excess_target == "history":
        return HistoryTarget(k, settings.history_window)
    return None


def uses_specialists(settings: MixingSettings) -> bool:
    """Whether training needs the specialists' per-example losses (the score stage's rows)."""
    return settings.excess_target == "specialist"
