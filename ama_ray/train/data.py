"""Per-worker task data: rows joined across stages, disjoint shards, deterministic streams.

A worker of rank r in a world of size W reads only its shard (rows r, r+W, ... of a task in
`example_id` order), so shards are disjoint. Each task's stream walks a permutation drawn from
(seed, task, epoch, rank) and starts a new epoch, reshuffled, when it runs out: small tasks
cycle. A stream's position is two integers, saved in every checkpoint, so a resumed run draws
exactly the examples an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ama_ray.errors import StageInputError
from ama_ray.storage import RunDir

ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# Every task's splits, written by prepare and covered by reference and score: validation selects
# (best checkpoints, `eval/...` during training, ASHA, Tune), test reports (evaluate, report, compare).
SPLITS = ("train", "validation", "test")
SELECT_SPLIT, REPORT_SPLIT = "validation", "test"


# stage -> what its per-task unit holds
TASK_UNITS = {"prepare": "prepared data", "reference": "reference log-probs", "score": "specialist scores"}


def require_split_unit(run: RunDir, stage: str, task: str) -> dict:
    """The manifest of a task's committed `prepare`, `reference` or `score` unit.

    StageInputError if it is missing, or if it holds the two train/eval splits of older
    versions (one line: rerun prepare with --force, which the later stages then follow).
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
    return man


def require_prepared(run: RunDir, task: str) -> dict:
    """`require_split_unit` of the task's prepared data."""
    return require_split_unit(run, "prepare", task)


def load_task_split(
    run: RunDir, task: str, split: str, *, with_scores: bool, rank: int = 0, world: int = 1, limit: int | None = None
) -> pa.Table:
    """One task's split for one worker: token ids, reference log-probs and (optionally) specialist losses.

    Raises StageInputError when an earlier stage's unit is missing or its example ids do not
    match the prepared data.
    """
    prepared = run.prepared(task)
    require_prepared(run, task)
    table = prepared.read_parquet(prepared.split_file(split), columns=["example_id", *ID_COLUMNS])
    ref = run.reference(task)
    require_split_unit(run, "reference", task)
    table = join_by_id(table, ref.read_parquet(ref.split_file(split)), ref.file(ref.split_file(split)))
    if with_scores:
        scores = run.scores(task)
        require_split_unit(run, "score", task)
        table = join_by_id(table, scores.read_parquet(scores.split_file(split), columns=["example_id", "specialist_loss"]),
                           scores.file(scores.split_file(split)))
    table = table.sort_by("example_id")
    if world > 1:
        table = table.take(pa.array(np.arange(rank, table.num_rows, world)))
    if limit is not None:
        table = table.slice(0, limit)
    return table


def join_by_id(left: pa.Table, right: pa.Table, where: str) -> pa.Table:
    """`left` with `right`'s other columns, matched by `example_id`; StageInputError when the
    two hold different ids (`where` names `right`'s file)."""
    ids_left, ids_right = set(left["example_id"].to_pylist()), set(right["example_id"].to_pylist())
    if ids_left != ids_right:
        missing = len(ids_left - ids_right)
        extra = len(ids_right - ids_left)
        raise StageInputError(
            f"example ids do not match the prepared data ({missing} missing, {extra} unknown)",
            where=where,
            fix="the data changed after this stage ran: rerun it with --force <stage>",
        )
    # Arrow's hash join refuses list columns: align both sides by sorted id instead.
    left, right = left.sort_by("example_id"), right.sort_by("example_id")
    for name in right.column_names:
        if name != "example_id":
            left = left.append_column(name, right[name])
    return left


def rows_of(table: pa.Table) -> list[dict]:
    """The table as a list of row dicts (ids as Python lists), the form `ama_ray.dpo.collate` takes."""
    return table.to_pylist()


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:16], 16)


@dataclass
class TaskStream:
    """An endless, reshuffled-per-epoch walk over one task's shard; position = (epoch, offset)."""

    task: str
    rows: list[dict]
    seed: int
    rank: int = 0
    epoch: int = 0
    offset: int = 0
    _order: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise StageInputError(
                f"task '{self.task}' has no training rows on worker {self.rank}",
                fix="use fewer workers (scaling.num_workers) or more data for this task",
            )

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng(_seed(self.seed, self.task, self.epoch, self.rank))
            self._order = rng.permutation(len(self.rows))
        return self._order

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            if self.offset >= len(self.rows):
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
            out.append(self.rows[self._permutation()[self.offset]])
            self.offset += 1
        return out

    def position(self) -> list[int]:
        return [self.epoch, self.offset]

    def seek(self, position: list[int]) -> None:
        self.epoch, self.offset = int(position[0]), int(position[1])
        self._order = None


def draw_batch(streams: list[TaskStream], labels: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Examples for one step's task labels, grouped by task (stable), with their task indices."""
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    examples: list[dict] = []
    for i, stream in enumerate(streams):
        examples += stream.take(int(np.sum(labels == i)))
    return examples, labels


def bucket_by_length(table: pa.Table) -> pa.Table:
    """Rows sorted by total token length, so inference batches carry little padding."""
    lengths = pc.add(
        pc.list_value_length(table["prompt_input_ids"]),
        pc.max_element_wise(pc.list_value_length(table["chosen_input_ids"]), pc.list_value_length(table["rejected_input_ids"])),
    )
    return table.take(pc.sort_indices(lengths))
