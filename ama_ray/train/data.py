"""Per-worker task data: streamed from Ray Data shards, disjoint across workers, replayable.

Every row a trainer reads carries what it needs (token ids, reference log-probs, and for the
generalist the specialist's loss): the reference and score stages wrote them together, so no
worker joins anything. The training split of each task reaches the `TorchTrainer` as a Ray Data
dataset (`task_dataset`); each worker iterates it with `ray.train.get_dataset_shard(task)` and
keeps the rows whose `example_id` hashes to its rank (`in_shard`), so shards are disjoint and
each worker's shard is the same on every run. A `ShardStream` pulls rows from that iterator
only as a step's labels ask for them: an epoch is one pass of the worker's shard through a local
shuffle buffer of `SHUFFLE_ROWS` rows seeded by (seed, task, epoch, rank), and a new pass, freshly
shuffled, starts when one ends (small tasks cycle). Worker memory is the shuffle buffer and a few
prefetched blocks, whatever the size of the data. A stream's position is (epoch, rows taken),
saved in every checkpoint; resuming re-reads that epoch's pass and skips what was taken, so a
resumed run draws exactly the rows an uninterrupted one would (the pass order is deterministic:
the datasets are read with `preserve_order`).

Held-out rows (validation during training, test in evaluate) are bounded by
`data.max_heldout_examples` and read whole (`load_task_split`).
"""

from __future__ import annotations

import hashlib
import zlib
from collections import deque
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa

from ama_ray.errors import StageInputError
from ama_ray.storage import ALL_SPLITS, REPORT_SPLIT, ROW_GROUP_ROWS, SELECT_SPLIT, SIGNAL_SPLIT, SPLITS, RunDir  # noqa: F401 - re-exported

ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
SHUFFLE_ROWS = 4096  # local shuffle buffer of a stream (a whole small task: a full reshuffle per epoch)
READ_ROWS = 256  # rows a stream pulls from its iterator at a time
READ_TASKS = 2  # concurrent row-group readers of one dataset
READ_AHEAD = 4  # row groups a streamed read may hold in the object store


# stage -> what its per-task unit holds
TASK_UNITS = {"prepare": "prepared data", "reference": "reference log-probs", "score": "specialist scores"}


def require_split_unit(run: RunDir, stage: str, task: str, splits: tuple[str, ...] = SPLITS) -> dict:
    """The manifest of a task's committed `prepare`, `reference` or `score` unit.

    StageInputError if it is missing, if it holds the two train/eval splits of older versions
    (one line: rerun prepare with --force, which the later stages then follow), or if it lacks
    another of `splits` (`Config.splits`: the signal split after `data.signal_fraction` was set).
    """
    what = TASK_UNITS[stage]
    unit = run.stage_unit(stage, task)
    man = unit.require(f"{what} of task '{task}'", fix=f"run `ama-ray {stage}` first")
    rows = man.get("rows") or {}
    if not all(split in rows for split in SPLITS):
        raise StageInputError(
            f"{what} of task '{task}' has splits {sorted(rows)} from an older ama_ray, not {', '.join(SPLITS)}",
            where=unit.path,
            fix="rerun `ama-ray run --force prepare` (it redoes prepare and every later stage)",
        )
    missing = [split for split in splits if split not in rows]
    if missing:
        raise StageInputError(
            f"{what} of task '{task}' has no {', '.join(missing)} split (it was made with data.signal_fraction 0)",
            where=unit.path,
            fix="rerun `ama-ray run` (prepare redoes the task with the signal split, and every later stage follows)",
        )
    return man


def require_prepared(run: RunDir, task: str, splits: tuple[str, ...] = SPLITS) -> dict:
    """`require_split_unit` of the task's prepared data."""
    return require_split_unit(run, "prepare", task, splits)


def rows_unit(run: RunDir, task: str, with_scores: bool):
    """The unit whose rows carry everything a trainer needs (scores, or reference without them)."""
    stage = "score" if with_scores else "reference"
    require_prepared(run, task)
    require_split_unit(run, stage, task)
    return run.stage_unit(stage, task)


def load_task_split(
    run: RunDir, task: str, split: str, *, with_scores: bool, rank: int = 0, world: int = 1, limit: int | None = None
) -> pa.Table:
    """One task's split for one worker, whole: token ids, reference log-probs and (optionally)
    specialist losses, in `example_id` order; rank r of W keeps rows r, r+W, ...; at most `limit`.

    For held-out splits (bounded by `data.max_heldout_examples`); training streams instead
    (`task_dataset`, `ShardStream`). Raises StageInputError when an earlier stage's unit is missing.
    """
    unit = rows_unit(run, task, with_scores)
    table = check_finite(unit.read_parquet(unit.split_file(split)), unit.file(unit.split_file(split))).sort_by("example_id")
    if world > 1:
        table = table.take(pa.array(np.arange(rank, table.num_rows, world)))
    if limit is not None:
        table = table.slice(0, limit)
    return table


def task_dataset(run: RunDir, task: str, with_scores: bool):
    """The task's training split as a (lazy) Ray Data dataset, for `TorchTrainer(datasets=...)`."""
    import logging

    unit = rows_unit(run, task, with_scores)
    ds = parquet_dataset([(unit, "train")])
    # The workers iterate it once per epoch: Ray Data's progress bars and plan logs for each pass
    # only with `ama-ray -v` (the dataset carries this context to the workers).
    ds.context.enable_progress_bars = logging.getLogger("ama_ray").isEnabledFor(logging.DEBUG)
    return ds


def stream_budget(files: list[tuple[Any, str]]) -> int:
    """Object-store bytes a streamed read of `files` may hold: READ_AHEAD row groups of the
    widest file (from the Parquet footers), at least 1 MB. Without a budget Ray Data reads ahead
    into its whole object-store share, so what sits there grows with the data."""
    import pyarrow.parquet as pq

    widest = 0.0
    for unit, split in files:
        meta = pq.ParquetFile(unit.file(unit.split_file(split)), filesystem=unit.fs).metadata
        if meta.num_row_groups:
            group = meta.row_group(0)
            widest = max(widest, group.total_byte_size / max(1, group.num_rows))
    return int(max(2**20, READ_AHEAD * ROW_GROUP_ROWS * widest))


def limited(options, budget: int):
    """`options` (Ray Data ExecutionOptions) with the object store capped at `budget` bytes."""
    options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
    return options


def parquet_dataset(files: list[tuple[Any, str]], tags: list[str] | None = None, drop: tuple[str, ...] = ()):
    """Split files (`(unit, split)` pairs) as one lazy Ray Data dataset in file order, in blocks of
    at most ~1 MB of rows or one Parquet row group (`row_groups.READ_TASK_BYTES`). With `tags`,
    each row gets a `TAG` column naming its file (`tags[i]`); `drop` names columns not to read on.

    A Ray Data datasource (`ama_ray.train.row_groups.RowGroups`) whose read tasks each read a run
    of row groups. Not `ray.data.read_parquet`: its file-listing step asks for a whole CPU, and inside
    a training worker Ray Data's CPU budget is what the trainers left, often nothing on a small
    machine, so the read would wait forever. Reading a row group is I/O: these tasks ask for no CPU, and at
    most READ_TASKS run at once (zero-CPU tasks are otherwise unbounded, and every concurrent task
    is a Python worker process).
    """
    import pyarrow.parquet as pq
    import ray

    from ama_ray.train.row_groups import ParquetFileInfo, RowGroups

    sources = []
    for i, (unit, split) in enumerate(files):
        path = unit.file(unit.split_file(split))
        meta = pq.ParquetFile(path, filesystem=unit.fs).metadata  # the footer only
        sources.append(ParquetFileInfo(path, unit.run.uri if not unit.run.is_local else "", tags[i] if tags else None,
                                       meta.num_row_groups, sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))))
    source = RowGroups(sources, drop)
    blocks = max(1, len(source.spans()))
    ds = ray.data.read_datasource(source, override_num_blocks=blocks, concurrency=min(READ_TASKS, blocks),
                                  num_cpus=0)
    limited(ds.context.execution_options, stream_budget(files))
    # Blocks of about one row group: a read task's run would otherwise become one block (Ray Data
    # merges a task's outputs up to its 128 MB default), and what is in flight grows with the run.
    ds.context.target_max_block_size = max(1, max((s.size // max(1, s.groups) for s in sources), default=1))
    return ds


def output_blocks(ds) -> Iterator[pa.Table]:
    """The dataset's output blocks, in order (with `preserve_order`), as Arrow tables: what
    `ds.iter_batches(batch_format="pyarrow", batch_size=None)` yields, without its stats.

    Not `ds.iter_batches`: its iterator sends its whole `DatasetStats` to Ray Data's stats actor
    every few seconds, and those stats keep a record per block of every operator, so each send is
    an actor-call argument that grows with the data read so far (153 KB after 147 k short rows,
    ~1.4 MB at 1.5 M), and past Ray's 100 KB inline limit it sits in the object store until the
    actor takes it: the store's level in a pass followed the data (docs/performance.md section 4).
    The block references carry no stats; the executor's own metrics (~6 KB) still go out."""
    import ray
    from ray.data.block import BlockAccessor

    for bundle in ds.iter_internal_ref_bundles():
        for ref in bundle.block_refs:
            yield BlockAccessor.for_block(ray.get(ref)).to_arrow()


TAG = "_ama_source"  # the file a row came from, while it is in flight (`parquet_dataset(tags=...)`)


def data_config(datasets: dict):
    """How Ray Train hands the task datasets to the workers: every worker gets the whole
    dataset's iterator, read in file order (`ShardStream` keeps its own rows), so each worker's
    shard and pass order are the same on every run, with each dataset's object-store budget.
    (Ray Data's `streaming_split` would deal blocks to whichever worker asks first: disjoint,
    but different on a rerun.)"""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    options = {name: limited(ExecutionOptions(preserve_order=True), ds.context.execution_options.resource_limits.object_store_memory)
               for name, ds in datasets.items()}
    return DataConfig(datasets_to_split=[], execution_options=options)


NUMBERS = ("ref_chosen_logps", "ref_rejected_logps", "specialist_loss")  # what earlier stages computed


def check_finite(table: pa.Table, where: str) -> pa.Table:
    """`table` unchanged, or StageInputError naming the column and first row whose reference
    log-prob or specialist loss is not finite (a broken earlier stage must not reach training)."""
    import pyarrow.compute as pc

    for name in NUMBERS:
        if name in table.column_names and table.num_rows:
            finite = pc.is_finite(table[name])
            if not pc.all(finite).as_py():
                row = pc.index(finite, False).as_py()
                raise StageInputError(
                    f"{name} is not finite ({table[name][row].as_py()}) for example {table['example_id'][row].as_py()}",
                    where=where,
                    fix="rerun the stage that computed it with --force (reference or score); if it repeats, use float32",
                )
    return table


def rows_of(table: pa.Table) -> list[dict]:
    """The table as a list of row dicts (ids as Python lists), the form `ama_ray.dpo.collate` takes."""
    return table.to_pylist()


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:16], 16)


def in_shard(example_ids: list[str], rank: int, world: int) -> np.ndarray:
    """Boolean mask of the ids that belong to worker `rank` of `world` (a CRC32 of the id, mod world)."""
    if world == 1:
        return np.ones(len(example_ids), dtype=bool)
    return np.array([zlib.crc32(i.encode()) % world == rank for i in example_ids], dtype=bool)


class BatchSource(Protocol):
    """What a stream reads: Ray Data's `DataIterator` (`ray.train.get_dataset_shard`), or `TableSource`."""

    def iter_batches(self, **kwargs: Any) -> Iterator[Any]: ...


class TableSource:
    """An in-memory table with `DataIterator.iter_batches`'s interface (tests and benchmarks):
    the local shuffle is a full permutation seeded by `local_shuffle_seed`."""

    def __init__(self, table: pa.Table | list[dict]):
        self.table = table if isinstance(table, pa.Table) else pa.Table.from_pylist(table)

    def iter_batches(self, *, batch_size: int, local_shuffle_seed: int | None = None, **_: Any) -> Iterator[pa.Table]:
        order = np.arange(self.table.num_rows)
        if local_shuffle_seed is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(order)
        for start in range(0, len(order), batch_size):
            yield self.table.take(pa.array(order[start : start + batch_size]))


class ShardStream:
    """An endless walk over one task's shard, pulled as steps ask; position = (epoch, rows taken).

    Each epoch is one pass of `source` through a local shuffle seeded by (seed, task, epoch,
    rank), keeping the rows of this worker's shard (`in_shard`).
    """

    def __init__(self, task: str, source: BatchSource, seed: int, rank: int = 0, world: int = 1,
                 shuffle_rows: int = SHUFFLE_ROWS, read_rows: int = READ_ROWS):
        self.task, self.source, self.seed, self.rank, self.world = task, source, seed, rank, world
        self.shuffle_rows, self.read_rows = shuffle_rows, read_rows
        self.epoch, self.offset = 0, 0
        self._buffer: deque[dict] = deque()
        self._pass: Iterator[pa.Table] | None = None

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self._buffer:
                self._fill()
            out.append(self._buffer.popleft())
            self.offset += 1
        return out

    def position(self) -> list[int]:
        return [self.epoch, self.offset]

    def close(self) -> None:
        """Stop the pass in flight (its Ray Data execution) now, not at interpreter exit."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def seek(self, position: list[int]) -> None:
        """Resume at `position`: start that epoch's pass again and skip the rows already taken."""
        self.epoch, self._pass, self._buffer = int(position[0]), None, deque()
        self.offset = 0
        self.take(int(position[1]))

    def _fill(self) -> None:
        while True:
            if self._pass is None:
                self._pass = self._batches()
            for batch in self._pass:
                if batch.num_rows:
                    self._buffer.extend(batch.to_pylist())
                    return
            if self.offset == 0:
                raise StageInputError(
                    f"task '{self.task}' has no training rows on worker {self.rank} of {self.world}",
                    fix="use fewer workers (scaling.num_workers) or more data for this task",
                )
            self.epoch, self.offset, self._pass = self.epoch + 1, 0, None

    def _batches(self) -> Iterator[pa.Table]:
        seed = _seed(self.seed, self.task, self.epoch, self.rank) % 2**32
        for batch in self.source.iter_batches(batch_size=self.read_rows, batch_format="pyarrow",
                                              local_shuffle_buffer_size=self.shuffle_rows, local_shuffle_seed=seed):
            if not isinstance(batch, pa.Table):
                batch = pa.Table.from_pydict(batch)
            check_finite(batch, f"the training rows of task '{self.task}'")
            if self.world > 1:
                batch = batch.filter(pa.array(in_shard(batch["example_id"].to_pylist(), self.rank, self.world)))
            yield batch


def draw_batch(streams: list[ShardStream], labels: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Examples for one step's task labels, grouped by task (stable), with their task indices."""
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    examples: list[dict] = []
    for i, stream in enumerate(streams):
        examples += stream.take(int(np.sum(labels == i)))
    return examples, labels
