"""The mixture a generalist used, by phase of training: mean alpha per task over equal thirds of
the steps, averaged over seeds (each seed's `mixing_history.parquet`).

    python scripts/alpha_phases.py RUN_DIR ALGORITHM [--phases 3]

Prints one line per phase, `steps a-b: task=alpha ...`; docs/results.md quotes it to show how
each arm's mixture moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def phases(run_dir: Path, algorithm: str, count: int) -> list[tuple[int, int, dict[str, float]]]:
    """(first step, last step, task -> mean alpha) per phase; SystemExit when no seed is committed."""
    files = sorted((run_dir / "generalist" / algorithm).glob("seed*/mixing_history.parquet"))
    if not files:
        sys.exit(f"no committed {algorithm} generalist under {run_dir}/generalist/{algorithm}")
    tables = [pq.read_table(f) for f in files]
    tasks = [c.split("/", 1)[1] for c in tables[0].column_names if c.startswith("alpha/")]
    alphas = np.mean([np.column_stack([t[f"alpha/{task}"].to_numpy() for task in tasks]) for t in tables], axis=0)
    out = []
    for part in np.array_split(np.arange(len(alphas)), count):
        out.append((int(part[0]), int(part[-1]), dict(zip(tasks, alphas[part].mean(axis=0).tolist()))))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("algorithm")
    parser.add_argument("--phases", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{args.run_dir.name} {args.algorithm}:")
    for first, last, mean in phases(args.run_dir, args.algorithm, args.phases):
        print(f"  steps {first}-{last}: " + " ".join(f"{task}={value:.3f}" for task, value in mean.items()))


if __name__ == "__main__":
    main()
