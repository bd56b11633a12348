"""Progress lines of the reference and score passes (`inference.RowProgress`): pure, no Ray."""

from __future__ import annotations

import logging

import pytest

from ama_ray.stages.inference import RowProgress

pytestmark = pytest.mark.timeout(30)


def test_a_line_per_tenth_of_the_rows_with_time_so_far_and_left(caplog):
    now = [100.0]
    progress = RowProgress("score: arithmetic", 1000, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="ama_ray.stages.inference")
    for _ in range(7):  # 7 blocks of 128 rows, 30 s each, then the last 104 rows at once
        now[0] += 30
        progress.add(128)
    progress.add(1000 - 7 * 128)
    lines = [r.getMessage() for r in caplog.records]
    # 128, 256, ..., 896, 1000 rows cross the tenths 1, 2, 3, 5, 6, 7, 8, then 10: one line each.
    assert [line.split(" rows ")[1].split(")")[0] for line in lines] == [
        "(12%", "(25%", "(38%", "(51%", "(64%", "(76%", "(89%", "(100%"]
    assert lines[0] == "score: arithmetic: 128 of 1,000 rows (12%) in 30 s, ~3.4 min left"  # 30 s * 872 / 128
    assert lines[3] == "score: arithmetic: 512 of 1,000 rows (51%) in 2.0 min, ~1.9 min left"
    assert lines[-1] == "score: arithmetic: 1,000 of 1,000 rows (100%) in 3.5 min, ~0 s left"


def test_nothing_is_logged_before_a_tenth_is_done(caplog):
    caplog.set_level(logging.INFO, logger="ama_ray.stages.inference")
    progress = RowProgress("reference", 6720, clock=lambda: 0.0)
    progress.add(600)
    assert caplog.records == []
    progress.add(72)
    assert [r.getMessage() for r in caplog.records] == ["reference: 672 of 6,720 rows (10%) in 0 s, ~0 s left"]
