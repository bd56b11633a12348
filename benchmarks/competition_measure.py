"""Do the offline benchmark's tasks compete? DPO on one task, measured on all of them.

An experiment, not part of the package: a single-process measurement (torch only, no Ray) behind issue 3's acceptance (b): from the
tiny SFT base, DPO on task A alone should lower another task's held-out `logps/accuracies`
by >= 10 points, or raise A's far less than DPO on all tasks together. `measure_competition`
trains the base, one specialist per task and one run on the union, and evaluates each on
every task's held-out rows; `competition_verdict` applies the criterion; `format_table`
renders the numbers (benchmarks/competition.py, docs/benchmark.md).

Data: `generate(task, n_eval + n_train, seed=data_seed)`; the first `n_eval` rows are held
out, the rest train. Tokenized as the prepare stage does (prompt and completion separately,
EOS appended to completions). The reference is the base, its log-probs computed once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ama_ray.data import benchmark
from ama_ray.dpo import DPOLossConfig, batch_metrics, collate, per_example_loss, reference_logps
from ama_ray.models.loading import load_model, load_tokenizer

logger = logging.getLogger(__name__)

BASE, ALL = "base", "all"
METRICS = ("logps/accuracies", "rewards/accuracies")


@dataclass(frozen=True)
class CompetitionSettings:
    """One measurement: the DPO recipe of every run and the data it sees."""

    steps: int = 300
    """DPO steps of every run (specialists and the union alike)."""
    batch_size: int = 32
    lr: float = 1e-3
    beta: float = 0.1
    train_examples_per_task: int = 2000
    eval_examples_per_task: int = 200
    seed: int = 0
    """Seeds batch sampling (torch) of every run."""
    data_seed: int = 0
    """Seeds the benchmark rows (train and held-out)."""


def tokenize_rows(tokenizer, rows: Sequence[dict]) -> list[dict]:
    """Benchmark rows -> `collate` examples (+ `kind`); completions end with EOS."""
    eos = tokenizer.eos_token_id
    enc = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = enc(r["prompt"] for r in rows)
    chosen = enc(r["chosen"] for r in rows)
    rejected = enc(r["rejected"] for r in rows)
    return [
        {"prompt_input_ids": p, "chosen_input_ids": c + [eos], "rejected_input_ids": j + [eos], "kind": r["meta"]["kind"]}
        for p, c, j, r in zip(prompts, chosen, rejected, rows)
    ]


def _with_reference(model, examples: list[dict], pad_id: int) -> list[dict]:
    ref_chosen, ref_rejected = reference_logps(model, examples, pad_id, batch_size=256)
    return [
        {**ex, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
        for ex, c, r in zip(examples, ref_chosen, ref_rejected)
    ]


def task_splits(
    model, tokenizer, settings: CompetitionSettings, generate: Callable[..., list[dict]] = benchmark.generate
) -> dict[str, dict[str, list[dict]]]:
    """{task: {"train": [...], "eval": [...]}} tokenized, with the base's reference log-probs.

    `generate(task, n, seed)` makes the rows (the benchmark's by default; a variant may be
    passed to compare generators).
    """
    n_eval, n_train = settings.eval_examples_per_task, settings.train_examples_per_task
    splits = {}
    for task in benchmark.TASKS:
        examples = tokenize_rows(tokenizer, generate(task, n_eval + n_train, seed=settings.data_seed))
        examples = _with_reference(model, examples, tokenizer.pad_token_id)
        splits[task] = {"eval": examples[:n_eval], "train": examples[n_eval:]}
    return splits


def _reference(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([ex["ref_chosen_logps"] for ex in examples]),
        torch.tensor([ex["ref_rejected_logps"] for ex in examples]),
    )


def train_dpo(model, examples: list[dict], pad_id: int, settings: CompetitionSettings) -> list[float]:
    """Plain DPO on `examples` (uniform sampling with replacement), AdamW, constant lr.

    Trains `model` in place and leaves it in eval mode; returns the per-step mean loss.
    """
    cfg = DPOLossConfig(beta=settings.beta)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(settings.steps):
        batch = [examples[i] for i in torch.randint(len(examples), (settings.batch_size,), generator=gen).tolist()]
        ref_chosen, ref_rejected = _reference(batch)
        loss = per_example_loss(model, collate(batch, pad_id), ref_chosen, ref_rejected, cfg)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, beta: float) -> dict[str, float]:
    """TRL's metrics over all `examples` (one batch), plus `logps/accuracies/<kind>` per kind.

    Rewards are relative to the reference log-probs stored in the examples (the base).
    """
    ref_chosen, ref_rejected = _reference(examples)
    out = per_example_loss(model, collate(examples, pad_id), ref_chosen, ref_rejected, DPOLossConfig(beta=beta))
    metrics = batch_metrics(out)
    correct = (out["chosen_logps"] > out["rejected_logps"]).numpy()
    kinds = np.array([ex["kind"] for ex in examples])
    for kind in sorted(set(kinds)):
        metrics[f"logps/accuracies/{kind}"] = float(correct[kinds == kind].mean())
    return metrics


def measure_competition(
    base_dir: str,
    settings: CompetitionSettings = CompetitionSettings(),
    *,
    runs: Sequence[str] | None = None,
    generate: Callable[..., list[dict]] = benchmark.generate,
) -> dict[str, dict[str, dict[str, float]]]:
    """{run: {task: metrics}} for the base, DPO on each task alone (`only-<task>`) and on all.

    `runs` picks a subset of `base`, `only-<task>`, `all` (default: every one). Each run starts
    from a fresh copy of the model in `base_dir` and is evaluated on every task's held-out
    rows. Runs on one intra-op thread (restored afterwards).
    """
    names = list(runs) if runs is not None else [BASE] + [f"only-{t}" for t in benchmark.TASKS] + [ALL]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only add sync overhead on a busy host
    try:
        base, tokenizer = load_model(base_dir), load_tokenizer(base_dir)
        pad_id = tokenizer.pad_token_id
        splits = task_splits(base, tokenizer, settings, generate)
        results = {}
        for name in names:
            start = time.perf_counter()
            model = copy.deepcopy(base)
            if name != BASE:
                tasks = benchmark.TASKS if name == ALL else [name.removeprefix("only-")]
                train_dpo(model, [ex for t in tasks for ex in splits[t]["train"]], pad_id, settings)
            results[name] = {t: evaluate(model, s["eval"], pad_id, settings.beta) for t, s in splits.items()}
            logger.info("competition: %s in %.1f s", name, time.perf_counter() - start)
        return results
    finally:
        torch.set_num_threads(threads)


def generate_without_flagged_arithmetic(task: str, n: int, seed: int) -> list[dict]:
    """Ablation, not a proposed benchmark: the benchmark with arithmetic's flagged share at 0.

    Only the arithmetic rows change (refusal and brackets rows are identical), so comparing
    `only-arithmetic` under both generators isolates what the flagged rows do to refusal.
    """
    return benchmark.generate(task, n, seed, **({"flagged_share": 0.0} if task == "arithmetic" else {}))


def competition_verdict(results: dict[str, dict[str, dict[str, float]]], drop: float = 0.10) -> dict[str, float]:
    """The largest effects behind acceptance (b), in accuracy units (0.1 = 10 points).

    `max_drop`: the largest fall of a task's held-out `logps/accuracies` below the base after
    DPO on another task alone; `max_gap`: the largest `all` minus `only-A` gain on A itself
    (both need the runs in `results`; absent ones count as 0). `competes` is 1.0 when
    max_drop >= `drop`.
    """
    base = results[BASE]
    max_drop = max_gap = 0.0
    for task in base:
        only = results.get(f"only-{task}")
        if only is None:
            continue
        for other in base:
            if other != task:
                max_drop = max(max_drop, base[other]["logps/accuracies"] - only[other]["logps/accuracies"])
        if ALL in results:
            max_gap = max(max_gap, results[ALL][task]["logps/accuracies"] - only[task]["logps/accuracies"])
    return {"max_drop": max_drop, "max_gap": max_gap, "competes": float(max_drop >= drop)}


def format_table(
    seeds: Sequence[dict[str, dict[str, dict[str, float]]]],
    metrics: Sequence[str] = METRICS,
    tasks: Sequence[str] | None = None,
) -> str:
    """A markdown table: one row per run, one column per (task, metric), in percent.

    `seeds` holds one `measure_competition` result per seed (same runs); a cell is the mean
    over seeds, followed by the range `(min-max)` when there are several. A metric a task
    does not have (e.g. another task's kind) is left out of that task's columns.
    """
    first = seeds[0]
    tasks = list(tasks or next(iter(first.values())))
    columns = [(t, m) for t in tasks for m in metrics if m in first[next(iter(first))][t]]
    short = lambda m: m.replace("logps/accuracies", "logps acc").replace("rewards/accuracies", "rewards acc")  # noqa: E731
    header = ["run"] + [f"{t} {short(m)}" for t, m in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for run in first:
        cells = []
        for t, m in columns:
            values = 100 * np.array([result[run][t][m] for result in seeds])
            spread = f" ({values.min():.0f}-{values.max():.0f})" if len(values) > 1 else ""
            cells.append(f"{values.mean():.1f}{spread}")
        lines.append("| " + " | ".join([run] + cells) + " |")
    return "\n".join(lines)
