"""prepare: read each task, normalise to prompt/chosen/rejected, split, tokenize once, write Parquet.

Per task `prepared/<task>/` holds `train.parquet`, `validation.parquet` (what selects: best
checkpoints, `eval/...` during training, ASHA and Tune) and `test.parquet` (what reports:
evaluate, the report, `ama-ray compare`), plus `signal.parquet` with `data.signal_fraction` > 0
(held out of training; its excess drives `ama_h`), with a stable `example_id` (a hash of the task and
the example's text), the texts, and `prompt_input_ids`,
`chosen_input_ids`, `rejected_input_ids` (completions end with EOS). Unusable rows are dropped
and counted per reason in the manifest; tokenization runs on Ray Data.

Nothing holds a task's rows in one process: the driver streams normalised rows into a hidden
staging file in the unit (`.normalised.parquet`; only example ids are kept, to drop duplicates),
Ray Data tokenizes every pending task's staging file and sorts the rows by (task, example_id),
the driver streams them into `.tokenized.parquet` (keeping each kept row's id, 16 bytes), assigns
the splits from the ids alone, and streams the tokenized file once more into the three splits
in row groups of ROW_GROUP_ROWS. The staging files are removed before the unit commits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ama_ray.config import Config, DataConfig, TaskConfig
from ama_ray.errors import DataError
from ama_ray.stages import base_model_path, model_identity, needs_work, open_run
from ama_ray.storage import ROW_GROUP_ROWS, SplitWriters, Unit
from ama_ray.train.data import ALL_SPLITS, TAG, output_blocks, parquet_dataset

log = logging.getLogger(__name__)
STAGE = "prepare"
COLUMNS = ("example_id", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "length")
NORMALISED, TOKENIZED = ".normalised", ".tokenized"  # staging files in the unit (hidden: never in a manifest)
TEXT = pa.schema([(c, pa.string()) for c in ("example_id", "prompt", "chosen", "rejected")])
OUTPUT = pa.schema([*TEXT, *((c, pa.list_(pa.int32())) for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")),
                    ("length", pa.int32())])


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
    units, drops = {}, {}
    try:
        for task in pending:
            units[task.name] = unit = run_dir.prepared(task.name)
            unit.begin()
            drops[task.name] = stage_task(cfg, task, tokenizer, unit)
        kept = tokenize_all(cfg, model_path, units)
        for task in pending:
            _write_task(cfg, units[task.name], task, kept[task.name], drops[task.name], digest, model_path)
    except BaseException:
        for unit in units.values():  # no half-written unit stays behind
            if unit.manifest() is None:
                unit.fs.delete_dir(unit.path)
        raise
    return [run_dir.prepared(t.name).path for t in cfg.data.tasks]


def prepare_hash(cfg: Config) -> str:
    # Under SFT the rows keep no rejected side (`stage_task`); a DPO run must not reuse them.
    return cfg.section_hash("model.name", "model.revision", "model.tiny", "data") + ("" if cfg.dpo.pairs else "-sft")


# --- reading and normalising -------------------------------------------------------------

def raw_rows(cfg: Config, task: TaskConfig) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a task's source; `where` names the file and line/row for errors."""
    if task.cluster is not None:  # a task found by `data.partition`
        from ama_ray.stages.partition import cluster_rows

        yield from cluster_rows(cfg, task.cluster)
        return
    if task.benchmark is not None:
        from ama_ray.data import benchmark  # the task name was checked when the config loaded

        opts = {"flagged_share": cfg.data.arithmetic_flagged_share} if task.benchmark == "arithmetic" else {}
        seed = cfg.data.seed * 1000 + _stable_int(task.name) % 1000
        for i, row in enumerate(benchmark.generate(task.benchmark, task.size, seed=seed, **opts)):
            if cfg.data.benchmark_chat:  # what a user sends an instruct model: turns, through its chat template
                row = {"prompt": [{"role": "user", "content": row["prompt"]}],
                       **{k: [{"role": "assistant", "content": row[k].strip()}] for k in ("chosen", "rejected")}}
            yield f"benchmark:{task.benchmark}#{i}", {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        return
    from ama_ray.data import readers

    if task.path is not None:
        for line, row in readers.read_rows(task.path):
            yield f"{task.path}:{line}", row
    else:
        for i, row in enumerate(readers.load_hf_rows(task.hf_dataset)):
            yield f"{task.hf_dataset.get('path')}#{i}", row


def stage_task(cfg: Config, task: TaskConfig, tokenizer: Any, unit: Unit) -> Counter:
    """Stream one task's usable examples, as text, into the unit's `.normalised.parquet`;
    returns the per-reason drop counts. DataError when no row is usable."""
    from ama_ray.data.formats import Dropped, normalize_row, to_text

    drops: Counter = Counter()
    first_drop = ""
    seen: set[str] = set()  # example ids only, to drop duplicates
    pending: list[dict] = []
    written = 0
    with unit.fs.open_output_stream(unit.file(unit.split_file(NORMALISED))) as stream, pq.ParquetWriter(stream, TEXT) as writer:
        for where, row in raw_rows(cfg, task):
            norm = normalize_row(row, task.layout, task.column_map, task.pku_pair_key)
            if isinstance(norm, Dropped):
                drops[norm.reason] += 1
                first_drop = first_drop or f"; first at {where}: {norm.reason} ({norm.detail})"
                continue
            if norm["rejected"] is None and cfg.dpo.pairs:
                raise DataError(
                    f"task '{task.name}' has a prompt/completion row (no rejected response): DPO trains on preference pairs",
                    where=where, fix="set dpo.objective=sft to train on completions (docs/sft.md), or give chosen and rejected",
                )
            prompt, chosen, rejected = to_text(norm, tokenizer)
            if not cfg.dpo.pairs:
                # SFT trains on the chosen side only: pairs that differ only in their rejected
                # response are one example (and must not land in train and test both).
                rejected = ""
            example_id = _example_id(task.name, prompt, chosen, rejected)
            if example_id in seen:
                drops["duplicate"] += 1
                continue
            seen.add(example_id)
            pending.append({"example_id": example_id, "prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(pending) == ROW_GROUP_ROWS or (task.max_rows and written + len(pending) >= task.max_rows):
                writer.write_table(pa.Table.from_pylist(pending, TEXT))
                written, pending = written + len(pending), []
            if task.max_rows and written >= task.max_rows:
                break
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, TEXT))
            written += len(pending)
    if not written:
        raise DataError(
            f"task '{task.name}' has no usable rows (dropped: {dict(drops) or 'none read'}{first_drop})",
            where=_where(task),
            fix="check the file's layout and column names (docs/data-formats.md) or set data.tasks[].layout/column_map",
        )
    return drops


def _where(task: TaskConfig) -> str:
    """A task's source, for errors."""
    if task.cluster is not None:
        return f"partition/rows.parquet, cluster {task.cluster} (task '{task.name}')"
    return task.path or task.benchmark or str(task.hf_dataset)


def _example_id(task: str, prompt: str, chosen: str, rejected: str) -> str:
    blob = json.dumps([task, prompt, chosen, rejected], ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def heldout_sizes(n: int, data: DataConfig, task: str, where: str) -> tuple[int, ...]:
    """(validation, test) sizes of a task with `n` usable rows, and the `signal` split's when
    `data.signal_fraction` > 0: each its fraction of n, at least `data.min_heldout_examples` and
    at most `data.max_heldout_examples`. Raises DataError naming the task when that leaves no
    training rows."""
    def size(fraction: float) -> int:
        return min(data.max_heldout_examples, max(data.min_heldout_examples, round(fraction * n)))

    sizes = (size(data.validation_fraction), size(data.test_fraction)) + ((size(data.signal_fraction),) if data.signal_fraction else ())
    if n - sum(sizes) < 1:
        named = " and ".join(f"{m} {s}" for m, s in zip(sizes, ("validation", "test", "signal")))
        raise DataError(
            f"task '{task}' has {n} usable rows: too few for {named} examples "
            f"(data.min_heldout_examples={data.min_heldout_examples}) and a training split",
            where=where,
            fix="add rows to the task, or lower data.min_heldout_examples (held-out sets under ~50 pairs make selection and reporting noisy)",
        )
    return sizes


def assign_splits(example_ids: list[str], seed: int, n_val: int, n_test: int, n_signal: int = 0) -> dict[str, str]:
    """example_id -> 'validation', 'test', 'signal' or 'train' (`split_codes` as a mapping)."""
    codes = split_codes(np.array(example_ids, dtype=object), seed, n_val, n_test, n_signal)
    return {i: ALL_SPLITS[c] for i, c in zip(example_ids, codes)}


def split_codes(example_ids: np.ndarray, seed: int, n_val: int, n_test: int, n_signal: int = 0) -> np.ndarray:
    """The split of each example, as an index into ALL_SPLITS (train, validation, test, signal).

    Examples are ranked by a hash of (seed, example_id), independent of row order and of every
    other task: the first `n_val` are validation, the next `n_test` test, the next `n_signal`
    signal, the rest train. So adding a signal split takes its rows from training and leaves
    validation and test as they were. Needs only the ids.
    """
    ids = example_ids.astype(str)
    keys = np.fromiter((_stable_int(f"{seed}:{i}") for i in ids), dtype=np.uint64, count=len(ids))
    order = np.lexsort((ids, keys))  # ties (equal hashes) by id
    codes = np.full(len(example_ids), ALL_SPLITS.index("train"), dtype=np.uint8)
    start = 0
    for split, size in zip(ALL_SPLITS[1:], (n_val, n_test, n_signal)):
        codes[order[start : start + size]] = ALL_SPLITS.index(split)
        start += size
    return codes


# --- tokenizing on Ray Data --------------------------------------------------------------

# CPUs a tokenizing actor reserves, at most. The sort after the pool runs Ray tasks of one whole
# CPU each, and Ray Data keeps the pool's idle actors until the dataset is done: a pool holding
# every CPU (reference.cpus_per_actor: 2 on a 2-CPU host, which the inference passes use well)
# waited on the sort forever. Tokenizing is light, and a fast tokenizer's threads do not follow
# Ray's reservation anyway.
TOKENIZE_CPUS = 0.5


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
        out = {k: batch[k] for k in (TAG, "example_id", "prompt", "chosen", "rejected") if k in batch}
        out["prompt_truncated"] = np.array([len(p) > self.max_prompt for p in prompts])
        prompts = [p[-self.max_prompt :] for p in prompts]  # keep the end: the question sits there
        # A chat template's assistant turn already ends with its end-of-turn (often the eos, then a
        # newline): a second eos would teach the model to emit two.
        chosen, rejected = ([c if eos in c[-2:] else c + [eos] for c in side] for side in (chosen, rejected))
        # A prompt/completion row (`dpo.objective: sft`) has no rejected side: no tokens, not an eos.
        rejected = [r if text else [] for r, text in zip(rejected, batch["rejected"])]
        out["too_long"] = np.array([max(len(c), len(r)) > self.max_completion for c, r in zip(chosen, rejected)])
        out["prompt_input_ids"], out["chosen_input_ids"], out["rejected_input_ids"] = prompts, chosen, rejected
        out["length"] = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)])
        return out


class Kept:
    """What the split assignment needs of one task's tokenized rows: the kept rows' ids (16 bytes
    each, in file order) and counts."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.too_long = self.prompt_truncated = 0

    def add(self, table: pa.Table) -> None:
        keep = pc.invert(table["too_long"])
        self.too_long += table.num_rows - pc.sum(keep.cast(pa.int64())).as_py()
        self.prompt_truncated += pc.sum(pc.and_(keep, table["prompt_truncated"]).cast(pa.int64())).as_py()
        self.ids.append(table["example_id"].filter(keep).to_numpy(zero_copy_only=False).astype("S16"))

    def example_ids(self) -> np.ndarray:
        return np.concatenate(self.ids) if self.ids else np.array([], dtype="S16")


def tokenize_all(cfg: Config, model_path: str, units: dict[str, Unit]) -> dict[str, Kept]:
    """Tokenize every pending task's staged rows in one Ray Data pass, sorted by (task,
    example_id), streaming each task's rows into its unit's `.tokenized.parquet`."""
    import ray

    from ama_ray.cluster import ensure_ray

    ensure_ray()
    names = list(units)
    # The pool leaves one CPU free for the sort's tasks (see TOKENIZE_CPUS), whatever num_actors says.
    cpus = min(cfg.reference.cpus_per_actor, TOKENIZE_CPUS)
    actors = max(1, min(cfg.reference.num_actors, int((ray.cluster_resources().get("CPU", 1.0) - 1.0) // cpus)))
    ds = parquet_dataset([(units[n], NORMALISED) for n in names], tags=names).map_batches(
        Tokenize,
        fn_constructor_args=(model_path, cfg.model.trust_remote_code, cfg.data.max_prompt_length, cfg.data.max_completion_length,
                             cfg.model.revision),
        batch_size=512,
        num_cpus=cpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
    ).sort([TAG, "example_id"])  # Ray Data sorts in the object store (spilling to disk), not here
    kept = {n: Kept() for n in names}
    schema = pa.schema([*OUTPUT, ("too_long", pa.bool_()), ("prompt_truncated", pa.bool_())])
    with SplitWriters({n: (units[n], TOKENIZED) for n in names}, schema) as writers:
        for batch in output_blocks(ds):
            for name in pc.unique(batch[TAG]).to_pylist():
                part = batch.filter(pc.equal(batch[TAG], name)).select(schema.names).cast(schema)
                kept[name].add(part)
                writers.add(name, part)
    return kept


# --- writing -----------------------------------------------------------------------------

def _write_task(cfg: Config, unit: Unit, task: TaskConfig, kept: Kept, drops: Counter, digest: str, model_path: str) -> None:
    """Assign the splits from the kept ids, stream `.tokenized.parquet` into the three split
    files (rows in example_id order), drop the staging files and commit."""
    if kept.too_long:
        drops["too_long"] += kept.too_long
    ids = kept.example_ids()
    if not len(ids):
        raise DataError(
            f"task '{task.name}' has no rows within data.max_completion_length={cfg.data.max_completion_length}",
            where=_where(task),
            fix="raise data.max_completion_length",
        )
    where = _where(task)
    codes = split_codes(ids, cfg.data.seed, *heldout_sizes(len(ids), cfg.data, task.name, where))
    splits = cfg.splits
    rows = {split: int((codes == ALL_SPLITS.index(split)).sum()) for split in splits}
    tokenized = unit.file(unit.split_file(TOKENIZED))
    offset = 0
    with SplitWriters({split: (unit, split) for split in splits}, OUTPUT) as writers:
        for batch in pq.ParquetFile(tokenized, filesystem=unit.fs).iter_batches(batch_size=ROW_GROUP_ROWS):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.invert(table["too_long"])).select(OUTPUT.names)
            part = codes[offset : offset + table.num_rows]
            offset += table.num_rows
            for split in splits:
                writers.add(split, table.filter(pa.array(part == ALL_SPLITS.index(split))))
    for staged in (NORMALISED, TOKENIZED):
        unit.fs.delete_file(unit.file(unit.split_file(staged)))
    unit.commit(
        digest,
        stage=STAGE,
        task=task.model_dump(mode="json"),
        model=model_path,
        model_identity=model_identity(cfg),
        rows=rows,
        dropped=dict(drops),
        prompt_truncated=kept.prompt_truncated,
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=cfg.data.max_completion_length,
    )
    log.info("prepare: %s %s dropped=%s", task.name, " ".join(f"{s}={n}" for s, n in rows.items()), dict(drops))
