"""Do the benchmark's tasks compete? DPO on each task alone vs on all, from the tiny SFT base.

Prints markdown tables (mean over seeds, with the range): held-out `logps/accuracies` and
`rewards/accuracies` per task for the base, `only-<task>` and `all`; the same split by row
kind; the acceptance numbers per seed; and an ablation, `only-arithmetic` trained on
arithmetic without its flagged share, which shows where the drop on refusal comes from.

    python benchmarks/competition.py [--seeds 5] [--steps 300] [--workers 2] [--cache ~/.cache/ama_ray]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from multiprocessing import Pool

from competition_measure import (
    METRICS,
    CompetitionSettings,
    competition_verdict,
    format_table,
    generate_without_flagged_arithmetic,
    measure_competition,
)
from ama_ray.models.tiny import ensure_tiny_base

KINDS = {
    "arithmetic": ("plain", "flagged"),
    "refusal": ("refuse", "hard_negative", "benign"),
    "brackets": ("not_reversed", "swapped", "wrong_type"),
}


def run_seed(job: tuple[str, CompetitionSettings]) -> tuple[dict, dict, float]:
    """Every run for one seed, plus the ablation; returns both results and the seconds taken."""
    base_dir, settings = job
    start = time.perf_counter()
    results = measure_competition(base_dir, settings)
    ablation = measure_competition(
        base_dir, settings, runs=["only-arithmetic"], generate=generate_without_flagged_arithmetic
    )
    return results, ablation, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2, help="processes (each uses one thread)")
    parser.add_argument("--cache", default="~/.cache/ama_ray", help="model cache holding the tiny base")
    args = parser.parse_args()

    base_dir = str(ensure_tiny_base(args.cache))
    settings = CompetitionSettings(steps=args.steps)
    jobs = [(base_dir, replace(settings, seed=s, data_seed=s)) for s in range(args.seeds)]
    with Pool(args.workers) as pool:
        outcomes = pool.map(run_seed, jobs)
    results = [r for r, _, _ in outcomes]

    print(f"{settings} over seeds 0-{args.seeds - 1} (seed = batch and data seed); base: {base_dir}\n")
    print("Held-out accuracies (%), mean (min-max) over seeds:\n")
    print(format_table(results, METRICS))
    print("\nHeld-out logps/accuracies (%) by row kind:\n")
    for task, kinds in KINDS.items():
        print(format_table(results, [f"logps/accuracies/{k}" for k in kinds], tasks=[task]) + "\n")
    print("Ablation: only-arithmetic without the flagged share (refusal rows unchanged):\n")
    refusal_kinds = ["logps/accuracies"] + [f"logps/accuracies/{k}" for k in KINDS["refusal"]]
    ablation = [{"only-arithmetic (flagged 0.3)": r["only-arithmetic"], "only-arithmetic (flagged 0)": a["only-arithmetic"]}
                for r, a, _ in outcomes]
    print(format_table(ablation, refusal_kinds, tasks=["refusal"]) + "\n")
    print("Acceptance (b) per seed (points): largest drop of another task below the base; "
          "largest all - only-A gain on A:\n")
    for seed, (result, _, seconds) in enumerate(outcomes):
        verdict = competition_verdict(result)
        print(f"- seed {seed}: max drop {100 * verdict['max_drop']:.1f}, max gap {100 * verdict['max_gap']:.1f} "
              f"({seconds:.0f} s)")


if __name__ == "__main__":
    main()
