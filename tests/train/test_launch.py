"""Running several training runs at once: results, errors, and what Ctrl-C does."""

from __future__ import annotations

import threading

import pytest

from ama_ray.train import launch

pytestmark = pytest.mark.timeout(120)


def test_results_and_the_first_error_after_all_jobs_ended(ray_session):
    ran = []

    def ok(name):
        def fn():
            ran.append(name)
            return name.upper()
        return fn

    def boom():
        raise ValueError("run b failed")

    assert launch.run_concurrently([("a", ok("a")), ("c", ok("c"))], 2, "progress-test-ok") == {"a": "A", "c": "C"}
    ran.clear()
    with pytest.raises(ValueError, match="run b failed"):
        launch.run_concurrently([("a", ok("a")), ("b", boom), ("c", ok("c"))], 1, "progress-test-err")
    assert sorted(ran) == ["a", "c"], "one failed run must not stop the others"


def test_ctrl_c_starts_no_queued_run_and_leaves_ray(ray_session, monkeypatch):
    """Before: the pool's `with` waited for every queued run after Ctrl-C, so nothing stopped."""
    started, release = [], threading.Event()
    left = []
    monkeypatch.setattr(ray_session, "shutdown", lambda: left.append(True))  # keep the session's Ray

    def slow(name):
        def fn():
            started.append(name)
            release.wait(30)
        return fn

    def interrupt(snapshot, bars):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "draw", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            launch.run_concurrently([("a", slow("a")), ("b", slow("b")), ("c", slow("c"))], 1, "progress-test-int")
    finally:
        release.set()
    assert started == ["a"] and left == [True]
