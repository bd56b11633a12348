"""Growth: a generalist worker's peak memory as data grows 1x -> 10x, and step time as k grows.

Memory. For each data size, a fresh worker-equivalent process loads its tasks exactly as
`Job.build` does (`load_task_split` from a run directory with committed prepared, reference and
score units, then `rows_of` into a `TaskStream` per task), runs a few generalist steps (the
library's `Job.train_step`, AMA-S, local policy) and reports its RSS before loading data (after
imports and the model) and its peak RSS (`ru_maxrss`). Token ids are synthetic (lengths like
the benchmark's); only their number matters. Arm `arrow` is the proposed change, run as a local
patch: the same table kept as Arrow, rows materialised on demand (`ArrowRows` below).

Step time. Side by side in one process: AMA-S generalist steps with k = 3, 10 and 30 tasks
(same batch size, same model), and k = 3 with `ArrowRows` instead of Python row dicts.

    python benchmarks/growth.py [--rows-per-task 10000] [--sizes 1,2,5,10] [--reps 7]
    python benchmarks/growth.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import common

FLAT = 1.10


class ArrowRows(Sequence):
    """A task's shard as an Arrow table, each row materialised as a dict when drawn.

    Drop-in for `rows_of(table)` in `TaskStream` (which only takes `len` and `[i]`): memory is
    the table's columnar buffers (~8 bytes a token) instead of Python lists and dicts.
    """

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        return self.table.slice(int(i), 1).to_pylist()[0]


# -- the data a worker reads ---------------------------------------------------------------
def ragged(rng: np.random.Generator, n: int, low: int, high: int, vocab: int) -> pa.Array:
    lengths = rng.integers(low, high + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = rng.integers(4, vocab, int(offsets[-1])).astype(np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def write_run(root: Path, tasks: list[str], rows_per_task: int, vocab: int, seed: int = 0) -> None:
    """Committed prepared/reference/scores units (train split) for `tasks` under `root`."""
    from ama_ray.storage import RunDir

    run, rng = RunDir(str(root)), np.random.default_rng(seed)
    for task in tasks:
        ids = pa.array([f"{task}-{i:09d}" for i in range(rows_per_task)])
        units = {
            "prepare": {"example_id": ids, "prompt_input_ids": ragged(rng, rows_per_task, 6, 16, vocab),
                         "chosen_input_ids": ragged(rng, rows_per_task, 4, 9, vocab),
                         "rejected_input_ids": ragged(rng, rows_per_task, 4, 9, vocab)},
            "reference": {"example_id": ids, "ref_chosen_logps": pa.array(-rng.uniform(10, 40, rows_per_task)),
                          "ref_rejected_logps": pa.array(-rng.uniform(10, 40, rows_per_task))},
            "score": {"example_id": ids, "specialist_loss": pa.array(rng.uniform(0.55, 0.85, rows_per_task))},
        }
        for stage, columns in units.items():
            unit = run.stage_unit(stage, task)
            unit.begin()
            unit.write_parquet(unit.split_file("train"), pa.table(columns))
            unit.commit("benchmark", rows={"train": rows_per_task, "validation": 0, "test": 0})


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def worker(run_root: str, model_path: str, tasks: list[str], mode: str, steps: int) -> dict:
    """One worker-equivalent: load like `Job.build`, train `steps` steps; memory figures in MB."""
    from ama_ray.storage import RunDir
    from ama_ray.train.data import load_task_split, rows_of

    torch.set_num_threads(1)
    model, tokenizer = common.load(model_path)
    before = rss_mb()
    run = RunDir(run_root)
    rows = []
    for task in tasks:
        table = load_task_split(run, task, "train", with_scores=True)
        rows.append(rows_of(table) if mode == "list" else ArrowRows(table))
    loaded = rss_mb()
    job = common.make_job(model, tokenizer.pad_token_id, rows, "ama_s", 8)
    common.job_block(job)(steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": sum(len(r) for r in rows), "before_mb": before, "loaded_mb": loaded, "peak_mb": peak}


def memory_table(model_path: str, workdir: Path, rows_per_task: int, sizes: list[int], steps: int,
                 modes: list[str]) -> str:
    tasks = ["arithmetic", "refusal", "brackets"]
    vocab = common.load(model_path)[1].vocab_size
    results = {}
    for size in sizes:
        root = workdir / f"run-{size}x"
        write_run(root, tasks, rows_per_task * size, vocab)
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", str(root), "--model-path", model_path, "--mode", mode,
                   "--steps", str(steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
            results[size, mode] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for mode in modes:
        base = results[sizes[0], mode]
        for size in sizes:
            r = results[size, mode]
            data = r["peak_mb"] - r["before_mb"]
            rows.append([mode, f"{size}x", r["rows"], round(r["before_mb"]), round(r["peak_mb"]), round(data),
                         f"{r['peak_mb'] / base['peak_mb']:.2f}"])
    return common.table(["rows as", "data", "train rows", "RSS before data (MB)", "peak RSS (MB)",
                         "peak - before (MB)", f"peak / peak at {sizes[0]}x (target <= {FLAT})"], rows)


def step_table(model_path: str, ks: list[int], rows_per_task: int, reps: int, block: int) -> str:
    model, tokenizer = common.load(model_path)
    names = [f"t{j}" for j in range(max(ks))]
    labelled = common.texts(names, rows_per_task)
    scored = common.with_scores([common.tokenize(tokenizer, r) for _, r in labelled], model, tokenizer.pad_token_id)
    by_task: list[list[dict]] = [[] for _ in names]
    for (task, _), row in zip(labelled, scored):
        by_task[task].append(row)
    jobs = {f"k={k}": common.make_job(copy.deepcopy(model), tokenizer.pad_token_id, by_task[:k], "ama_s", 16)
            for k in ks}
    arrow = [ArrowRows(pa.Table.from_pylist(rows)) for rows in by_task[: ks[0]]]
    jobs[f"k={ks[0]}, ArrowRows"] = common.make_job(copy.deepcopy(model), tokenizer.pad_token_id, arrow, "ama_s", 16)
    times = common.alternate({name: common.job_block(job) for name, job in jobs.items()}, reps, block)
    base = f"k={ks[0]}"
    rows = []
    for name in times:
        cpu, wall = (common.ratios(times, name, base, kind, speed=False) for kind in ("cpu", "wall"))
        flat = "yes" if statistics.median(cpu) <= FLAT else "NO"
        rows.append([name, common.med(times, name, "cpu") * 1e3, common.spread(cpu), common.spread(wall),
                     flat if name != base else ""])
    return common.table(["arm (batch 16, AMA-S)", "CPU ms/step", f"CPU time / {base}", f"wall time / {base}",
                         f"flat (<= {FLAT})"], rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-task", type=int, default=10000, help="rows per task at 1x")
    parser.add_argument("--sizes", default="1,2,5,10")
    parser.add_argument("--ks", default="3,10,30")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="steps each memory worker trains")
    parser.add_argument("--modes", default="list,arrow", help="row containers: list (the library's), arrow (patch)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="list", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_path, ["arithmetic", "refusal", "brackets"], args.mode, args.steps)))
        return ""
    if args.quick:
        args.rows_per_task, args.sizes, args.ks, args.reps, args.block, args.steps = 300, "1,2", "3,6", 1, 2, 2
        args.modes = "list"
    torch.set_num_threads(1)
    common.quiet()
    sizes, ks = [int(s) for s in args.sizes.split(",")], [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = common.model_dir("tiny", Path(tmp))
        memory = memory_table(model_path, Path(tmp), args.rows_per_task, sizes, args.steps, args.modes.split(","))
        steps = step_table(model_path, ks, 40 if args.quick else 200, args.reps, args.block)
    out = common.header("Growth: worker memory vs data size, step time vs k", rows_per_task_1x=args.rows_per_task)
    out += "\n" + memory + "\n\n" + steps
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
