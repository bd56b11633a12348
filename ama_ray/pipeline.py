"""`ama-ray run`: every stage in order, as in the stage diagram.

    [partition ->] prepare -> reference -> specialists -> score -> generalist -> merge -> evaluate -> report

(`ama_ray.stages.STAGES` lists them in this order.) Each stage skips the units it already
committed with the same settings, so rerunning after a crash redoes only what is missing; a
unit committed with other settings is never replaced silently (`--force <stage>` redoes it and
the later stages follow).
"""

from __future__ import annotations

import logging
import time

from ama_ray.config import Config
from ama_ray.stages import STAGES, stage

log = logging.getLogger(__name__)


def run(cfg: Config, force: set[str] = frozenset(), through: str = "report") -> list[str]:
    """Run the stages in order up to and including `through`; returns what the last one wrote."""
    start = time.perf_counter()
    written: list[str] = []
    for name in STAGES:
        written = stage(name).run(cfg, force)
        if name == through:
            break
    log.info("pipeline finished in %.0f s; %s", time.perf_counter() - start, ", ".join(written))
    return written
