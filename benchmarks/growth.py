"""Growth: memory as the data grows 1x -> 10x -> 30x; step time and data wait, streamed vs in memory.

Memory. For each data size one process commits prepared units of synthetic token ids (lengths
like the benchmark's; only their number matters; validation and test capped at
data.max_heldout_examples, as prepare caps them), then a fresh driver process (its own local Ray)
runs the reference and score passes (`ama_ray.stages.inference.infer`: Ray Data
in, Parquet out) and then one generalist unit (`train_generalist`: a `TorchTrainer` whose worker
streams every task's rows from its Ray Data shard), and reports the driver's peak RSS, the
training worker's peak RSS (`check/peak_rss_mb`) and the object store's peak use (polled from the
raylet every 0.2 s). Target: each within 10% of the 1x run.

Speed. Side by side in one process, the library's `Job.train_step` (AMA-S, k = 3) with each
task's rows streamed from a Ray Data iterator over the Parquet file (what a worker runs now) vs
held in memory (`TableSource`: the loop before streaming); and the share of a step spent waiting
for rows (`train/data_seconds`), on the tiny model and on a random-weight model of SmolLM2-135M's
shapes at real lengths.

    python benchmarks/growth.py [--rows-per-task 1000] [--sizes 1,10,30] [--reps 7]
    python benchmarks/growth.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import common

FLAT = 1.10
TASKS = ("arithmetic", "refusal", "brackets")


# -- the data ------------------------------------------------------------------------------------
def ragged(rng: np.random.Generator, n: int, low: int, high: int, vocab: int) -> pa.Array:
    lengths = rng.integers(low, high + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(offsets, pa.array(rng.integers(3, vocab, int(offsets[-1])), pa.int32()))


def prepared_table(task: str, n: int, vocab: int, rng: np.random.Generator, prompt=(6, 16), completion=(4, 9)) -> pa.Table:
    return pa.table({
        "example_id": pa.array([f"{task}-{i:09d}" for i in range(n)]),
        "prompt_input_ids": ragged(rng, n, *prompt, vocab),
        "chosen_input_ids": ragged(rng, n, *completion, vocab),
        "rejected_input_ids": ragged(rng, n, *completion, vocab),
    })


def write_prepared(run, rows_per_task: int, vocab: int, held: int, seed: int = 0) -> None:
    """Committed prepared units of synthetic rows for TASKS under `run`: `rows_per_task` training
    rows and `held` validation and test rows each (prepare caps those at data.max_heldout_examples,
    whatever the size of the data)."""
    rng = np.random.default_rng(seed)
    for task in TASKS:
        unit = run.prepared(task)
        unit.begin()
        rows = {"train": rows_per_task, "validation": held, "test": held}
        for split, n in rows.items():
            unit.write_parquet(unit.split_file(split), prepared_table(f"{task}-{split}", n, vocab, rng))
        unit.commit("benchmark", rows=rows)


# -- memory ----------------------------------------------------------------------------------------
class StorePeak:
    """Polls the object store's bytes in use (the raylet's store stats) until stopped; keeps the
    peak and every poll. The peak of a stationary series still grows with the number of polls
    (a longer run samples rarer highs), so `p95` is reported beside it: the level the store sits
    at, which does not depend on how long the phase ran."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak, self.samples, self.failed, self._stop = every_s, 0, 0, 0, threading.Event()
        self.polls: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this run's Ray, not the newest one
        while not self._stop.is_set():
            try:
                reply = get_memory_info_reply(state, timeout_seconds=10.0)
                self.polls.append(reply.store_stats.object_store_bytes_used)
                self.peak = max(self.peak, self.polls[-1])
                self.samples += 1
            except Exception:  # noqa: BLE001 - a busy raylet may not answer one poll: count it, poll again
                self.failed += 1
            time.sleep(self.every_s)

    @property
    def p95(self) -> float:
        return float(np.percentile(self.polls, 95)) if self.polls else 0.0


def _config(root: str, model_path: str, steps: int):
    from ama_ray.config import load_config

    return load_config(common.JOB_FILE, [f"storage.path={root}", f"model.name={model_path}", f"generalist.optim.steps={steps}",
                                         f"generalist.optim.checkpoint_every={steps}", "eval.every_n_steps=100000",
                                         "eval.max_examples=16", "generalist.optim.batch_size=8", "reference.batch_size=64"])


def write_data(root: str, model_path: str, rows_per_task: int) -> None:
    """The prepared units of one size (run in its own process, so that building the synthetic
    tables does not count in the measured driver's peak RSS)."""
    from ama_ray.models.loading import load_tokenizer
    from ama_ray.storage import RunDir

    cfg = _config(root, model_path, 1)
    write_prepared(RunDir(cfg.run_dir), rows_per_task, load_tokenizer(model_path).vocab_size, held=cfg.data.max_heldout_examples)


def measure(root: str, model_path: str, rows_per_task: int, steps: int) -> dict:
    """One size, in this (fresh) process, on the units `write_data` committed: inference passes
    and a generalist unit; MB figures."""
    from ama_ray.cluster import ensure_ray
    from ama_ray.stages.generalist import train_generalist
    from ama_ray.stages.inference import Source, infer
    from ama_ray.storage import RunDir

    ensure_ray(num_cpus=2)
    cfg = _config(root, model_path, steps)
    run = RunDir(cfg.run_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    splits = ("train", "validation", "test")
    phases = {}  # phase -> its StorePeak: where the object store's peak comes from
    for stage, inp in (("reference", run.prepared), ("score", run.reference)):
        out = run.reference if stage == "reference" else run.scores
        for task in TASKS:
            out(task).begin()
        with StorePeak() as phases[stage]:
            written = infer(cfg, [Source(t, s, inp(t), out(t)) for t in TASKS for s in splits], model_path,
                            None if stage == "reference" else cfg.dpo.to_dict())
        for task in TASKS:
            out(task).commit("benchmark", rows={s: written[f"{task}/{s}"] for s in splits},
                             loss=cfg.dpo.to_dict(), dtype="float32", padding_side="right")
    with StorePeak() as phases["train"]:
        train_generalist(cfg, "ama_s", 0, model_path, [rows_per_task] * len(TASKS), force=True)
    final = run.generalist("ama_s", 0).manifest()["final_metrics"]
    return {"rows": rows_per_task * len(TASKS), "driver_before_mb": before,
            "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": final["check/peak_rss_mb"], "store_peak_mb": max(p.peak for p in phases.values()) / 2**20,
            **{f"store_peak_mb_{name}": p.peak / 2**20 for name, p in phases.items()},
            **{f"store_p95_mb_{name}": p.p95 / 2**20 for name, p in phases.items()},
            "store_samples": sum(p.samples for p in phases.values()), "store_failed_polls": sum(p.failed for p in phases.values())}


def memory_table(model_path: str, workdir: Path, rows_per_task: int, sizes: list[int], steps: int) -> str:
    results = {}
    for size in sizes:
        root = workdir / f"run-{size}x"
        args = ["--model-path", model_path, "--rows-per-task", str(rows_per_task * size), "--steps", str(steps)]
        subprocess.run([sys.executable, __file__, "--write-data", str(root), *args], check=True, capture_output=True, cwd=Path(__file__).parent)
        out = subprocess.run([sys.executable, __file__, "--measure", str(root), *args],
                             check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
        results[size] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{size}x", json.dumps(results[size]), file=sys.stderr, flush=True)  # the raw figures, as they come
        shutil.rmtree(root, ignore_errors=True)
    base = results[sizes[0]]
    rows = []
    for size in sizes:
        r = results[size]
        ratio = {k: r[k] / max(base[k], 1e-9) for k in ("driver_peak_mb", "worker_peak_mb", "store_peak_mb")}
        flat = "yes" if max(ratio.values()) <= FLAT else "NO"
        phases = " / ".join(f"{r[f'store_peak_mb_{p}']:.3f}" for p in ("reference", "score", "train"))
        p95 = " / ".join(f"{r[f'store_p95_mb_{p}']:.3f} ({r[f'store_p95_mb_{p}'] / max(base[f'store_p95_mb_{p}'], 1e-9):.2f})"
                         for p in ("reference", "score", "train"))
        rows.append([f"{size}x", r["rows"], round(r["driver_peak_mb"]), f"{ratio['driver_peak_mb']:.2f}",
                     round(r["worker_peak_mb"]), f"{ratio['worker_peak_mb']:.2f}", round(r["store_peak_mb"], 3),
                     f"{ratio['store_peak_mb']:.2f}", phases, p95, f"{r['store_samples']}/{r['store_samples'] + r['store_failed_polls']}",
                     flat if size != sizes[0] else ""])
    return common.table(["data", "rows (3 tasks)", "driver peak RSS (MB)", f"/ {sizes[0]}x", "worker peak RSS (MB)",
                         f"/ {sizes[0]}x", "object store peak (MB)", f"/ {sizes[0]}x", "store peak: reference / score / train (MB)",
                         f"store p95 of polls: reference / score / train (MB, / {sizes[0]}x)",
                         "store polls answered", f"all flat (<= {FLAT})"], rows)


def window_table(groups: list[int], budgets_mb: list[float | None]) -> str:
    """The object store's peak while one streamed read (`parquet_dataset`) of a file of N row
    groups is consumed slowly, per read budget (None: the library's `stream_budget`)."""
    import contextlib
    from unittest import mock

    from ama_ray.cluster import ensure_ray
    from ama_ray.storage import RunDir
    from ama_ray.train import data

    ensure_ray(num_cpus=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run, rng = RunDir(str(Path(tmp) / "run")), np.random.default_rng(0)
        for n in groups:
            unit = run.prepared(f"t{n}")
            unit.begin()
            unit.write_parquet(unit.split_file("train"), prepared_table("t", n * 1024, 400, rng))
            unit.commit("benchmark", rows={"train": n * 1024})
            for budget in budgets_mb:
                patch = mock.patch.object(data, "stream_budget", lambda files, b=budget: int(b * 2**20)) if budget else contextlib.nullcontext()
                with patch, StorePeak(0.05) as store:
                    for _ in data.parquet_dataset([(unit, "train")]).iter_batches(batch_format="pyarrow", batch_size=None):
                        time.sleep(0.02)
                rows.append([n, "stream_budget" if budget is None else budget, round(store.peak / 2**20, 2)])
    return common.table(["row groups in the file", "read budget (MB)", "object store peak (MB)"], rows)


# -- speed -----------------------------------------------------------------------------------------
def ray_source(path: Path):
    """A Ray Data iterator over one Parquet file in file order, read as training reads a task
    (`train.data.parquet_dataset`): what `get_dataset_shard` gives a worker."""
    from ray.data import DataContext

    from ama_ray.storage import ROW_GROUP_ROWS, RunDir
    from ama_ray.train.data import parquet_dataset

    unit = RunDir(str(path.parent / "streams")).scores(path.stem)
    unit.begin()
    pq.write_table(pq.read_table(path), unit.file(unit.split_file("train")), row_group_size=ROW_GROUP_ROWS)
    DataContext.get_current().execution_options.preserve_order = True
    return parquet_dataset([(unit, "train")]).iterator()


def step_table(model_path: str, workdir: Path, rows_per_task: int, reps: int, block: int) -> str:
    """Streamed vs in-memory rows, same steps side by side; and the data wait inside a step."""
    from ama_ray.cluster import ensure_ray
    from ama_ray.train.data import ShardStream, TableSource

    ensure_ray(num_cpus=2)
    model, tokenizer = common.load(model_path)
    labelled = common.texts(list(TASKS), rows_per_task)
    scored = common.with_scores([common.tokenize(tokenizer, r) for _, r in labelled], model, tokenizer.pad_token_id)
    by_task: list[list[dict]] = [[] for _ in TASKS]
    for i, ((task, _), row) in enumerate(zip(labelled, scored)):
        by_task[task].append({"example_id": f"{task}-{i:08d}", **row})
    files = []
    for task, rows in zip(TASKS, by_task):
        files.append(workdir / f"{task}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[-1])
    jobs = {}
    for name in ("in memory", "streamed"):
        job = common.make_job(copy.deepcopy(model), tokenizer.pad_token_id, by_task, "ama_s", 16)
        if name == "streamed":
            job.streams = [ShardStream(t, ray_source(f), 0) for t, f in zip(TASKS, files)]
        else:
            job.streams = [ShardStream(t, TableSource(pq.read_table(f)), 0) for t, f in zip(TASKS, files)]
        jobs[name] = job
    waits: dict[str, list[float]] = {name: [] for name in jobs}
    times = common.alternate({name: _timed_block(job, waits[name]) for name, job in jobs.items()}, reps, block)
    for job in jobs.values():
        for stream in job.streams:
            stream.close()
    rows = []
    for name in times:
        wall = common.ratios(times, name, "in memory", "wall", speed=False)
        share = statistics.median(waits[name]) / common.med(times, name, "wall")
        rows.append([name, common.med(times, name, "wall") * 1e3, common.spread(wall), f"{share:.2%}",
                     ("yes" if statistics.median(wall) <= FLAT else "NO") if name != "in memory" else ""])
    return common.table(["rows (tiny model, batch 16, AMA-S)", "wall ms/step", "wall time / in memory",
                         "data wait / step", f"within 10% (<= {FLAT})"], rows)


def _timed_block(job, waits: list[float]):
    counter = {"step": 0}

    def run(n: int) -> tuple[float, float]:
        start = common.clock()
        for _ in range(n):
            metrics = job.train_step(counter["step"], job.mixer.alpha(counter["step"]))
            waits.append(metrics["train/data_seconds"])
            counter["step"] += 1
        return common.since(start, n)

    return run


def wait_table(workdir: Path, length: int, batch: int, steps: int) -> str:
    """The data wait of a streamed step on a random-weight model of SmolLM2-135M's shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ama_ray.train.data import ShardStream

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    rng = np.random.default_rng(0)
    half = length // 2
    files = []
    for task in TASKS:
        table = prepared_table(task, 64, config.vocab_size, rng, prompt=(half - 8, half), completion=(half - 8, half))
        n = table.num_rows
        table = table.append_column("ref_chosen_logps", pa.array(-rng.uniform(500, 900, n), pa.float32()))
        table = table.append_column("ref_rejected_logps", pa.array(-rng.uniform(500, 900, n), pa.float32()))
        table = table.append_column("specialist_loss", pa.array(rng.uniform(0.5, 0.8, n), pa.float32()))
        files.append(workdir / f"smol-{task}.parquet")
        pq.write_table(table, files[-1])
    job = common.make_job(model, 0, [[{"example_id": "x"}]] * len(TASKS), "ama_s", batch)
    job.streams = [ShardStream(t, ray_source(f), 0) for t, f in zip(TASKS, files)]
    waits, totals = [], []
    for step in range(steps):
        start = time.perf_counter()
        metrics = job.train_step(step, job.mixer.alpha(step))
        totals.append(time.perf_counter() - start)
        waits.append(metrics["train/data_seconds"])
    for stream in job.streams:
        stream.close()
    # Steady state: the first step also opens the streams (reported on its own).
    wait, total = statistics.median(waits[1:] or waits), statistics.median(totals[1:] or totals)
    share = wait / total
    return common.table(["model (random weights)", "tokens per sequence", "pairs per step", "wall s/step (median, steps 2+)",
                         "data wait ms/step (median, steps 2+)", "wait / step", "first step's wait (ms, opens the streams)", "under 1%"],
                        [["SmolLM2-135M shapes", length, batch, total, wait * 1e3, f"{share:.3%}", waits[0] * 1e3,
                          "yes" if share < 0.01 else "NO"]])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-task", type=int, default=1000, help="training rows per task at 1x")
    parser.add_argument("--sizes", default="1,10,30")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps of the generalist in each memory run")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence in the SmolLM2-shape wait check")
    parser.add_argument("--wait-steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    parser.add_argument("--speed-only", action="store_true", help="only the step and data-wait tables")
    parser.add_argument("--window", action="store_true", help="only the read-ahead window table (one file, growing)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--write-data", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_data:
        write_data(args.write_data, args.model_path, args.rows_per_task)
        return ""
    if args.measure:
        common.quiet()
        print(json.dumps(measure(args.measure, args.model_path, args.rows_per_task, args.steps)))
        return ""
    if args.window:
        out = window_table([40, 120, 360], [None]) + "\n\n" + window_table([360], [0.25, 4, 100])
        print(out)
        return out
    if args.quick:
        args.rows_per_task, args.sizes, args.reps, args.block, args.steps = 60, "1,2", 1, 2, 3
        args.length, args.wait_steps = 32, 1
    torch.set_num_threads(1)
    common.quiet()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = common.model_dir("tiny", Path(tmp))
        memory = "" if args.speed_only else memory_table(model_path, Path(tmp), args.rows_per_task, sizes, args.steps)
        if not args.memory_only:
            steps = step_table(model_path, Path(tmp), 40 if args.quick else 300, args.reps, args.block)
            wait = wait_table(Path(tmp), args.length, 2 if args.quick else 4, args.wait_steps)
    out = common.header("Growth: memory vs data size; streamed rows vs in memory", rows_per_task_1x=args.rows_per_task)
    out += "\n" + "\n\n".join(t for t in (memory, "" if args.memory_only else steps + "\n\n" + wait) if t)
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
