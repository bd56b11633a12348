"""`ama-ray run`: every stage in order, reading like the stage diagram.

    prepare -> reference -> specialists -> score -> generalist -> evaluate -> report

Each stage skips the units it already committed with the same settings, so rerunning after a
crash or a change redoes only what is missing or stale.
"""

from __future__ import annotations

import logging
import time

from ama_ray.config import Config
from ama_ray.stages import evaluate, generalist, prepare, reference, report, score, specialists

log = logging.getLogger(__name__)


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Run the whole pipeline for `cfg`; returns the report files."""
    start = time.perf_counter()
    prepare.run(cfg, force)
    reference.run(cfg, force)
    specialists.run(cfg, force)
    score.run(cfg, force)
    generalist.run(cfg, force)
    evaluate.run(cfg, force)
    written = report.run(cfg, force)
    log.info("pipeline finished in %.0f s; report: %s", time.perf_counter() - start, ", ".join(written))
    return written
