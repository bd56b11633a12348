"""A Ray Data datasource over Parquet row groups: one read task per file, yielding its row groups
one table at a time, in file order (`ama_ray.train.data.parquet_dataset` builds it; the reason it
is not `ray.data.read_parquet` is there).

It holds the files, not their row groups, so nothing a read plans grows with the data. Ray Data
keeps every read task in the object store for the whole read (`ray.put` in its read planner),
~0.5 KB each: a task per row group (1,440 of them at 1.5 M short rows) and then a task per ~1 MB
of rows both left a term in the store that grew with the data (docs/performance.md section 4).
With a task per file the store's level during a pass is the same at 1x and 30x (24 KB). What a
running task may read ahead is bounded by Ray Data's streaming-generator buffer (two blocks per
task) and the dataset's read budget, not by the file: blocks are one row group each
(`target_max_block_size`).
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


class RowGroups(Datasource):
    """One read task per file (none for a file without row groups), in file order; a read task
    asks for no CPU and yields its row groups one table at a time."""

    def __init__(self, files: list[ParquetFileInfo], drop: tuple[str, ...] = ()):
        self.files, self.drop = list(files), tuple(drop)

    def spans(self) -> list[tuple[ParquetFileInfo, int, int]]:
        """(file, first row group, row groups) of each read task: a file's whole run."""
        return [(info, 0, info.groups) for info in self.files if info.groups]

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
