"""Overhead of the mixing actor: report latency and throughput, alpha fetches, overlapped wait.

For k = 3, 100, 1000 tasks (AMA-S) on a local Ray cluster (loopback):
- report: one rank 0 sending `report` and waiting for each reply (p50/p99 latency, updates/s),
  and the same number of reports pipelined (updates/s);
- get_alpha: CLIENTS concurrent clients (Ray tasks) fetching alpha (p50/p99);
- overlapped wait: WORKERS simulated training workers; after step t's statistics rank 0 sends
  `report(t)` with .remote(), every worker sends `get_alpha(t+1)`, sleeps OPTIMIZER_MS (the
  optimizer step) and then waits for alpha: the wait is what a worker loses per step.

    python benchmarks/actor.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

CLIENTS, WORKERS, OPTIMIZER_MS = 4, 2, 10.0


def fake_stats(k: int, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    count = rng.integers(1, 4, size=k)
    excess = rng.random(k) * count
    return {"sum_loss": excess + count, "sum_specialist_loss": count.astype(float),
            "sum_clipped_excess": excess, "count": count}


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def fetch_client(name: str, calls: int) -> list[float]:
    """Fetch alpha of the current step `calls` times; return each latency (s)."""
    import ray
    from ama_ray.mixing.actor import get_mixing_actor

    actor = get_mixing_actor(name)
    step = ray.get(actor.get_alpha.remote(0))["step"]
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(actor.get_alpha.remote(step))
        latencies.append(time.perf_counter() - start)
    return latencies


def training_worker(name: str, rank: int, k: int, steps: int, first: int) -> list[float]:
    """A worker's loop from step `first`; returns the per-step wait for the next alpha (s)."""
    import ray
    from ama_ray.mixing.actor import get_mixing_actor

    actor = get_mixing_actor(name)
    ray.get(actor.get_alpha.remote(first))
    waits = []
    for step in range(first, first + steps):
        stats = fake_stats(k, step) if rank == 0 else None  # all-reduced statistics of step t
        if rank == 0:
            actor.report.remote(step, stats)
        pending = actor.get_alpha.remote(step + 1)
        time.sleep(OPTIMIZER_MS / 1e3)  # optimizer.step() runs while alpha_{t+1} travels
        start = time.perf_counter()
        ray.get(pending)
        waits.append(time.perf_counter() - start)
    return waits


def bench(k: int, steps: int) -> dict[str, float]:
    import ray
    from ama_ray.mixing import MixingSettings
    from ama_ray.mixing.actor import create_mixing_actor

    name = f"bench-mixing-k{k}"
    tasks = [f"task{i}" for i in range(k)]
    actor = create_mixing_actor(name, "ama_s", tasks, [1] * k, MixingSettings())
    row = {"k": k}
    latencies = []
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        ray.get(actor.report.remote(step, fake_stats(k, step)))
        latencies.append(time.perf_counter() - t0)
    row["report/s"] = steps / (time.perf_counter() - start)
    row["report p50"], row["report p99"] = percentiles(latencies)
    start = time.perf_counter()
    ray.get([actor.report.remote(s, fake_stats(k, s)) for s in range(steps, 2 * steps)])
    row["pipelined/s"] = steps / (time.perf_counter() - start)

    fetch = ray.remote(num_cpus=0)(fetch_client)
    results = ray.get([fetch.remote(name, steps) for _ in range(CLIENTS)])
    row["alpha p50"], row["alpha p99"] = percentiles(sum(results, []))

    worker = ray.remote(num_cpus=0)(training_worker)
    waits = ray.get([worker.remote(name, r, k, steps, 2 * steps) for r in range(WORKERS)])
    row["wait p50"], row["wait p99"] = percentiles(sum(waits, []))
    ray.kill(actor)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--k", type=int, nargs="+", default=[3, 100, 1000])
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [bench(k, args.steps) for k in args.k]
    print(f"| k | report p50/p99 ms | reports/s (sync) | reports/s (pipelined) | "
          f"get_alpha p50/p99 ms ({CLIENTS} clients) | wait for alpha p50/p99 ms "
          f"({WORKERS} workers, {OPTIMIZER_MS:g} ms step) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['report p50']:.2f} / {r['report p99']:.2f} | {r['report/s']:.0f} "
              f"| {r['pipelined/s']:.0f} | {r['alpha p50']:.2f} / {r['alpha p99']:.2f} "
              f"| {r['wait p50']:.3f} / {r['wait p99']:.3f} |")
    print(f"\n{args.steps} steps per measurement, {os.cpu_count()} CPUs")
    ray.shutdown()


if __name__ == "__main__":
    main()
