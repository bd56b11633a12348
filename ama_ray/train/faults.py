"""Fault injection for the reliability tests: kill a training worker at a chosen step, once."""

from __future__ import annotations

import logging
import os
import signal
import time

from ama_ray.storage import RunDir

log = logging.getLogger("ama_ray.train.loop")
FAULT_ENV = "AMA_RAY_FAULT"
FAULT_DELAY_S = 2.0


def maybe_inject_fault(fault: str | None, step: int, rank: int, run: RunDir, unit: str) -> None:
    """Fault injection for reliability tests: `kill:rank=R:step=S` SIGKILLs worker R at step S, once.

    Off unless the unit spec or the AMA_RAY_FAULT environment variable sets it. A marker file in
    the run directory makes it fire only on the first attempt, so the resumed run completes.
    """
    fault = fault or os.environ.get(FAULT_ENV)
    if not fault:
        return
    parts = dict(p.split("=", 1) for p in fault.split(":")[1:])
    if int(parts.get("rank", 0)) != rank or int(parts.get("step", -1)) != step:
        return
    marker = run.faults() / (unit.replace("/", "_") + f"_step{step}")
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log.warning("fault injection: killing worker rank %d (pid %d) at step %d", rank, os.getpid(), step)
    # Ray Train's controller registers a reported checkpoint when it next polls the workers; a
    # crash a few milliseconds after a checkpoint would race that poll. Wait, as a real failure
    # some time after the checkpoint would, so the test of resuming from it is deterministic.
    time.sleep(FAULT_DELAY_S)
    os.kill(os.getpid(), signal.SIGKILL)
