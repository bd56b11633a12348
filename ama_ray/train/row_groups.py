"""A Ray Data datasource over Parquet row groups: each read task reads a run of consecutive row
groups of one file (about READ_TASK_BYTES of them, at least one), in file order
(`ama_ray.train.data.parquet_dataset` builds it; the reason it is not `ray.data.read_parquet` is
there).

It holds the files, not their row groups, so what a dataset's plan carries does not grow with
the data, and nothing reaches the object store before a read task runs. Ray Data keeps every read
task in the object store for the whole read (`ray.put` in its read planner), ~0.5 KB each: with a
task per row group that was a term growing with the number of row groups (1,440 of them at 1.5 M
short rows: +1.4 MB on a 2.7 MB level, docs/performance.md section 4). A task per ~1 MB of rows
bounds that term to ~0.05% of the bytes read, and a task's run (<= READ_TASK_BYTES or one row
group) bounds what a running task can put ahead of the read budget. The reader before that
(`ray.data.from_items` of one item per row group) kept ~1 KB per row group as well.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ama_ray.train.data import TAG



@dataclass(frozen=True)
class ParquetFileInfo:
    """One file to read: where, its tag (None: no tag column), and its footer's counts."""

    path: str
    uri: str  # the run's object-store URI ("" for a local run)
    tag: str | None
    groups: int
    size: int  # uncompressed bytes of all row groups


READ_TASK_BYTES = 2**20  # (uncompressed) rows one read task reads, in whole row groups, at least one


class RowGroups(Datasource):
    """Read tasks over runs of consecutive row groups of each file, in file order; a read task
    asks for no CPU and yields its row groups one table at a time."""

    def __init__(self, files: list[ParquetFileInfo], drop: tuple[str, ...] = ()):
        self.files, self.drop = list(files), tuple(drop)

    def spans(self) -> list[tuple[ParquetFileInfo, int, int]]:
        """(file, first row group, row groups) of each read task: runs of about READ_TASK_BYTES."""
        out = []
        for info in self.files:
            run = max(1, READ_TASK_BYTES * info.groups // max(1, info.size))
            out += [(info, start, min(run, info.groups - start)) for start in range(0, info.groups, run)]
        return out

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for info, start, count in self.spans():
            # A module-level function, not a closure: Ray Data keeps every read task in the
            # object store for the whole read, and a pickled closure is twice the size.
            meta = BlockMetadata(num_rows=None, size_bytes=info.size * count // max(1, info.groups), exec_stats=None)
            tasks.append(ReadTask(functools.partial(_run_of_groups, info, start, count, self.drop), meta))
        return tasks


def _run_of_groups(info: ParquetFileInfo, start: int, count: int, drop: tuple[str, ...]) -> Iterator[pa.Table]:
    parquet = _open(info)  # once per run, not per row group (a remote file system is a connection)
    for group in range(start, start + count):
        yield read_row_group(info, group, drop, parquet)


def _open(info: ParquetFileInfo):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = pafs.FileSystem.from_uri(info.uri)[0] if info.uri else pafs.LocalFileSystem()
    return pq.ParquetFile(info.path, filesystem=fs)


def read_row_group(info: ParquetFileInfo, group: int, drop: tuple[str, ...] = (), parquet=None) -> pa.Table:
    part = (parquet or _open(info)).read_row_group(group)
    part = part.drop_columns([c for c in drop if c in part.column_names])
    if info.tag is not None:
        part = part.append_column(TAG, pa.array([info.tag] * part.num_rows, pa.string()))
    return part
