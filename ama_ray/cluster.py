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
    )


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
