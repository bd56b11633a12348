"""Connecting to Ray and checking resource requests before they can hang."""

from __future__ import annotations

import logging
import os

from ama_ray.errors import ResourceError

log = logging.getLogger(__name__)
NAMESPACE = "ama_ray"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster of a submitted job, or start local Ray on loopback.

    Inside `ray job submit` (RAY_ADDRESS set) this joins that cluster; on a laptop it starts a
    local Ray bound to 127.0.0.1 without the dashboard. An existing connection is reused.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    quiet = not verbose()
    if quiet:
        # Ray Data logs every dataset's plan and, without a terminal, a progress block every few
        # seconds; the stages log one line per task instead (terminal progress bars stay).
        import ray.data  # noqa: F401 - configures the "ray.data" logger; the level is set after

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=NAMESPACE, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        namespace=NAMESPACE,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "ama_ray.cluster.quiet_worker_logs",
                     "env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}} if quiet else None,
    )


# A warning Ray Train's placement-group cleaner repeats every few seconds on a local Ray without
# the dashboard's state API (harmless: it keeps monitoring). Ray Train's own INFO lines are
# filtered by the trainers' `LoggingConfig` (train/launch.py).
_CHATTY = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}


def quiet_worker_logs() -> None:
    """Worker-process setup hook of local Ray: keep Ray Train's chatter out of the console.

    The driver's own progress lines (`ama_ray.train.launch`) report every run; warnings and
    errors from workers still reach the console, and everything is in Ray's session logs.
    """
    for name, level in _CHATTY.items():
        logging.getLogger(name).setLevel(level)
    # Train V2 logs every `ray.train.report` at INFO on a logger named by its file's path; named
    # here without importing Ray Train into every worker process.
    import ray

    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def verbose() -> bool:
    """Whether Ray's own INFO logs belong on the console (`ama-ray -v`)."""
    return logging.getLogger("ama_ray").isEnabledFor(logging.DEBUG)


def check_fits(what: str, bundle: dict[str, float], count: int, key: str) -> None:
    """Raise ResourceError when `count` bundles can never be placed on the cluster.

    Checks each bundle against the largest node and the total against the whole cluster, so a
    request no node can satisfy fails at once instead of waiting forever. `key` names the config
    setting to change.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return
    for res, amount in bundle.items():
        if amount <= 0:
            continue
        biggest = max(n.get(res, 0.0) for n in nodes)
        total = sum(n.get(res, 0.0) for n in nodes)
        if amount > biggest + 1e-9 or amount * count > total + 1e-9:
            raise ResourceError(
                f"{what} asks for {count} x {amount:g} {res} but the cluster has {total:g} "
                f"(largest node {biggest:g})",
                where=key,
                fix=f"lower {key} or add nodes with {res}",
            )
