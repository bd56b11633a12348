"""The specialist-free history target (`mixing.excess_target: history`), against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ama_ray.errors import ConfigError
from ama_ray.mixing import MixingSettings, clipped_excess, make_policy, task_excess_sums
from ama_ray.mixing.targets import HistoryTarget, make_target


def test_one_task_by_hand():
    """W = 4: beta = 0.75 per example. Steps of (n, mean): (2, 1.0), (1, 0.4), (0, -), (3, 0.8)."""
    t = HistoryTarget(1, 4)
    assert t.targets().tolist() == [0.0]  # no example yet: the first batch counts its raw loss
    t.update([2.0], [2])
    m = (1 - 0.75**2) * 1.0  # 0.4375
    assert t.smoothed()[0] == pytest.approx(m / (1 - 0.75**2)) == pytest.approx(1.0)
    assert t.targets()[0] == pytest.approx(1.0)  # 2 < W examples: the smoothed value itself, no minimum yet
    t.update([0.4], [1])
    m = 0.75 * m + 0.25 * 0.4
    assert t.targets()[0] == pytest.approx(m / (1 - 0.75**3))  # 0.7405...: still 3 < W
    t.update([0.0], [0])  # absent: nothing moves
    assert t.targets()[0] == pytest.approx(m / (1 - 0.75**3))
    t.update([2.4], [3])
    m = 0.75**3 * m + (1 - 0.75**3) * 0.8
    first_full = m / (1 - 0.75**6)
    assert t.targets()[0] == pytest.approx(first_full)  # 6 >= W: the running minimum starts here
    t.update([3.0], [1])  # a bad batch raises the smoothed loss but not the minimum
    m = 0.75 * m + 0.25 * 3.0
    assert t.smoothed()[0] == pytest.approx(m / (1 - 0.75**7)) and t.smoothed()[0] > first_full
    assert t.targets()[0] == pytest.approx(first_full)
    t.update([0.0], [4])  # four examples at loss 0 pull it below: a new minimum
    m = 0.75**4 * m
    assert t.targets()[0] == pytest.approx(m / (1 - 0.75**11))


def test_tasks_are_independent_and_smoothed_per_example():
    """A task seen one example a step is smoothed over as many examples as one seen eight at a time."""
    rng = np.random.default_rng(0)
    t = HistoryTarget(2, 32)
    for _ in range(400):
        t.update([rng.normal(1.0, 0.3, 8).sum(), rng.normal(2.0, 0.3)], [8, 1])
    # Stationary losses: the minimum of an EMA over ~32 examples sits a few of its standard
    # deviations (0.3 / sqrt(63) = 0.038) below the mean, not the ~1 sigma of raw batch means.
    low = 1.0 - t.targets()[0], 2.0 - t.targets()[1]
    assert 0 < low[0] < 0.2 and 0 < low[1] < 0.2, low
    assert t.seen.tolist() == [3200, 400]


def test_state_round_trips_through_json_and_continues_identically():
    rng = np.random.default_rng(1)
    steps = [(rng.normal(1, 0.2, 3) * 4, np.array([4, 0, 2])) for _ in range(30)]
    a = HistoryTarget(3, 8)
    for s, c in steps[:10]:
        a.update(s, c)
    b = HistoryTarget(3, 8)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert math.isinf(b.best[1])  # a task never seen keeps no minimum (stored as null)
    for s, c in steps[10:]:
        a.update(s, c)
        b.update(s, c)
        assert a.targets().tolist() == b.targets().tolist()
    with pytest.raises(ValueError, match="cannot be loaded"):
        HistoryTarget(3, 16).load_state_dict(a.state_dict())


def test_the_target_enters_the_excess_as_a_specialist_loss_would():
    """With `history`, clip and the alpha statistic treat T_i exactly as a specialist's loss."""
    loss = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.6, 0.6, 2.5], dtype=torch.float64)  # T of the examples' tasks
    e = clipped_excess(loss, target, "per_example", "history")
    assert e.tolist() == pytest.approx([0.4, 0.0, 0.0])
    stats = {"sum_loss": np.array([1.5, 2.0]), "sum_specialist_loss": np.array([1.2, 2.5]),
             "sum_clipped_excess": np.array([0.4, 0.0]), "count": np.array([2.0, 1.0])}
    assert task_excess_sums(stats, "per_example", "history").tolist() == [0.4, 0.0]
    assert task_excess_sums(stats, "none", "history").tolist() == pytest.approx([0.3, -0.5])
    policy = make_policy("ama_s", "ab", (1, 1), MixingSettings(excess_target="history"))
    assert policy.objective(loss, target).tolist() == pytest.approx([0.4, 0.0, 0.0])


def test_settings():
    assert make_target(MixingSettings(), 3) is None
    assert make_target(MixingSettings(excess_target="none"), 3) is None
    assert make_target(MixingSettings(excess_target="history", history_window=10), 3).window == 10
    # The window counts only for the history target, so other runs' unit hashes do not move with it.
    assert "history_window" not in MixingSettings(history_window=10).used_by("ama_s")
    assert MixingSettings(excess_target="history").used_by("ama_s")["history_window"] == 64
    with pytest.raises(ConfigError, match="mixing.history_window"):
        MixingSettings(history_window=0.5)
