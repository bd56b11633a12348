"""A workaround for Ray internals used by the Tune study: placement groups of stopped trials.

When ASHA stops a trial, Tune kills its actor and with it the trial's Train controller; the
controller's placement group outlives it (Ray keeps a placement group until its creator actor
*and* job are gone) and Train V2's own cleaner needs the dashboard's state API, which a local
Ray without dashboard lacks. Left alone, the next trial waits forever for the CPUs. This reads
Ray's private placement-group table (`ray._private.state`): check it on every Ray upgrade.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

log = logging.getLogger("ama_ray.stages.tune")


class OrphanedGroupCleanup(Callback):
    """Driver-side Tune callback: frees the worker placement groups of stopped trials.

    When ASHA stops a trial, Tune kills its actor and with it the trial's Train controller;
    the controller's placement group outlives it (Ray keeps a placement group until its
    creator actor *and* job are gone) and Train V2's own cleaner needs the dashboard's state
    API, which a local Ray without dashboard lacks. Left alone, the next trial waits forever
    for the CPUs. Every couple of seconds this removes this job's placement groups whose
    creating actor is dead.
    """

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last, self.removed = every_s, 0.0, 0

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.removed += remove_orphaned_groups()

    def on_experiment_end(self, trials, **info):
        # The last stopped trial's controller may still be dying: wait for it, then free its group.
        deadline = time.monotonic() + 30.0
        while True:
            self.removed += remove_orphaned_groups()
            if not _actor_created_groups() or time.monotonic() > deadline:
                return
            time.sleep(0.5)


def _live_groups(job: str):
    """This job's pending or created placement groups made by (non-detached) actors."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    live = (gcs_pb2.PlacementGroupTableData.PENDING, gcs_pb2.PlacementGroupTableData.CREATED)
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        if pg.state in live and pg.creator_actor_id != ray.ActorID.nil().binary() and not pg.is_detached \
                and pg.creator_job_id.hex() == job:
            yield pg


def _actor_created_groups() -> list:
    import ray

    return list(_live_groups(ray.get_runtime_context().get_job_id()))


def remove_orphaned_groups() -> int:
    """Remove this job's live placement groups whose creator actor died; returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup

    removed = 0
    for pg in _live_groups(ray.get_runtime_context().get_job_id()):
        if pg.creator_actor_dead:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    if removed:
        log.info("tune: removed %d placement group(s) left by stopped trials", removed)
    return removed
