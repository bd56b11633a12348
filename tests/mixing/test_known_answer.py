"""Known answer: AMA reaches the minimax centre of quadratic tasks; the baselines do not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ama_ray.mixing import MixingSettings, make_policy
from ama_ray.mixing.known_answer import (
    clipped_excess_mean,
    simulate,
    smallest_enclosing_ball,
    triangle_tasks,
)

TASKS = triangle_tasks()
NAMES = ("big", "left", "right")


def test_smallest_enclosing_ball_on_hand_cases():
    centre, radius = smallest_enclosing_ball(TASKS.mu)
    assert np.allclose(centre, [0, 0], atol=1e-12) and radius == pytest.approx(1.0)
    # equilateral triangle: the circumcentre, radius side / sqrt(3)
    tri = np.array([[0, 0], [2, 0], [1, math.sqrt(3)]])
    centre, radius = smallest_enclosing_ball(tri)
    assert np.allclose(centre, [1, 1 / math.sqrt(3)]) and radius == pytest.approx(2 / math.sqrt(3))
    # an interior point does not change the ball
    centre, radius = smallest_enclosing_ball(np.vstack([tri, [[1, 0.5]]]))
    assert radius == pytest.approx(2 / math.sqrt(3))


def test_geometry_puts_the_centre_far_from_both_baseline_answers():
    centre, diameter = TASKS.centre, TASKS.diameter
    assert diameter == pytest.approx(2.0)
    assert np.linalg.norm(TASKS.mu.mean(axis=0) - centre) >= 0.15 * diameter
    assert np.linalg.norm(TASKS.weighted_mean - centre) >= 0.15 * diameter
    assert TASKS.sizes == (10, 1, 1)


def test_clipped_excess_mean_matches_monte_carlo():
    rng = np.random.default_rng(0)
    for d in (0.3, 1.0, 2.0):
        z = rng.standard_normal(400_000)
        samples = np.maximum(0.5 * d**2 - d * 0.5 * z, 0)
        se = samples.std() / math.sqrt(len(z))
        assert abs(clipped_excess_mean(np.array(d), 0.5) - samples.mean()) < 4 * se


def test_centre_minimises_the_worst_clipped_excess_on_a_grid():
    grid = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 41), np.linspace(-0.5, 0.5, 41)), -1)
    grid = grid.reshape(-1, 2)
    gaps = TASKS.minimax_gap(grid)
    assert gaps.min() >= -1e-12
    assert np.linalg.norm(grid[gaps.argmin()] - TASKS.centre) < 1e-9


@pytest.mark.timeout(120)
def test_ama_converges_to_the_centre_and_the_baselines_do_not():
    steps = 1000
    scale = 1 / math.sqrt(steps)  # step sizes proportional to 1/sqrt(T), as in the benchmark
    smoothing = {"ama_r": 0.0, "ama_s": steps**-0.25}  # AMA-S: c shrinking with T
    distance = {}
    for algorithm in ("proportional", "balanced", "ama_r", "ama_s"):
        settings = MixingSettings(eta_alpha=10 * scale, smoothing=smoothing.get(algorithm, 0.1))
        policy = make_policy(algorithm, NAMES, TASKS.sizes, settings)
        theta = simulate(policy, TASKS, steps, lr=10 * scale, batch=8, seed=0)
        distance[algorithm] = np.linalg.norm(theta - TASKS.centre)
    # Tolerance 0.1 = 0.05 diameters: AMA-S keeps alpha_big >= c/3 = 0.06 at T = 1000, which
    # pulls theta about 0.93 * 0.06 = 0.055 towards the big task; AMA-R (c = 0) lands ~0.02 away.
    assert distance["ama_r"] < 0.1, distance
    assert distance["ama_s"] < 0.1, distance
    # the baselines sit near their own answers, 0.31 (centroid) and 0.78 (weighted mean) away
    assert distance["balanced"] > 0.25, distance
    assert distance["proportional"] > 0.6, distance


@pytest.mark.timeout(120)
@pytest.mark.parametrize("smoothing", [0.0, 1000**-0.25])
def test_ama_h_reaches_the_centre_from_held_out_measurements(smoothing):
    """AMA-H moves alpha only every 10th step, on 64 fresh held-out examples per task (full
    information: no importance weights, so c = 0 is allowed), and still lands at the minimax point."""
    steps = 1000
    scale = 1 / math.sqrt(steps)
    settings = MixingSettings(eta_alpha=10 * scale, smoothing=smoothing, heldout_every=10)
    policy = make_policy("ama_h", NAMES, TASKS.sizes, settings)
    theta = simulate(policy, TASKS, steps, lr=10 * scale, batch=8, seed=0)
    assert np.linalg.norm(theta - TASKS.centre) < 0.1
    assert policy.weights()[0] < smoothing / 3 + 0.01  # the big task, inactive at the centre, is left at the floor
