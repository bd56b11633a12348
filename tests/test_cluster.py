"""Console hygiene of local Ray: the worker setup hook silences exactly Ray Train's chatty loggers."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.timeout(60)


def test_quiet_worker_logs_targets_ray_trains_own_loggers():
    from ray.train.v2._internal.execution import context
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from ama_ray.cluster import quiet_worker_logs

    saved = {lg: lg.level for lg in (context.logger, placement_group_cleaner.logger)}
    try:
        for lg in saved:
            lg.setLevel(logging.NOTSET)
        quiet_worker_logs()
        # The per-report INFO line ("Reporting training result ...") and the cleaner's warning.
        assert not context.logger.isEnabledFor(logging.INFO) and context.logger.isEnabledFor(logging.WARNING)
        assert not placement_group_cleaner.logger.isEnabledFor(logging.WARNING)
        assert placement_group_cleaner.logger.isEnabledFor(logging.ERROR)
    finally:
        for lg, level in saved.items():
            lg.setLevel(level)
