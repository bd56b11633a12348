"""Where the time goes: one generalist step and one scoring batch, profiled and summarised.

cProfile over `--steps` generalist steps (the library's `Job.train_step`, AMA-S, local policy,
tiny model, one thread) and `--batches` scoring batches (`LogpScorer` in score mode, what the
score stage's actors run), summarised as the inclusive time of the pieces of the step, per
step; then torch.profiler's top operators by self CPU time for the generalist step.

    python benchmarks/profile_step.py [--steps 50] [--batches 20] [--batch 8] [--score-batch 64]
    python benchmarks/profile_step.py --quick
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

# (label, file suffix, function name): the step's pieces, by inclusive (cumulative) time.
STEP_PIECES = [
    ("draw task labels (draw_tasks)", "mixing/policies.py", "draw_tasks"),
    ("draw examples (draw_batch)", "train/data.py", "draw_batch"),
    ("collate / pad", "ama_ray/dpo.py", "collate"),
    ("model forward (transformers)", "modeling_llama.py", "forward"),
    ("log-probs incl. forward (sequence_logps)", "ama_ray/dpo.py", "sequence_logps"),
    ("DPO loss incl. log-probs (per_example_loss)", "ama_ray/dpo.py", "per_example_loss"),
    ("clipped excess", "mixing/excess.py", "clipped_excess"),
    ("batch objective", "mixing/excess.py", "batch_objective"),
    ("backward", "torch/_tensor.py", "backward"),
    ("per-task sums (task_sums)", "train/metrics.py", "task_sums"),
    ("policy update (mixer.report)", "benchmarks/common.py", "report"),
    ("clip_grad_norm_", "nn/utils/clip_grad.py", "clip_grad_norm_"),
    ("AdamW step", "optim/adam.py", "step"),
    ("metrics dict (metrics_from_sums)", "train/metrics.py", "metrics_from_sums"),
    ("whole step (train_step)", "train/loop.py", "train_step"),
]
SCORE_PIECES = [
    ("collate / pad", "ama_ray/dpo.py", "collate"),
    ("model forward (transformers)", "modeling_llama.py", "forward"),
    ("log-probs incl. forward (sequence_logps)", "ama_ray/dpo.py", "sequence_logps"),
    ("DPO loss incl. log-probs (per_example_loss)", "ama_ray/dpo.py", "per_example_loss"),
    ("whole batch (LogpScorer.__call__)", "stages/inference.py", "__call__"),
]


def inclusive(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Largest cumulative time among functions `name` in files ending with `suffix` (the outermost)."""
    best = 0.0
    for (file, _, func), (_, _, _, cumtime, _) in stats.stats.items():
        if func == name and file.replace("\\", "/").endswith(suffix):
            best = max(best, cumtime)
    return best


def summary(stats: pstats.Stats, pieces, per: int, total_label: str) -> str:
    total = inclusive(stats, *pieces[-1][1:])
    rows = [[label, inclusive(stats, suffix, name) / per * 1e3, f"{inclusive(stats, suffix, name) / total:.0%}"]
            for label, suffix, name in pieces]
    return common.table(["piece (inclusive; nested rows overlap)", "ms per " + total_label, "share"], rows)


def profile(fn, n: int) -> pstats.Stats:
    profiler = cProfile.Profile(time.process_time)  # CPU time: other processes' load does not count
    profiler.enable()
    for i in range(n):
        fn(i)
    profiler.disable()
    return pstats.Stats(profiler)


def top_ops(fn, n: int, limit: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            fn(i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [[e.key, e.self_cpu_time_total / n / 1e3, f"{e.self_cpu_time_total / total:.0%}", e.count // n]
            for e in events[:limit]]
    return common.table(["torch op (generalist step)", "self CPU ms per step", "share", "calls per step"], rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="pairs per generalist step")
    parser.add_argument("--score-batch", type=int, default=64, help="pairs per scoring batch")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batches = 2, 2
    torch.set_num_threads(1)
    common.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        path = common.model_dir("tiny", Path(tmp))
        model, tokenizer = common.load(path)
        labelled = common.texts(["arithmetic", "refusal", "brackets"], 100 if args.quick else 400)
        rows = common.with_scores([common.tokenize(tokenizer, r) for _, r in labelled], model, tokenizer.pad_token_id)
        by_task: list[list[dict]] = [[], [], []]
        for (task, _), row in zip(labelled, rows):
            by_task[task].append(row)
        job = common.make_job(model, tokenizer.pad_token_id, by_task, "ama_s", args.batch)
        step = lambda i: job.train_step(i, job.mixer.alpha(i))  # noqa: E731
        step(0)  # warm-up
        step_stats = profile(lambda i: step(i + 1), args.steps)
        ops = top_ops(lambda i: step(i + 1 + args.steps), max(1, args.steps // 5))
        score = scorer(path, rows, args.score_batch)
        score(0)
        score_stats = profile(score, args.batches)
    out = common.header("Where the time goes (cProfile on CPU time; profiling inflates Python-heavy pieces; "
                        "torch.profiler's op times are wall time)",
                        batch_pairs=args.batch, steps=args.steps, score_batch=args.score_batch)
    out += "\n" + summary(step_stats, STEP_PIECES, args.steps, "step") + "\n\n" + ops
    out += "\n\n" + summary(score_stats, SCORE_PIECES, args.batches, "batch")
    print(out)
    return out


def scorer(model_path: str, rows: list[dict], batch: int):
    """fn(i) scoring the i-th batch of `rows` with `LogpScorer` in score mode (an Arrow batch, like Ray Data)."""
    import pyarrow as pa

    from ama_ray.stages.inference import LogpScorer

    score = LogpScorer(model_path, "float32", False, 1, {"beta": 0.1}, batch)
    keys = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "ref_chosen_logps", "ref_rejected_logps")
    table = pa.table({"example_id": [str(i) for i in range(len(rows))], **{k: [r[k] for r in rows] for k in keys}})
    n_batches = max(1, len(rows) // batch)

    def fn(i: int) -> None:
        score(table.slice((i % n_batches) * batch, batch))

    return fn


if __name__ == "__main__":
    main(sys.argv[1:])
