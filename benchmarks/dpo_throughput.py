"""Preference pairs/s: TRL's DPOTrainer vs our generalist step vs the physical floor, one worker.

Arms, all on the same model copy, the same tokenized rows (TRL's own tokenization), the same
batch size, float32, no activation checkpointing, one torch thread, AdamW at the same lr:
  (a) trl          TRL `DPOTrainer` with a reference model, computing the reference each step;
  (b) trl-precomp  TRL with `precompute_ref_log_probs=True` (reference pass done at set-up);
  (c) ours         `ama_ray.train.loop.Job.train_step` (the library's own step) with AMA-S and a
                   local policy (no Ray: the actor round trip is in mixing_overhead.py), on the
                   reference log-probs TRL precomputed for (b);
      ours+log     the same plus `Job._log` each step (TensorBoard scalars, as `Job.train` does);
      ours+log/10  the proposed change, as a local patch: TensorBoard scalars every 10th step only;
  (d) floor        forward + token cross-entropy + backward + AdamW step on pre-collated batches,
                   logits only where a completion token is predicted: what any trainer must do
                   per step. With (c) it runs exactly (c)'s batches, recorded from a same-seed
                   copy of (c) (`floor_ran_our_batches` in the header checks it); alone, shuffled
                   batches of the same rows.
TRL arms are timed between consecutive `on_step_end` callbacks (data loading, collation,
forward, backward, clipping, optimizer, logging: everything inside `train()`'s loop); ours and
the floor time whole steps. Arms alternate in blocks (see common.alternate); ratios are medians
of per-repetition ratios.

    python benchmarks/dpo_throughput.py [--model tiny|smollm2-135m|PATH] [--batch 8] [--reps 7] [--block 10]
    python benchmarks/dpo_throughput.py --quick      # seconds; what the test runs

`--model smollm2-135m` (after `ama-ray models fetch smollm2-135m`) takes ~11 s a step here:
optional, never run in CI; use e.g. --reps 3 --block 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common

TARGETS = {("ours", "trl"): 1.3, ("ours", "trl-precomp"): 1.0, ("ours", "floor"): 0.9,
           ("ours+log", "trl"): 1.3, ("ours+log", "trl-precomp"): 1.0, ("ours+log", "floor"): 0.9}
# At real lengths (issue 17): at least TRL's best configuration, and within 5% of the floor.
LONG_TARGETS = {("ours", "trl"): 1.0, ("ours", "trl-precomp"): 1.0, ("ours", "floor"): 0.95}


def trl_arm(model, tokenizer, dataset, workdir: Path, batch: int, lr: float, precompute: bool):
    """(block runner, trainer) for one TRL configuration."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks: list[tuple[float, float]] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(common.clock())

    args = DPOConfig(
        output_dir=str(workdir / ("trl-pre" if precompute else "trl")), bf16=False, use_cpu=True,
        gradient_checkpointing=False, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1, max_steps=2,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=64, max_length=None,
        report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[StepEnd()])
    trainer.remove_callback(PrinterCallback)  # it prints every train() summary

    def run(n: int) -> tuple[float, float]:
        marks.clear()
        trainer.args.max_steps = n + 1  # the first interval starts at the first step's end
        trainer.train()
        (wall, cpu), n_steps = marks[-1], len(marks) - 1
        return (wall - marks[0][0]) / n_steps, (cpu - marks[0][1]) / n_steps

    return run, trainer


def log_every_n_steps(job, n: int) -> None:
    """Patch one job: `_log` writes TensorBoard scalars only every n-th step (the proposed change)."""
    log = job._log

    def patched(metrics: dict) -> None:
        if job.state.step % n == 0:
            log(metrics)

    job._log = patched


def floor_arm(model, pad_id: int, batches: list[list[dict]], lr: float):
    """Forward, cross-entropy on completion tokens, backward, AdamW, on `batches` (lists of rows)
    collated up front, in order (cycling).

    Logits only where a completion token is predicted (a boolean `logits_to_keep`, as our step
    asks for them): what a DPO step cannot avoid. A floor over every position's logits was
    slower than our step on a 49k vocabulary (issue 17), so it was not a floor.
    """
    from ama_ray.dpo import collate

    collated = []
    for rows in batches:
        b = collate(rows, pad_id)
        mask = b["completion_mask"][:, 1:].bool()
        collated.append((b, F.pad(mask, (0, 1)), b["input_ids"][:, 1:][mask]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state = {"i": 0}

    def run(n: int) -> tuple[float, float]:
        start = common.clock()
        for _ in range(n):
            b, keep, labels = collated[state["i"] % len(collated)]
            state["i"] += 1
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           position_ids=b["position_ids"], use_cache=False, logits_to_keep=keep).logits
            F.cross_entropy(logits, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return common.since(start, n)

    return run


class StepRows:
    """Records the rows each of our steps trains on (`ama_ray.train.loop.per_example` wrapped: one
    call a step, as `make_job` builds jobs without gradient accumulation), so
    the floor can run exactly those batches: pairs drawn by alpha differ in length from any other
    draw, and at real lengths a few steps' lengths move a pairs/s ratio by more than the 5% the
    floor target allows."""

    def __init__(self):
        from ama_ray.train import loop

        self.loop, self.batches, self._real = loop, [], loop.per_example

    def __enter__(self) -> "StepRows":
        def recorded(model, rows, *args, **kwargs):
            self.batches.append(list(rows))
            return self._real(model, rows, *args, **kwargs)

        self.loop.per_example = recorded
        return self

    def __exit__(self, *exc) -> None:
        self.loop.per_example = self._real


def same_batches(run, floor: list[list[dict]]):
    """`run` (our arm) recording the rows of every step it times, and a check to call after the
    timing: "yes" when they were the floor's batches, step for step."""
    seen: list[list[dict]] = []

    def recording(n: int) -> tuple[float, float]:
        with StepRows() as rows:
            out = run(n)
        seen.extend(rows.batches)
        return out

    return recording, lambda: "yes" if seen == floor[: len(seen)] and len(seen) == len(floor) else "NO"


def long_texts(tokenizer, n: int, length: int, seed: int = 0) -> list[tuple[int, dict]]:
    """(task index, text row) pairs at real lengths: a prompt of about `length` / 2 tokens and a
    chosen and a rejected answer of about `length` / 2 each (each between 3/4 and all of that, so
    batches carry the padding mixed lengths bring), three tasks in turn. Words are the vocabulary's
    single-token lowercase words with a leading space, so a text of k words is k tokens; only the
    number of tokens matters to speed and memory."""
    import re

    words = [t for t in (tokenizer.decode([i]) for i in range(tokenizer.vocab_size)) if re.fullmatch(r" [a-z]{2,}", t)]
    rng = np.random.default_rng(seed)
    text = lambda: "".join(rng.choice(words, int(length / 2 * rng.uniform(0.75, 1.0))))  # noqa: E731
    return [(i % 3, {"prompt": text(), "chosen": text(), "rejected": text()}) for i in range(n)]


ARMS = ("trl", "trl-precomp", "ours", "ours+log", "ours+log/10", "floor")
WARMUP = 1  # untimed steps per arm before the repetitions (`common.alternate`)
LONG_ARMS = ("trl", "trl-precomp", "ours", "floor")  # at real lengths: TensorBoard's cost is noise there


def build_arms(args, workdir: Path, names: tuple[str, ...] = ARMS):
    """The block runners of `names` and a description of the data."""
    from datasets import Dataset

    from ama_ray.dpo import pair_length

    model, tokenizer = common.load(common.model_dir(args.model, workdir))
    tasks = ["arithmetic", "refusal", "brackets"]
    labelled = (long_texts(tokenizer, 3 * args.rows_per_task, args.length) if args.length
                else common.texts(tasks, args.rows_per_task))
    dataset = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for _, row in labelled])
    arms, facts = {}, {}
    if "trl" in names:
        arms["trl"], _ = trl_arm(model, tokenizer, dataset, workdir, args.batch, args.lr, precompute=False)
    # TRL's tokenized rows and its precomputed reference log-probs feed our arms: same data.
    arms["trl-precomp"], trainer_b = trl_arm(model, tokenizer, dataset, workdir, args.batch, args.lr, precompute=True)
    ours_rows: list[list[dict]] = [[] for _ in tasks]
    flat = []
    spec_loss = np.random.default_rng(0).uniform(0.55, 0.85, len(labelled))
    for i, (task, _) in enumerate(labelled):
        r = trainer_b.train_dataset[i]
        row = {"prompt_input_ids": r["prompt_ids"], "chosen_input_ids": r["chosen_ids"],
               "rejected_input_ids": r["rejected_ids"], "ref_chosen_logps": float(r["ref_chosen_logps"]),
               "ref_rejected_logps": float(r["ref_rejected_logps"]), "specialist_loss": float(spec_loss[i])}
        ours_rows[task].append(row)
        flat.append(row)

    def ours(**kwargs):  # our step (AMA-S) on its own copy of the model and TRL's rows
        return common.make_job(copy.deepcopy(model), tokenizer.pad_token_id, ours_rows, "ama_s", args.batch, lr=args.lr, **kwargs)

    if "ours" in names:
        arms["ours"] = common.job_block(ours())
    if "ours+log" in names:
        arms["ours+log"] = common.job_block(ours(tensorboard_dir=str(workdir / "tb")), log=True)
    if "ours+log/10" in names:
        every = ours(tensorboard_dir=str(workdir / "tb10"))
        log_every_n_steps(every, 10)
        arms["ours+log/10"] = common.job_block(every, log=True)
    if "floor" in names and "ours" in names:
        # The floor runs the batches our step will run, in the same order: a copy of our job (same
        # seed, model and rows, so the same alpha and draws) runs as many steps as `alternate` will
        # time, recording its rows. `main` checks the timed run drew the same ones.
        with StepRows() as recorded:
            common.job_block(ours())(WARMUP + args.reps * args.block)
        arms["floor"] = floor_arm(copy.deepcopy(model), tokenizer.pad_token_id, recorded.batches, args.lr)
        arms["ours"], facts["floor_ran_our_batches"] = same_batches(arms["ours"], recorded.batches)
    elif "floor" in names:
        # Shuffled, so the floor's batches mix tasks (and lengths) the way sampled batches do.
        mixed = [flat[i] for i in np.random.default_rng(1).permutation(len(flat))]
        batches = [mixed[i : i + args.batch] for i in range(0, len(mixed) - args.batch + 1, args.batch)]
        arms["floor"] = floor_arm(copy.deepcopy(model), tokenizer.pad_token_id, batches, args.lr)
    lengths = [pair_length(r) for r in flat]
    facts.update({"model": args.model, "params": sum(p.numel() for p in model.parameters()), "batch_pairs": args.batch,
                  "rows": len(flat), "tokens_per_pair_mean": round(sum(lengths) / len(lengths), 1), "tokens_max": max(lengths)})
    return {name: arms[name] for name in names}, facts


def peak_above(run, steps: int) -> float:
    """MB of resident memory `run(steps)` peaks at above what the process held before it (Linux:
    the high-water mark is reset through /proc/self/clear_refs, so set-up does not count).

    The child runs with MALLOC_MMAP_THRESHOLD_ set low (`memory_table`), so freed buffers go back
    to the system: otherwise memory a set-up freed (TRL's reference pass) stays resident and a
    step reusing it would look free."""
    import ctypes
    import gc

    def status(key: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run(steps)
    return status("VmHWM") - before


def memory_table(args, lengths: list[int], names: tuple[str, ...]) -> str:
    """Peak memory of each arm's steps at each length, each arm in a fresh process (its set-up
    excluded, so a reference model kept by an arm counts, the one used to build the data does not)."""
    import subprocess

    rows = []
    for length in lengths:
        peaks = {}
        for name in names:
            cmd = [sys.executable, __file__, "--peak", name, "--length", str(length), "--model", args.model, "--batch",
                   str(args.batch), "--rows-per-task", str(args.rows_per_task), "--threads", str(args.threads)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see peak_above
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
            peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        rows += [[length, name, round(peaks[name]), f"{peaks[name] / peaks[names[0]]:.2f}"] for name in names]
    return common.table(["tokens per sequence", "arm", "peak RSS of two steps above set-up (MB)", f"/ {names[0]}"], rows)


def report(times: dict, batch: int, targets: dict = TARGETS) -> str:
    """The arms' step times and their ratios against the targets, for the arms that ran."""
    arm_rows = [[name, common.med(times, name, "wall") * 1e3, common.med(times, name, "cpu") * 1e3,
                 batch / common.med(times, name, "cpu")] for name in times]
    ratio_rows = []
    for (num, den), target in targets.items():
        if num not in times or den not in times:
            continue
        row = [f"{num} / {den}"]
        for kind in ("cpu", "wall"):
            values = common.ratios(times, num, den, kind)
            row += [common.spread(values), "yes" if statistics.median(values) >= target else "NO"]
        ratio_rows.append(row + [f">= {target}"])
    for num, den in (("ours+log/10", "ours+log"), ("ours+log/10", "floor")):
        if num not in times or den not in times:
            continue
        ratio_rows.append([f"{num} / {den}"] + [x for kind in ("cpu", "wall")
                                                 for x in (common.spread(common.ratios(times, num, den, kind)), "")]
                          + ["(proposed change)"])
    return (common.table(["arm", "wall ms/step", "CPU ms/step", "pairs/s (CPU)"], arm_rows) + "\n\n"
            + common.table(["pairs/s ratio", "CPU time: median [min-max]", "met", "wall time: median [min-max]",
                            "met", "target"], ratio_rows))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--rows-per-task", type=int, default=400)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=10, help="steps per arm per repetition")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=0,
                        help="tokens per sequence of synthetic rows (0: the benchmark's short rows)")
    parser.add_argument("--memory", default="", help="comma-separated lengths: peak-memory table only")
    parser.add_argument("--arms", default="", help="comma-separated arms (default: all; at --length, "
                        + ", ".join(LONG_ARMS) + ")")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the benchmark runs")
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rows_per_task, args.reps, args.block = 4, 12, 1, 2
    torch.set_num_threads(args.threads)
    common.quiet()
    names = tuple(args.arms.split(",")) if args.arms else LONG_ARMS if (args.length or args.memory) else ARMS
    if unknown := set(names) - set(ARMS):
        parser.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.peak:  # one arm in this fresh process (memory_table's child)
            arms, _ = build_arms(args, Path(tmp), (args.peak,))
            # Two steps each: a TRL run of n steps runs n + 1 (its first interval starts at a step's end).
            print(json.dumps({"peak_mb": peak_above(arms[args.peak], 1 if args.peak.startswith("trl") else 2)}))
            return ""
        if args.memory:
            out = common.header("DPO step peak memory: TRL vs ours vs floor", model=args.model, batch_pairs=args.batch)
            out += "\n" + memory_table(args, [int(x) for x in args.memory.split(",")], names)
            print(out)
            return out
        arms, facts = build_arms(args, Path(tmp), names)
        times = common.alternate(arms, args.reps, args.block, warmup=WARMUP)
        if "floor_ran_our_batches" in facts:
            facts["floor_ran_our_batches"] = facts["floor_ran_our_batches"]()
    out = common.header("DPO throughput: TRL vs ours vs floor", reps=args.reps, block=args.block, length=args.length, **facts)
    out += "\n" + report(times, args.batch, LONG_TARGETS if args.length else TARGETS)
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
