"""Settings of the mixing policies and the names they share with the training loop."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from ama_ray.checks import check_choice, check_number
from ama_ray.errors import ConfigError

ALGORITHMS = ("proportional", "balanced", "fixed", "ama_r", "ama_s", "ama_h")
"""Every mixing algorithm `make_policy` knows, in the order reports list them."""

USED_SETTINGS = {
    "proportional": ("clip", "excess_target", "baseline_objective"),
    "balanced": ("clip", "excess_target", "baseline_objective"),
    "fixed": ("clip", "excess_target", "baseline_objective", "fixed_weights"),
    "ama_r": ("eta_alpha", "smoothing", "clip", "excess_target", "initial_weights"),
    "ama_s": ("eta_alpha", "smoothing", "clip", "excess_target", "initial_weights", "g_bound"),
    "ama_h": ("eta_alpha", "smoothing", "clip", "excess_target", "initial_weights", "heldout_every"),
}
"""The `MixingSettings` fields each algorithm reads. Changing any other field cannot change its
run, so a committed generalist unit stays valid (its hash covers only these). `history_window` is
read only with `excess_target: history` (`used_by` adds it then), so the hashes of units trained
with the other targets do not change with it."""

STAT_KEYS = ("sum_loss", "sum_specialist_loss", "sum_clipped_excess", "count")
"""Per-task sums one optimizer step sends to the policy (each an array of shape (k,)).

`sum_clipped_excess` is always the per-example clipped excess max(L - s, 0), whatever
`clip` says: the policy picks the statistic it needs from these four (see `task_excess_sums`).
"""
HELDOUT_PREFIX = "heldout_"
HELDOUT_KEYS = tuple(HELDOUT_PREFIX + key for key in STAT_KEYS)
"""The same four sums over the held-out `signal` split, sent with the steps at which `ama_h`
measures them (`MixingPolicy.wants_heldout`), in the same report."""

CLIP_MODES = ("per_example", "per_task_mean", "none")
EXCESS_TARGETS = ("specialist", "none", "history")
BASELINE_OBJECTIVES = ("loss", "excess")


@dataclass
class MixingSettings:
    """Hyperparameters of the mixing policies (`mixing.*` in the config): the one class that owns
    their defaults, help and range checks; validated on creation.

    Raises `ConfigError` naming the key (e.g. `mixing.smoothing`) for a value out of range.
    Algorithm-specific rules (c > 0 for AMA-S, `fixed_weights` for `fixed`) are checked by
    `make_policy`, which knows the algorithm and the task names.
    """

    eta_alpha: float = 0.1
    """Step size of the log-weight update w <- w + eta_alpha * g (AMA-R, AMA-S)."""
    smoothing: float = 0.1
    """c: alpha = (1 - c) softmax(w) + c / k. In [0, 1] for AMA-R, (0, 1] for AMA-S."""
    clip: str = "per_example"
    """Which excess drives alpha: per_example | per_task_mean | none (see docs/algorithms.md)."""
    excess_target: str = "specialist"
    """What the excess is measured against, per task: specialist (each example's specialist loss),
    none (0: the raw loss, plain Group-DRO/EXP3) or history (the generalist's own smoothed best
    loss on the task; no specialists are trained). See docs/algorithms.md, "Targets"."""
    history_window: float = 64.0
    """excess_target history: the task loss is smoothed over about this many of the task's
    training examples (an EMA with decay 1 - 1/W per example) before its running minimum is taken."""
    heldout_every: int = 20
    """ama_h: measure every task's excess on its held-out `signal` split (forward only) before every
    m-th optimizer step, m = heldout_every, and move alpha by that measurement (docs/algorithms.md)."""
    g_bound: float = 100.0
    """AMA-S clips each importance-weighted estimate g_hat_i to [-g_bound, g_bound].

    A safety cap, not a variance knob: g_hat_i is about the task's mean excess (O(1) nats for
    DPO) times n_i / (B alpha_i) <= k / c, so 100 covers excesses up to ~3 nats at k / c = 30
    without biasing the estimate, while one freak batch can move a log-weight by at most
    eta_alpha * g_bound (10 nats at the defaults) instead of collapsing alpha for good.
    """
    initial_weights: dict[str, float] | None = None
    """Starting mixture for AMA-R/AMA-S (positive, normalised; w_0 = log of it). None: uniform."""
    fixed_weights: dict[str, float] | None = None
    """The `fixed` algorithm's mixture over every task (non-negative, not all zero; normalised)."""
    baseline_objective: str = "loss"
    """What the baselines' theta minimises: loss (plain DPO, the default) | excess (ablation)."""

    def __post_init__(self) -> None:
        check_number("mixing.eta_alpha", self.eta_alpha, low=0.0)
        check_number("mixing.smoothing", self.smoothing, low=0.0, high=1.0)
        check_number("mixing.g_bound", self.g_bound, low=0.0, low_open=True)
        check_number("mixing.history_window", self.history_window, low=1.0)
        check_number("mixing.heldout_every", self.heldout_every, low=1, integer=True)
        check_choice("mixing.clip", self.clip, CLIP_MODES)
        check_choice("mixing.excess_target", self.excess_target, EXCESS_TARGETS)
        check_choice("mixing.baseline_objective", self.baseline_objective, BASELINE_OBJECTIVES)
        for key in ("initial_weights", "fixed_weights"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"expected a mapping task -> weight, got {value!r}",
                                  where=f"mixing.{key}", fix="write e.g. {math: 2, code: 1}")

    def to_dict(self) -> dict:
        """A plain, JSON-serialisable copy (for actor arguments and manifests)."""
        return asdict(self)

    def used_by(self, algorithm: str) -> dict:
        """The fields `algorithm` reads (USED_SETTINGS), as a plain dict."""
        used = {k: v for k, v in self.to_dict().items() if k in USED_SETTINGS[algorithm]}
        if self.excess_target == "history":
            used["history_window"] = self.history_window
        return used


def weights_vector(key: str, weights: dict[str, float], tasks: Sequence[str], *,
                   positive: bool) -> list[float]:
    """Order a task -> weight mapping by `tasks` and normalise it to sum 1.

    Every task must be named, no unknown names, weights finite and >= 0 (> 0 when `positive`),
    not all zero; otherwise raises `ConfigError` naming `key`.
    """
    unknown = sorted(set(weights) - set(tasks))
    missing = [t for t in tasks if t not in weights]
    if unknown or missing:
        problem = f"unknown tasks {unknown}" if unknown else f"no weight for tasks {missing}"
        raise ConfigError(problem, where=key, fix=f"give one weight per task of {list(tasks)}")
    values = [weights[t] for t in tasks]
    for task, value in zip(tasks, values):
        bad = not isinstance(value, (int, float)) or isinstance(value, bool)
        if bad or not math.isfinite(value) or value < 0 or (positive and value == 0):
            need = "positive" if positive else "non-negative"
            raise ConfigError(f"weight {value!r} of task {task!r} is not a finite {need} number",
                              where=key, fix=f"give every task a {need} weight")
    total = math.fsum(values)
    if total <= 0:
        raise ConfigError("all weights are zero", where=key, fix="give at least one task weight > 0")
    return [v / total for v in values]
