"""Fixtures of the mixing tests: the actor tests use the session's one local Ray (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local(ray_session):
    """The session-wide local Ray on loopback; never a second cluster."""
    yield ray_session
