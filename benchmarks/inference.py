"""Reference/score inference: Ray Data with 1 vs 2 actors vs a single-process loop; padding.

Throughput arms (reference mode: sequence log-probs of chosen and rejected, no gradients), each
a full pass over the same rows, including its model load (and, for Ray, the actor pool start):
  loop-1t / loop-2t   `LogpScorer` called in this process on the rows, `batch x BUCKETS` at a time
                      (as Ray Data hands them to an actor), with 1 / 2 torch threads;
  ray-1a / ray-2a     `ama_ray.stages.inference.infer` (what the reference and score stages
                      run: Parquet in, Parquet out, streamed) with 1 / 2 actors of 0.95 CPU each
                      (1 thread per actor: its share).
Padding: the share of padded tokens among all tokens processed, rows in arrival order vs sorted
by length within each `batch x BUCKETS` window (what `LogpScorer` does), by the library's
`padding_share` and, independently, by counting the pad positions of the `collate`d (2B, L)
batches that the model actually sees.

    python benchmarks/inference.py [--rows-per-task 1500] [--reps 3] [--hidden 64 --layers 2]
    python benchmarks/inference.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

import common

PADDING_TARGET = 0.15


def make_table(tokenizer, rows_per_task: int, seed: int = 0) -> pa.Table:
    """Prepared-like rows of the three benchmark tasks, shuffled (arrival order), with ids and split."""
    labelled = common.texts(["arithmetic", "refusal", "brackets"], rows_per_task, seed)
    rows = [common.tokenize(tokenizer, r) for _, r in labelled]
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    return pa.table({
        "example_id": [f"{i:08d}" for i in range(len(rows))],
        **{key: [r[key] for r in rows] for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")},
    })


def collated_padding(table: pa.Table, batch: int, pad_id: int) -> float:
    """Pad positions / all positions over the `collate`d batches of `table` in its order."""
    from ama_ray.dpo import collate

    rows = table.select(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]).to_pylist()
    pads = total = 0
    for start in range(0, len(rows), batch):
        mask = collate(rows[start : start + batch], pad_id)["attention_mask"]
        pads += int((mask == 0).sum())
        total += mask.numel()
    return pads / total


def bucketed(table: pa.Table, batch: int) -> pa.Table:
    """Rows sorted by length within each window of `batch x BUCKETS` rows, as `LogpScorer` scores them."""
    from ama_ray.stages.inference import BUCKETS, length_of

    window = batch * BUCKETS
    parts = [table.slice(s, window) for s in range(0, table.num_rows, window)]
    return pa.concat_tables([p.take(pa.compute.sort_indices(length_of(p))) for p in parts])


def loop_arm(model_path: str, table: pa.Table, batch: int, threads: int):
    from ama_ray.stages.inference import BUCKETS, LogpScorer

    def run(n: int) -> tuple[float, float]:
        start = common.clock()
        for _ in range(n):
            scorer = LogpScorer(model_path, "float32", False, threads, None, batch)
            for s in range(0, table.num_rows, batch * BUCKETS):
                scorer(table.slice(s, batch * BUCKETS))
        torch.set_num_threads(1)
        return common.since(start, n)

    return run


def ray_arm(model_path: str, table: pa.Table, batch: int, actors: int, workdir: Path):
    from ama_ray.config import load_config
    from ama_ray.stages.inference import Source, infer
    from ama_ray.storage import RunDir

    cfg = load_config(common.JOB_FILE, [f"reference.num_actors={actors}", "reference.cpus_per_actor=0.95",
                                        f"reference.batch_size={batch}", "model.dtype=float32"])
    run_dir = RunDir(str(workdir / f"run-{actors}a"))
    inp, out = run_dir.prepared("bench"), run_dir.reference("bench")
    inp.begin()
    inp.write_parquet(inp.split_file("train"), table)

    def run(n: int) -> tuple[float, float]:
        start = common.clock()
        for _ in range(n):
            out.begin()
            written = infer(cfg, [Source("bench", "train", inp, out)], model_path, None)
            assert written == {"bench/train": table.num_rows}
        return common.since(start, n)  # CPU time here is the driver's only: the tables use wall time

    return run


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-task", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64, help="pairs per inference batch (reference.batch_size)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows_per_task, args.reps = 40, 1
    torch.set_num_threads(1)
    common.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        shapes = {} if (args.hidden, args.layers) == (64, 2) else {
            "hidden_size": args.hidden, "num_layers": args.layers, "intermediate_size": 2 * args.hidden}
        path = common.model_dir("tiny", Path(tmp), **shapes)
        _, tokenizer = common.load(path)
        table = make_table(tokenizer, args.rows_per_task)
        padding = padding_rows(table, args.batch, tokenizer.pad_token_id)
        from ama_ray.cluster import ensure_ray

        ensure_ray(num_cpus=2)
        arms = {"loop-1t": loop_arm(path, table, args.batch, 1), "ray-1a": ray_arm(path, table, args.batch, 1, Path(tmp)),
                "loop-2t": loop_arm(path, table, args.batch, 2), "ray-2a": ray_arm(path, table, args.batch, 2, Path(tmp))}
        times = common.alternate(arms, args.reps, 1, warmup=0 if args.quick else 1)
    out = common.header("Inference: Ray Data actors vs a single-process loop", rows=table.num_rows,
                        batch_pairs=args.batch, reps=args.reps, hidden=args.hidden, layers=args.layers)
    out += "\n" + report(times, table.num_rows) + "\n\n" + padding
    print(out)
    return out


def padding_rows(table: pa.Table, batch: int, pad_id: int) -> str:
    from ama_ray.stages.inference import padding_share

    rows = []
    for name, ordered in (("arrival order", table), ("bucketed in windows", bucketed(table, batch))):
        share, seen = padding_share(ordered, batch), collated_padding(ordered, batch, pad_id)
        met = "yes" if seen <= PADDING_TARGET else "NO"
        rows.append([name, f"{share:.1%}", f"{seen:.1%}", f"<= {PADDING_TARGET:.0%}" if "bucket" in name else "", met if "bucket" in name else ""])
    return common.table(["row order", "padding_share()", "pad share of collated batches", "target", "met"], rows)


def report(times: dict, n_rows: int) -> str:
    rows = [[name, common.med(times, name, "wall"), n_rows / common.med(times, name, "wall"),
             n_rows / common.med(times, name, "cpu") if name.startswith("loop") else ""] for name in times]
    ratios = []
    for num, den in (("ray-1a", "loop-1t"), ("ray-2a", "loop-2t"), ("ray-2a", "ray-1a"), ("loop-2t", "loop-1t")):
        ratios.append([f"{num} / {den}", common.spread(common.ratios(times, num, den, "wall"))])
    return (common.table(["arm", "wall s/pass (median)", "pairs/s (wall)", "pairs/s (CPU, loops only)"], rows)
            + "\n\n" + common.table(["throughput ratio (wall)", "median [min-max] over reps"], ratios))


if __name__ == "__main__":
    main(sys.argv[1:])
