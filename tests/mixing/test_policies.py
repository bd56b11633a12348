"""Policies against hand-computed updates (reference values: 40-digit Decimal arithmetic)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ama_ray.mixing import STAT_KEYS, MixingSettings, draw_tasks, largest_remainder, make_policy

TASKS = ("math", "safety", "code")


def stats(clipped, count, loss=None, specialist=None):
    """Step statistics; loss defaults to the clipped excess over a zero specialist."""
    clipped = np.asarray(clipped, dtype=float)
    return {"sum_loss": clipped if loss is None else np.asarray(loss, dtype=float),
            "sum_specialist_loss": np.zeros(3) if specialist is None else np.asarray(specialist),
            "sum_clipped_excess": clipped, "count": np.asarray(count)}


def policy(algorithm, **settings):
    return make_policy(algorithm, TASKS, (10, 1, 1), MixingSettings(**settings))


# --- AMA-R -----------------------------------------------------------------------------------

R1 = [0.38498088900295414, 0.31519569317401958, 0.29982341782302628]  # softmax(.25, .05, 0)
R2 = [0.35476960646490467, 0.35476960646490467, 0.29046078707019066]  # softmax(.30, .30, .10)
R1_C = [0.37206900008554894, 0.31973010321384802, 0.30820089670060304]  # 0.75 R1 + 1/12
R2_C = [0.34941053818201184, 0.34941053818201184, 0.30117892363597633]


@pytest.mark.parametrize("smoothing, first, second", [(0.0, R1, R2), (0.25, R1_C, R2_C)])
def test_ama_r_two_steps_match_hand_computation(smoothing, first, second):
    p = policy("ama_r", eta_alpha=0.5, smoothing=smoothing)
    assert p.mode == "reweight"
    np.testing.assert_allclose(p.weights(), [1 / 3] * 3, rtol=1e-15)
    # e_hat = (2.0/4, 0.3/3, 0/3) = (0.5, 0.1, 0); w = 0.5 e_hat = (0.25, 0.05, 0)
    record = p.update(stats([2.0, 0.3, 0.0], [4, 3, 3]))
    np.testing.assert_allclose(record["g_hat"], [0.5, 0.1, 0.0], rtol=1e-15)
    np.testing.assert_allclose(record["alpha"], [1 / 3] * 3, rtol=1e-15)  # alpha used by step 0
    np.testing.assert_allclose(p.weights(), first, rtol=1e-13)
    np.testing.assert_allclose(p.loss_weights(p.weights()), first, rtol=1e-13)
    # e_hat = (0.1, 0.5, 0.2); w = (0.30, 0.30, 0.10)
    p.update(stats([0.4, 1.5, 0.6], [4, 3, 3]))
    np.testing.assert_allclose(p.weights(), second, rtol=1e-13)
    assert p.step == 2
    np.testing.assert_allclose(p.running_mean(), (np.array(first) + 1 / 3) / 2, rtol=1e-13)


def test_ama_r_absent_task_gets_no_update_term():
    p = policy("ama_r", eta_alpha=1.0, smoothing=0.0)
    # task 2 absent: e_hat = (1.0/2, 0/2, no term) -> w = (0.5, 0, 0)
    record = p.update(stats([1.0, 0.0, 0.0], [2, 2, 0]))
    assert record["g_hat"].tolist() == [0.5, 0.0, 0.0]
    np.testing.assert_allclose(
        p.weights(), [0.45186276187760604, 0.27406861906119698, 0.27406861906119698], rtol=1e-13)


# --- AMA-S -----------------------------------------------------------------------------------

S1 = [0.33916280936780146, 0.33560213901723242, 0.32523505161496613]
S2 = [0.33645985649067641, 0.34732064495387585, 0.31621949855544774]


def test_ama_s_importance_weights_use_the_sampling_alpha():
    p = policy("ama_s", eta_alpha=0.2, smoothing=0.3)
    # step 0 under uniform alpha, B = 8: g = S / (8/3) = (0.375, 0.3, 0.075)
    record = p.update(stats([1.0, 0.8, 0.2], [5, 2, 1]))
    np.testing.assert_allclose(record["g_hat"], [0.375, 0.3, 0.075], rtol=1e-15)
    np.testing.assert_allclose(p.weights(), S1, rtol=1e-13)
    # step 1 sampled with S1: g = S / (8 * S1); the uniform reading would give (0.15, 0.45, 0)
    record = p.update(stats([0.4, 1.2, 0.0], [2, 4, 2]))
    np.testing.assert_allclose(record["alpha"], S1, rtol=1e-13)
    np.testing.assert_allclose(record["g_hat"], [0.14742182402958586, 0.44695781868153658, 0],
                               rtol=1e-13)
    np.testing.assert_allclose(p.weights(), S2, rtol=1e-13)
    assert not record["bound_fired"].any() and p.bound_hits == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ama_s_bound_fires_and_clips(sign, caplog):
    p = policy("ama_s", eta_alpha=1.0, smoothing=0.3, g_bound=1.0, clip="none")
    # g_0 = +-24 / (8 * 1/3) = +-9, clipped to +-1
    with caplog.at_level(logging.WARNING, logger="ama_ray.mixing.policies"):
        record = p.update(stats([0, 0, 0], [8, 0, 0], loss=[sign * 24.0, 0, 0]))
    assert record["g_hat"].tolist() == [sign, 0.0, 0.0]
    assert record["bound_fired"].tolist() == [True, False, False]
    assert p.bound_hits == 1 and "clipped" in caplog.text
    expected = [0.50328181933608038, 0.24835909033195981, 0.24835909033195981]  # w = (1, 0, 0)
    if sign < 0:  # w = (-1, 0, 0): 0.7 softmax + 0.1
        q = np.exp([-1.0, 0, 0]) / np.exp([-1.0, 0, 0]).sum()
        expected = 0.7 * q + 0.1
    np.testing.assert_allclose(p.weights(), expected, rtol=1e-13)


def test_ama_s_rejects_an_empty_step():
    with pytest.raises(ValueError, match="at least one example"):
        policy("ama_s").update(stats([0, 0, 0], [0, 0, 0]))


# --- switches ----------------------------------------------------------------------------------

def test_clip_switches_pick_the_statistic():
    # loss - specialist = (+2, -3, 1) at the task level; per-example clipped sums = (2.5, 0.5, 1)
    step = {"sum_loss": np.array([6.0, 1.0, 3.0]), "sum_specialist_loss": np.array([4.0, 4.0, 2.0]),
            "sum_clipped_excess": np.array([2.5, 0.5, 1.0]), "count": np.array([2, 2, 1])}
    expected = {("per_example", "specialist"): [1.25, 0.25, 1.0],
                ("per_task_mean", "specialist"): [1.0, 0.0, 1.0],
                ("none", "specialist"): [1.0, -1.5, 1.0],
                ("per_example", "none"): [3.0, 0.5, 3.0],
                ("none", "none"): [3.0, 0.5, 3.0]}
    for (clip, target), g_hat in expected.items():
        p = policy("ama_r", eta_alpha=1.0, smoothing=0.0, clip=clip, excess_target=target)
        record = p.update(step)
        assert record["g_hat"].tolist() == g_hat, (clip, target)
        np.testing.assert_allclose(p.weights(), np.exp(g_hat) / np.exp(g_hat).sum(), rtol=1e-13)


# --- baselines ---------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, settings, alpha", [
    ("proportional", {}, [10 / 12, 1 / 12, 1 / 12]),
    ("balanced", {}, [1 / 3, 1 / 3, 1 / 3]),
    ("fixed", {"fixed_weights": {"code": 1, "math": 2, "safety": 1}}, [0.5, 0.25, 0.25]),
    ("fixed", {"fixed_weights": {"code": 0, "math": 3, "safety": 1}}, [0.75, 0.25, 0.0]),
])
def test_baselines_do_not_move_but_keep_records(algorithm, settings, alpha):
    p = policy(algorithm, **settings)
    assert p.mode == "sample" and p.loss_weights(p.weights()) is None
    for step in range(3):
        record = p.update(stats([1.0, 2.0, 0.0], [4, 4, 0]))
        assert record["step"] == step
        np.testing.assert_allclose(record["g_hat"], [0.25, 0.5, 0.0], rtol=1e-15)  # mean excess
        np.testing.assert_allclose(p.weights(), alpha, rtol=1e-15)
    np.testing.assert_allclose(p.running_mean(), alpha, rtol=1e-15)


def test_records_do_not_alias_the_callers_arrays():
    p = policy("ama_s")
    step = stats([1.0, 2.0, 0.5], [4, 4, 2])
    record = p.update(step)
    step["sum_loss"][:] = -1.0
    assert record["sum_loss"].tolist() == [1.0, 2.0, 0.5]
    assert record["count"].dtype == np.int64


@pytest.mark.parametrize("bad", [
    {"count": np.array([1, -1, 0])}, {"count": np.array([1.5, 1, 0])},
    {"sum_loss": np.array([np.nan, 0, 0])}, {"sum_loss": np.zeros(2)},
])
def test_bad_statistics_are_refused(bad):
    with pytest.raises(ValueError):
        policy("ama_r").update({**stats([1.0, 1.0, 1.0], [1, 1, 1]), **bad})
    with pytest.raises(ValueError, match="keys"):
        policy("ama_r").update({key: np.zeros(3) for key in STAT_KEYS[:3]})


# --- sampling ----------------------------------------------------------------------------------

def test_sample_frequencies_match_alpha():
    alpha = np.array([0.6, 0.3, 0.1])
    labels = draw_tasks("sample", alpha, 20_000, np.random.default_rng(1234))
    observed = np.bincount(labels, minlength=3)
    expected = alpha * len(labels)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    # 13.82 is the 0.999 quantile of chi-square with 2 degrees of freedom: a correct sampler
    # exceeds it for 1 seed in 1000, while a sampler 1 point off on alpha = 0.1 has an expected
    # statistic of about 20000 * 0.01^2 / 0.1 = 20, so the test has power where it matters.
    assert chi2 < 13.82, (observed, expected)
    p = policy("fixed", fixed_weights={"math": 0.6, "safety": 0.3, "code": 0.1})
    assert np.array_equal(p.sample(20_000, np.random.default_rng(1234)), labels)


def test_ama_r_batches_are_stratified_and_ties_rotate():
    p = policy("ama_r", smoothing=0.0)
    rng = np.random.default_rng(7)
    extra = np.zeros(3)
    for _ in range(3000):
        counts = np.bincount(p.sample(10, rng), minlength=3)
        assert sorted(counts.tolist()) == [3, 3, 4]
        extra += counts == 4
    # Each task should get the 10th example in 1/3 of batches: binomial sd = sqrt(3000 * 2/9)
    # = 25.8, so +-4 sd = +-103 fails a fair tie-break with probability < 1e-4 per task.
    assert np.all(np.abs(extra - 1000) < 103), extra
    assert sorted(np.bincount(p.sample(3, rng)).tolist()) == [1, 1, 1]


@pytest.mark.parametrize("weights, n, counts", [
    ([0.5, 0.3, 0.2], 7, [4, 2, 1]),   # quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1; +1 to 0.5
    ([1, 1, 1], 5, [2, 2, 1]),         # ties go to the lower index without an rng
    ([0.2, 0.3, 0.5], 10, [2, 3, 5]),  # exact
    ([1, 0, 0], 4, [4, 0, 0]),
    ([1, 1], 0, [0, 0]),
])
def test_largest_remainder(weights, n, counts):
    assert largest_remainder(np.array(weights, dtype=float), n).tolist() == counts


def test_largest_remainder_is_within_one_of_the_quota():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.random(int(rng.integers(1, 8)))
        n = int(rng.integers(0, 50))
        counts = largest_remainder(w, n, rng)
        assert counts.sum() == n and np.all(np.abs(counts - w / w.sum() * n) < 1)
    for bad in ([-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError):
            largest_remainder(np.array(bad), 3)


# --- AMA-H -----------------------------------------------------------------------------------

H1 = [0.3427263759829035, 0.33320893864808976, 0.32406468536900673]  # 0.7 softmax(.08, .04, 0) + 0.1


def held(clipped, count, loss=None):
    return {"heldout_" + key: value for key, value in stats(clipped, count, loss).items()}


def test_ama_h_moves_only_on_held_out_sums_every_m_steps():
    p = policy("ama_h", eta_alpha=0.2, smoothing=0.3, heldout_every=2)
    assert [p.wants_heldout(t) for t in range(5)] == [True, False, True, False, True]
    train = stats([5.0, 0.0, 0.0], [8, 0, 0])  # the training batch's sums never move alpha
    # step 0: held-out mean excess e = (0.6/3, 0.3/3, 0/3) = (0.2, 0.1, 0); w += 0.2 * m e, m = 2
    record = p.update({**train, **held([0.6, 0.3, 0.0], [3, 3, 3])})
    np.testing.assert_allclose(record["g_hat"], [0.4, 0.2, 0.0], rtol=1e-15)
    assert record["heldout_count"].tolist() == [3, 3, 3] and record["heldout_sum_clipped_excess"].tolist() == [0.6, 0.3, 0.0]
    np.testing.assert_allclose(p.weights(), H1, rtol=1e-13)
    with pytest.raises(ValueError, match="sent but not wanted"):
        p.update({**train, **held([1.0, 1.0, 1.0], [1, 1, 1])})
    record = p.update(train)  # step 1: nothing measured, alpha stays
    assert record["g_hat"].tolist() == [0.0] * 3 and record["heldout_count"].tolist() == [0] * 3
    np.testing.assert_allclose(p.weights(), H1, rtol=1e-15)
    with pytest.raises(ValueError, match="wanted but not sent"):
        p.update(train)
    # step 2 with clip per_task_mean: e = max(mean L - mean s, 0) = (0, 0.5, 0) -> w = (0.08, 0.24, 0)
    q = policy("ama_h", eta_alpha=0.2, smoothing=0.3, heldout_every=2, clip="per_task_mean")
    q.load_state_dict(p.state_dict())
    q.update({**train, **held([9.0, 9.0, 9.0], [2, 2, 2], loss=[-0.4, 1.0, 0.0])})
    w = np.array([0.08, 0.24, 0.0])
    np.testing.assert_allclose(q.weights(), 0.7 * np.exp(w) / np.exp(w).sum() + 0.1, rtol=1e-13)


# --- state -------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["ama_s", "ama_r", "proportional", "ama_h"])
def test_state_round_trip_replays_the_same_trajectory(algorithm):
    rng = np.random.default_rng(3)
    steps = [stats(rng.random(3) * 3, rng.integers(1, 6, size=3)) for _ in range(10)]
    if algorithm == "ama_h":  # held-out sums at every other step (heldout_every 2)
        steps = [{**s, **held(rng.random(3), rng.integers(1, 6, size=3))} if t % 2 == 0 else s for t, s in enumerate(steps)]
    original = policy(algorithm, eta_alpha=0.7, smoothing=0.2, heldout_every=2)
    records = [original.update(s) for s in steps[:5]]
    saved = json.loads(json.dumps(original.state_dict()))
    records += [original.update(s) for s in steps[5:]]

    resumed = policy(algorithm, eta_alpha=0.7, smoothing=0.2, heldout_every=2)
    resumed.load_state_dict(saved)
    assert resumed.step == 5
    replay = [resumed.update(s) for s in steps[5:]]
    for a, b in zip(records[5:], replay):
        assert a["step"] == b["step"]
        assert a["alpha"].tolist() == b["alpha"].tolist()  # exact, not approximate
        assert a["g_hat"].tolist() == b["g_hat"].tolist()
    assert resumed.weights().tolist() == original.weights().tolist()
    assert resumed.running_mean().tolist() == original.running_mean().tolist()
    assert resumed.state_dict() == original.state_dict()


def test_state_of_another_algorithm_is_refused():
    from ama_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint mixing state"):
        policy("ama_r").load_state_dict(policy("ama_s").state_dict())
