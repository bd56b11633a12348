"""A Ray Data datasource over Parquet row groups: one read task, and one block, per row group of
each file, in file order (`ama_ray.train.data.parquet_dataset` builds it; the reason it is not
`ray.data.read_parquet` is there).

It holds the files, not their row groups, so what a dataset's plan carries does not grow with
the data, and nothing reaches the object store before a read task runs. The reader it replaced
(`ray.data.from_items` of one item per row group, then `map_batches`) kept every item in the
object store for the whole read, ~1 KB per row group: at 1.5 M rows the store's level during
training grew 2.9x from 50 k rows (benchmarks/growth.py, docs/performance.md).
"""

from __future__ import annotations

import functools
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
    """One read task per row group of each file, in file order; a read task asks for no CPU."""

    def __init__(self, files: list[ParquetFileInfo], drop: tuple[str, ...] = ()):
        self.files, self.drop = list(files), tuple(drop)

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for info in self.files:
            for group in range(info.groups):
                # A module-level function, not a closure: Ray Data keeps every read task in the
                # object store for the whole read, and a pickled lambda is ~1 KB, this ~0.3 KB.
                meta = BlockMetadata(num_rows=None, size_bytes=info.size // max(1, info.groups), exec_stats=None)
                tasks.append(ReadTask(functools.partial(_one_block, info, group, self.drop), meta))
        return tasks


def _one_block(info: ParquetFileInfo, group: int, drop: tuple[str, ...]) -> list[pa.Table]:
    return [read_row_group(info, group, drop)]


def read_row_group(info: ParquetFileInfo, group: int, drop: tuple[str, ...] = ()) -> pa.Table:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = pafs.FileSystem.from_uri(info.uri)[0] if info.uri else pafs.LocalFileSystem()
    part = pq.ParquetFile(info.path, filesystem=fs).read_row_group(group)
    part = part.drop_columns([c for c in drop if c in part.column_names])
    if info.tag is not None:
        part = part.append_column(TAG, pa.array([info.tag] * part.num_rows, pa.string()))
    return part
