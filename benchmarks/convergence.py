"""Minimax gap of the averaged iterate on the known-answer quadratic tasks, T = 1k, 4k, 16k.

Step sizes scale as 1/sqrt(T) (theta: LR0/sqrt(T), alpha: ETA0/sqrt(T)); AMA-S's smoothing
shrinks as c = C0 T^(-1/4). Prints a markdown table (mean over seeds, with the standard error)
and the fitted exponent of gap ~ T^p, and writes a log-log plot.

    python benchmarks/convergence.py [--seeds 8] [--plot docs/img/convergence.png]
"""

from __future__ import annotations

import argparse
import math
import time
from multiprocessing import Pool

import numpy as np

from ama_ray.mixing import MixingSettings, make_policy
from ama_ray.mixing.known_answer import simulate, triangle_tasks

LR0, ETA0, C0, BATCH = 10.0, 10.0, 1.0, 8
ALGORITHMS = ("proportional", "balanced", "ama_r", "ama_s")
TASK_NAMES = ("big", "left", "right")


def settings_for(algorithm: str, steps: int) -> MixingSettings:
    """The benchmark's settings: c = 0 for AMA-R, c = C0 T^-1/4 for AMA-S."""
    smoothing = {"ama_r": 0.0, "ama_s": min(1.0, C0 * steps**-0.25)}.get(algorithm, 0.1)
    return MixingSettings(eta_alpha=ETA0 / math.sqrt(steps), smoothing=smoothing)


def run_one(job: tuple[str, int, int]) -> tuple[str, int, int, float, float]:
    """One (algorithm, T, seed): returns the job, the minimax gap and the distance to the centre."""
    import torch

    torch.set_num_threads(1)
    algorithm, steps, seed = job
    tasks = triangle_tasks()
    policy = make_policy(algorithm, TASK_NAMES, tasks.sizes, settings_for(algorithm, steps))
    theta = simulate(policy, tasks, steps, LR0 / math.sqrt(steps), BATCH, seed)
    gap = float(tasks.minimax_gap(theta))
    return algorithm, steps, seed, gap, float(np.linalg.norm(theta - tasks.centre))


def fit_exponent(steps: list[int], gaps: list[float]) -> float:
    """Least-squares slope of log(gap) against log(T)."""
    return float(np.polyfit(np.log(steps), np.log(gaps), 1)[0])


def plot(summary: dict, steps: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for algorithm in ALGORITHMS:
        means = [summary[algorithm, t][0] for t in steps]
        errs = [summary[algorithm, t][1] for t in steps]
        ax.errorbar(steps, means, yerr=errs, marker="o", capsize=3, label=algorithm)
    ref = summary["ama_r", steps[0]][0]
    ax.plot(steps, [ref * (t / steps[0]) ** -0.5 for t in steps], "k--", label="T^-1/2")
    ax.set(xscale="log", yscale="log", xlabel="steps T", ylabel="minimax gap of averaged iterate",
           title="Known-answer quadratic tasks (sizes 10:1:1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--plot", default="docs/img/convergence.png")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    jobs = [(a, t, s) for t in args.steps for a in ALGORITHMS for s in range(args.seeds)]
    start = time.perf_counter()
    with Pool(args.workers) as pool:
        results = pool.map(run_one, jobs, chunksize=1)
    summary = {}
    for algorithm in ALGORITHMS:
        for t in args.steps:
            rows = [r for r in results if r[0] == algorithm and r[1] == t]
            gaps, dists = np.array([r[3] for r in rows]), np.array([r[4] for r in rows])
            summary[algorithm, t] = (gaps.mean(), gaps.std(ddof=1) / math.sqrt(len(gaps)),
                                     dists.mean())
    print(f"| algorithm | " + " | ".join(f"gap T={t}" for t in args.steps)
          + " | distance to centre at T=%d | fitted exponent |" % args.steps[-1])
    print("|---" * (len(args.steps) + 3) + "|")
    for algorithm in ALGORITHMS:
        cells = [f"{summary[algorithm, t][0]:.2e} ± {summary[algorithm, t][1]:.1e}"
                 for t in args.steps]
        exponent = fit_exponent(args.steps, [summary[algorithm, t][0] for t in args.steps])
        print(f"| {algorithm} | " + " | ".join(cells)
              + f" | {summary[algorithm, args.steps[-1]][2]:.3f} | {exponent:+.2f} |")
    print(f"\n{args.seeds} seeds, batch {BATCH}, lr {LR0}/sqrt(T), eta_alpha {ETA0}/sqrt(T), "
          f"AMA-S c = {C0} T^-1/4; {time.perf_counter() - start:.0f} s")
    plot(summary, args.steps, args.plot)


if __name__ == "__main__":
    main()
