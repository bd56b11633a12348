"""The mixing actor on a local Ray cluster: shared alpha per step, idempotence, restore."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ama_ray.errors import ConfigError
from ama_ray.mixing import MixingSettings, make_policy
from ama_ray.mixing.actor import create_mixing_actor, get_mixing_actor

pytestmark = pytest.mark.timeout(60)

TASKS = ("math", "safety", "code")
SIZES = (10, 1, 1)
SETTINGS = MixingSettings(eta_alpha=0.5, smoothing=0.2)
names = (f"test-mixing-{i}" for i in itertools.count())


def step_stats(step: int) -> dict[str, np.ndarray]:
    """Deterministic, step-dependent statistics (what rank 0 would all-reduce)."""
    rng = np.random.default_rng(step)
    count = rng.integers(1, 5, size=3)
    excess = rng.random(3) * count
    return {"sum_loss": excess + count, "sum_specialist_loss": count.astype(float),
            "sum_clipped_excess": excess, "count": count}


def local_alphas(algorithm: str, steps: int) -> list[list[float]]:
    """alpha_0..alpha_steps from a policy driven directly with the same statistics."""
    policy = make_policy(algorithm, TASKS, SIZES, SETTINGS)
    alphas = [policy.weights().tolist()]
    for step in range(steps):
        policy.update(step_stats(step))
        alphas.append(policy.weights().tolist())
    return alphas


def client(name: str, rank: int, steps: int) -> list[list[float]]:
    """A training worker: fetch alpha_t for every step; rank 0 also reports step t."""
    actor = get_mixing_actor(name)
    seen = []
    for step in range(steps):
        import ray

        reply = ray.get(actor.get_alpha.remote(step, timeout_s=30))
        assert reply["step"] == step
        seen.append(reply["alpha"].tolist())
        if rank == 0:
            actor.report.remote(step, step_stats(step))  # overlapped with the "optimizer step"
    return seen


@pytest.mark.parametrize("algorithm", ["ama_s", "ama_r"])
def test_concurrent_clients_see_the_same_alpha_per_step(ray_local, algorithm):
    ray = ray_local
    name, steps = next(names), 25
    actor = create_mixing_actor(name, algorithm, TASKS, SIZES, SETTINGS)
    remote_client = ray.remote(num_cpus=0)(client)
    seen = ray.get([remote_client.remote(name, rank, steps) for rank in range(4)])
    expected = local_alphas(algorithm, steps)[:steps]
    for alphas in seen:
        assert alphas == expected  # exact: the actor runs the same float64 arithmetic
    # The clients fire the last report with .remote() and return: wait for it to be applied
    # (get_alpha(steps) blocks until step steps-1 is reported) before reading the history.
    reply = ray.get(actor.get_alpha.remote(steps))
    history = ray.get(actor.history.remote())
    assert [r["step"] for r in history] == list(range(steps))
    assert reply["alpha"].tolist() == local_alphas(algorithm, steps)[steps]
    if algorithm == "ama_r":
        assert reply["mode"] == "reweight" and reply["loss_weights"].tolist() == reply["alpha"].tolist()
    else:
        assert reply["mode"] == "sample" and reply["loss_weights"] is None


def test_get_alpha_waits_for_the_step(ray_local):
    ray = ray_local
    actor = create_mixing_actor(next(names), "ama_s", TASKS, SIZES, SETTINGS)
    pending = actor.get_alpha.remote(1)
    ready, _ = ray.wait([pending], timeout=0.5)
    assert not ready
    ray.get(actor.report.remote(0, step_stats(0)))
    assert ray.get(pending, timeout=10)["alpha"].tolist() == local_alphas("ama_s", 1)[1]
    with pytest.raises(TimeoutError):
        ray.get(actor.get_alpha.remote(5, timeout_s=0.2), timeout=10)
    ray.get(actor.report.remote(1, step_stats(1)), timeout=10)  # still serving after a timeout
    assert ray.get(actor.get_alpha.remote(2), timeout=10)["step"] == 2


def test_report_is_idempotent_and_applied_in_step_order(ray_local):
    ray = ray_local
    actor = create_mixing_actor(next(names), "ama_r", TASKS, SIZES, SETTINGS)
    first = ray.get(actor.report.remote(0, step_stats(0)))
    again = ray.get(actor.report.remote(0, step_stats(0)))  # a re-sent step: not applied twice
    assert again["alpha"].tolist() == first["alpha"].tolist()
    assert len(ray.get(actor.history.remote())) == 1
    assert ray.get(actor.get_alpha.remote(1))["alpha"].tolist() == local_alphas("ama_r", 1)[1]
    # a report that overtakes its predecessor waits for it; a missing one times out
    later = actor.report.remote(2, step_stats(2))
    ray.get(actor.report.remote(1, step_stats(1)))
    assert ray.get(later, timeout=10)["step"] == 2
    assert ray.get(actor.get_alpha.remote(3))["alpha"].tolist() == local_alphas("ama_r", 3)[3]
    with pytest.raises(TimeoutError):
        ray.get(actor.report.remote(5, step_stats(5), timeout_s=0.2), timeout=10)


def test_get_or_create_shares_one_actor_and_refuses_a_different_config(ray_local):
    ray = ray_local
    name = next(names)
    first = create_mixing_actor(name, "ama_s", TASKS, SIZES, SETTINGS)
    ray.get(first.report.remote(0, step_stats(0)))
    second = create_mixing_actor(name, "ama_s", TASKS, SIZES, SETTINGS)
    assert len(ray.get(second.history.remote())) == 1
    with pytest.raises(ConfigError, match=name):
        create_mixing_actor(name, "ama_r", TASKS, SIZES, SETTINGS)


def test_restore_discards_later_history_and_replays_the_trajectory(ray_local):
    ray = ray_local
    actor = create_mixing_actor(next(names), "ama_s", TASKS, SIZES, SETTINGS)
    for step in range(3):
        ray.get(actor.report.remote(step, step_stats(step)))
    state, history = ray.get(actor.state.remote())  # the checkpoint after 3 steps
    for step in range(3, 6):
        ray.get(actor.report.remote(step, step_stats(step)))
    first_run = [r["alpha"].tolist() for r in ray.get(actor.history.remote())]

    assert ray.get(actor.restore.remote(state, 3)) == 3
    assert [r["step"] for r in ray.get(actor.history.remote())] == [0, 1, 2]
    for step in range(3, 6):  # the resumed run re-sends steps 3..5: applied again, same numbers
        ray.get(actor.report.remote(step, step_stats(step)))
    assert [r["alpha"].tolist() for r in ray.get(actor.history.remote())] == first_run
    with pytest.raises(ValueError, match="step 3"):
        ray.get(actor.restore.remote(state, 4))

    # a fresh actor seeded from the checkpoint serves the old steps' alpha too
    fresh = create_mixing_actor(next(names), "ama_s", TASKS, SIZES, SETTINGS, state, history)
    assert ray.get(fresh.get_alpha.remote(1))["alpha"].tolist() == first_run[1]
    assert ray.get(fresh.get_alpha.remote(3))["alpha"].tolist() == first_run[3]


def _drive(service, steps: int) -> tuple[list[list[float]], dict]:
    """The training loop's calls on a `MixingService`: alpha_t, report, prefetch; a checkpoint at steps // 2."""
    alphas, saved = [], None
    for step in range(steps):
        service.prefetch(step)
        alphas.append(service.alpha(step).tolist())
        service.report(step, step_stats(step))
        service.prefetch(step + 1)
        if step + 1 == steps // 2:
            saved = service.state()
    return alphas, saved


def test_local_and_ray_mixers_answer_the_protocol_alike(ray_local):
    """`LocalMixer` (in process) is the actor's twin: same alphas, same checkpoint state, and a
    restore from that state replays the same second half."""
    from ama_ray.mixing import LocalMixer
    from ama_ray.mixing.actor import RayMixer

    name, steps = next(names), 12
    actor = create_mixing_actor(name, "ama_s", TASKS, SIZES, SETTINGS)
    ray_mixer, local = RayMixer(name, rank=0), LocalMixer(make_policy("ama_s", TASKS, SIZES, SETTINGS))
    ray_alphas, ray_state = _drive(ray_mixer, steps)
    local_alphas_, local_state = _drive(local, steps)
    assert ray_alphas == local_alphas_ == local_alphas("ama_s", steps)[:steps]
    assert ray_state["policy"] == local_state["policy"]
    assert [r["step"] for r in ray_state["history"]] == [r["step"] for r in local_state["history"]] == list(range(steps // 2))
    fresh = LocalMixer(make_policy("ama_s", TASKS, SIZES, SETTINGS))
    fresh.restore(local_state, steps // 2)
    replay = []
    for step in range(steps // 2, steps):
        replay.append(fresh.alpha(step).tolist())
        fresh.report(step, step_stats(step))
    assert replay == ray_alphas[steps // 2:]
    with pytest.raises(ValueError, match="in order"):
        fresh.report(3, step_stats(3))
    ray_local.kill(actor)
