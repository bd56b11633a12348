"""prepare: read each task, normalise to prompt/chosen/rejected, split, tokenize once, write Parquet.

Per task `prepared/<task>/` holds `train.parquet`, `validation.parquet` (what selects: best
checkpoints, `eval/...` during training, ASHA and Tune) and `test.parquet` (what reports:
evaluate, the report, `ama-ray compare`), with a stable `example_id` (a hash of the task and
the example's text), the texts, and `prompt_input_ids`,
`chosen_input_ids`, `rejected_input_ids` (completions end with EOS). Unusable rows are dropped
and counted per reason in the manifest; tokenization runs on Ray Data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ama_ray.config import Config, DataConfig, TaskConfig
from ama_ray.errors import DataError
from ama_ray.stages import base_model_path, model_identity, needs_work, open_run
from ama_ray.train.data import SPLITS

log = logging.getLogger(__name__)
STAGE = "prepare"
COLUMNS = ("example_id", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "length")


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Prepare every task not already committed with the same settings; returns unit paths."""
    run_dir = open_run(cfg)
    digest = prepare_hash(cfg)
    pending = [t for t in cfg.data.tasks if needs_work(run_dir.prepared(t.name), digest, STAGE, force)]
    for t in cfg.data.tasks:
        if t not in pending:
            log.info("prepare: %s already committed, skipping", t.name)
    if not pending:
        return [run_dir.prepared(t.name).path for t in cfg.data.tasks]
    model_path = base_model_path(cfg)
    from ama_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    examples, drops = {}, {}
    for task in pending:
        examples[task.name], drops[task.name] = normalise_task(cfg, task, tokenizer)
    tokenized = tokenize_all(cfg, model_path, examples)
    for task in pending:
        _write_task(cfg, run_dir, task, tokenized[task.name], drops[task.name], digest, model_path)
    return [run_dir.prepared(t.name).path for t in cfg.data.tasks]


def prepare_hash(cfg: Config) -> str:
    return cfg.section_hash("model.name", "model.revision", "model.tiny", "data")


# --- reading and normalising -------------------------------------------------------------

def raw_rows(cfg: Config, task: TaskConfig) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a task's source; `where` names the file and line/row for errors."""
    if task.benchmark is not None:
        from ama_ray.data import benchmark  # the task name was checked when the config loaded

        opts = {"flagged_share": cfg.data.arithmetic_flagged_share} if task.benchmark == "arithmetic" else {}
        seed = cfg.data.seed * 1000 + _stable_int(task.name) % 1000
        for i, row in enumerate(benchmark.generate(task.benchmark, task.size, seed=seed, **opts)):
            yield f"benchmark:{task.benchmark}#{i}", {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        return
    from ama_ray.data import readers

    if task.path is not None:
        for line, row in readers.read_rows(task.path):
            yield f"{task.path}:{line}", row
    else:
        for i, row in enumerate(readers.load_hf_rows(task.hf_dataset)):
            yield f"{task.hf_dataset.get('path')}#{i}", row


def normalise_task(cfg: Config, task: TaskConfig, tokenizer: Any) -> tuple[list[dict], Counter]:
    """Usable examples of one task as text, with per-reason drop counts."""
    from ama_ray.data.formats import Dropped, normalize_row, to_text

    drops: Counter = Counter()
    first_drop = ""
    seen: set[str] = set()
    out = []
    for where, row in raw_rows(cfg, task):
        norm = normalize_row(row, task.layout, task.column_map, task.pku_pair_key)
        if isinstance(norm, Dropped):
            drops[norm.reason] += 1
            first_drop = first_drop or f"; first at {where}: {norm.reason} ({norm.detail})"
            continue
        prompt, chosen, rejected = to_text(norm, tokenizer)
        example_id = _example_id(task.name, prompt, chosen, rejected)
        if example_id in seen:
            drops["duplicate"] += 1
            continue
        seen.add(example_id)
        out.append({"example_id": example_id, "prompt": prompt, "chosen": chosen, "rejected": rejected})
        if task.max_rows and len(out) >= task.max_rows:
            break
    if not out:
        raise DataError(
            f"task '{task.name}' has no usable rows (dropped: {dict(drops) or 'none read'}{first_drop})",
            where=task.path or task.benchmark or str(task.hf_dataset),
            fix="check the file's layout and column names (docs/data-formats.md) or set data.tasks[].layout/column_map",
        )
    return out, drops


def _example_id(task: str, prompt: str, chosen: str, rejected: str) -> str:
    blob = json.dumps([task, prompt, chosen, rejected], ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def heldout_sizes(n: int, data: DataConfig, task: str, where: str) -> tuple[int, int]:
    """(validation, test) sizes of a task with `n` usable rows: each its fraction of n, at least
    `data.min_heldout_examples` and at most `data.max_heldout_examples`. Raises DataError naming
    the task when that leaves no training rows."""
    def size(fraction: float) -> int:
        return min(data.max_heldout_examples, max(data.min_heldout_examples, round(fraction * n)))

    n_val, n_test = size(data.validation_fraction), size(data.test_fraction)
    if n - n_val - n_test < 1:
        raise DataError(
            f"task '{task}' has {n} usable rows: too few for {n_val} validation and {n_test} test examples "
            f"(data.min_heldout_examples={data.min_heldout_examples}) and a training split",
            where=where,
            fix="add rows to the task, or lower data.min_heldout_examples (held-out sets under ~50 pairs make selection and reporting noisy)",
        )
    return n_val, n_test


def assign_splits(example_ids: list[str], seed: int, n_val: int, n_test: int) -> dict[str, str]:
    """example_id -> 'validation', 'test' or 'train'.

    Examples are ranked by a hash of (seed, example_id), independent of row order and of every
    other task: the first `n_val` are validation, the next `n_test` test, the rest train.
    """
    ranked = sorted(example_ids, key=lambda i: (_stable_int(f"{seed}:{i}"), i))
    out = {i: "validation" for i in ranked[:n_val]}
    out.update({i: "test" for i in ranked[n_val : n_val + n_test]})
    out.update({i: "train" for i in ranked[n_val + n_test :]})
    return out


# --- tokenizing on Ray Data --------------------------------------------------------------

class Tokenize:
    """Ray Data callable: texts -> token ids with the truncation policy applied."""

    def __init__(self, model_path: str, trust_remote_code: bool, max_prompt: int, max_completion: int, revision: str | None = None):
        from ama_ray.models.loading import load_tokenizer
        from ama_ray.stages.inference import check_model_path

        check_model_path(model_path, "a tokenizing actor")
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, revision=revision)
        self.max_prompt, self.max_completion = max_prompt, max_completion

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        eos = self.tok.eos_token_id
        enc = lambda texts: self.tok(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
        prompts, chosen, rejected = enc(batch["prompt"]), enc(batch["chosen"]), enc(batch["rejected"])
        out = {k: batch[k] for k in ("task", "example_id", "prompt", "chosen", "rejected")}
        out["prompt_truncated"] = np.array([len(p) > self.max_prompt for p in prompts])
        prompts = [p[-self.max_prompt :] for p in prompts]  # keep the end: the question sits there
        chosen = [c + [eos] for c in chosen]
        rejected = [r + [eos] for r in rejected]
        out["too_long"] = np.array([max(len(c), len(r)) > self.max_completion for c, r in zip(chosen, rejected)])
        out["prompt_input_ids"], out["chosen_input_ids"], out["rejected_input_ids"] = prompts, chosen, rejected
        out["length"] = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)])
        return out


def tokenize_all(cfg: Config, model_path: str, examples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Tokenize every pending task in one Ray Data pass; returns rows per task."""
    import ray

    from ama_ray.cluster import ensure_ray

    ensure_ray()
    items = [{"task": task, **ex} for task, rows in examples.items() for ex in rows]
    ds = ray.data.from_items(items).map_batches(
        Tokenize,
        fn_constructor_args=(model_path, cfg.model.trust_remote_code, cfg.data.max_prompt_length, cfg.data.max_completion_length,
                             cfg.model.revision),
        batch_size=512,
        num_cpus=cfg.reference.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.reference.num_actors),
    )
    per_task: dict[str, list[dict]] = {task: [] for task in examples}
    for row in ds.iter_rows():
        per_task[row["task"]].append(row)
    return per_task


# --- writing -----------------------------------------------------------------------------

def _write_task(cfg: Config, run_dir, task: TaskConfig, rows: list[dict], drops: Counter, digest: str, model_path: str) -> None:
    too_long = sum(bool(r["too_long"]) for r in rows)
    if too_long:
        drops["too_long"] += too_long
    rows = sorted((r for r in rows if not r["too_long"]), key=lambda r: r["example_id"])
    if not rows:
        raise DataError(
            f"task '{task.name}' has no rows within data.max_completion_length={cfg.data.max_completion_length}",
            where=task.path or task.benchmark or str(task.hf_dataset),
            fix="raise data.max_completion_length",
        )
    where = task.path or task.benchmark or str(task.hf_dataset)
    n_val, n_test = heldout_sizes(len(rows), cfg.data, task.name, where)
    assigned = assign_splits([r["example_id"] for r in rows], cfg.data.seed, n_val, n_test)
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for r in rows:
        splits[assigned[r["example_id"]]].append(r)
    unit = run_dir.prepared(task.name)
    unit.begin()
    for split, part in splits.items():
        unit.write_parquet(unit.split_file(split), _table(part))
    unit.commit(
        digest,
        stage=STAGE,
        task=task.model_dump(mode="json"),
        model=model_path,
        model_identity=model_identity(cfg),
        rows={s: len(p) for s, p in splits.items()},
        dropped=dict(drops),
        prompt_truncated=int(sum(bool(r["prompt_truncated"]) for r in rows)),
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=cfg.data.max_completion_length,
    )
    log.info("prepare: %s %s dropped=%s", task.name, " ".join(f"{s}={len(p)}" for s, p in splits.items()), dict(drops))


def _table(rows: list[dict]) -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table(
        {
            "example_id": pa.array([r["example_id"] for r in rows], pa.string()),
            "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
            "chosen": pa.array([r["chosen"] for r in rows], pa.string()),
            "rejected": pa.array([r["rejected"] for r in rows], pa.string()),
            "prompt_input_ids": pa.array([list(map(int, r["prompt_input_ids"])) for r in rows], ids),
            "chosen_input_ids": pa.array([list(map(int, r["chosen_input_ids"])) for r in rows], ids),
            "rejected_input_ids": pa.array([list(map(int, r["rejected_input_ids"])) for r in rows], ids),
            "length": pa.array([int(r["length"]) for r in rows], pa.int32()),
        }
    )
