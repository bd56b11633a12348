"""Fixtures of the mixing tests: a local Ray cluster on loopback for the actor tests only."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray cluster for this module; reuses one that is already running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Keeps every Ray process on 127.0.0.1 (measured; `_node_ip_address` alone did not).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
