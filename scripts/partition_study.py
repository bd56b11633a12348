"""Evidence for `data.partition` (docs/results.md "Tasks found by partitioning").

    python scripts/partition_study.py ari [--root runs/partition_ari] [--seeds 0 1 2 3 4]
    python scripts/partition_study.py mixture RUN_DIR OUT.jsonl

`ari`: the adjusted Rand index of each method (embedding, tfidf) on three mixtures, one per data
seed (the benchmark's rows and the k-means seed both follow it), printed as a Markdown table:
- `benchmark`: the offline benchmark's three tasks at 1:1:1 (400 rows each), shuffled into one file;
- `benchmark_10_1_1`: the same at 10:1:1 (4000/400/400), the sizes of jobs/imbalance.yaml;
- `arithmetic_flagged`: one surface form, two tasks: arithmetic prompts with and without a
  flagged-looking request in front (which must still be answered), 300 each.
Each mixture is a JSONL file with a `task` column, read through `data.partition.label_field`
exactly as a user's file would be; the partition runs in this process on one local Ray.

`mixture`: the train and validation rows of RUN_DIR's prepared tasks, labelled `task` and
shuffled, as one JSONL file (its test rows stay out, so a run on the mixture never trains on the
yardstick's test split). scripts/partition_study.sh uses it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq

MIXTURES = {
    "benchmark": {"arithmetic": 400, "refusal": 400, "brackets": 400},
    "benchmark_10_1_1": {"arithmetic": 4000, "refusal": 400, "brackets": 400},
    "arithmetic_flagged": {"plain": 300, "flagged": 300},
}
METHODS = ("embedding", "tfidf")


def mixture_rows(kind: str, seed: int) -> list[dict]:
    from ama_ray.data import benchmark

    if kind == "arithmetic_flagged":
        rows, want = [], dict(MIXTURES[kind])
        for r in benchmark.generate("arithmetic", 4 * sum(want.values()), seed=seed, flagged_share=0.5):
            label = r["meta"]["kind"]
            if want.get(label, 0) > 0:
                want[label] -= 1
                rows.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "task": label})
        if any(want.values()):
            raise SystemExit(f"the arithmetic benchmark gave too few rows of some kind: {want} missing")
    else:
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "task": task}
                for task, n in MIXTURES[kind].items() for r in benchmark.generate(task, n, seed=seed)]
    random.Random(seed).shuffle(rows)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ari(root: Path, seeds: list[int], cache_dir: str | None) -> None:
    from ama_ray.config import load_config
    from ama_ray.stages import partition
    from ama_ray.storage import RunDir

    results: dict[tuple[str, str], list[float]] = {}
    for seed in seeds:
        for kind, sizes in MIXTURES.items():
            source = root / "data" / f"{kind}_seed{seed}.jsonl"
            if not source.exists():
                write_jsonl(mixture_rows(kind, seed), source)
            for method in METHODS:
                overrides = [
                    "model.name=tiny", f"storage.path={root}", f"storage.run_name={kind}_{method}_seed{seed}", "data.tasks=null",
                    f"data.partition={{sources: [{{name: {kind}, path: {source}}}], k: {len(sizes)}, method: {method}, "
                    f"label_field: task, seed: {seed}}}",
                    *([f"model.cache_dir={cache_dir}"] if cache_dir else []),
                ]
                cfg = load_config(None, overrides)
                partition.run(cfg)
                man = RunDir(cfg.run_dir).partition().manifest()
                results.setdefault((kind, method), []).append(man["ari"])
                print(f"{kind} {method} seed {seed}: ARI {man['ari']:.3f} {man['contingency']}", file=sys.stderr, flush=True)
    print(f"| mixture | method | ARI mean ± std over {len(seeds)} seeds | per seed |")
    print("|---|---|---|---|")
    for (kind, method), values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {kind} | {method} | {statistics.mean(values):.3f} ± {spread:.3f} | {' '.join(f'{v:.3f}' for v in values)} |")


def mixture_from_run(run: Path, out: Path) -> None:
    rows = []
    for task_dir in sorted(p for p in (run / "prepared").iterdir() if (p / "_manifest.json").exists()):
        for split in ("train", "validation"):
            table = pq.read_table(task_dir / f"{split}.parquet", columns=["prompt", "chosen", "rejected"])
            rows += [{**r, "task": task_dir.name} for r in table.to_pylist()]
    random.Random(0).shuffle(rows)
    write_jsonl(rows, out)
    print(f"{out}: {len(rows)} rows (train and validation of {run})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ari", help="adjusted Rand index per method and mixture")
    a.add_argument("--root", type=Path, default=Path("runs/partition_ari"))
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    a.add_argument("--cache-dir", default=None, help="model.cache_dir (default: the config's)")
    m = sub.add_parser("mixture", help="a run's train+validation rows as one labelled JSONL file")
    m.add_argument("run", type=Path)
    m.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "ari":
        ari(args.root.resolve(), args.seeds, args.cache_dir)
    else:
        mixture_from_run(args.run, args.out)


if __name__ == "__main__":
    main()
