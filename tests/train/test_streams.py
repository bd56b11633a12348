"""Training rows stream from Ray Data shards (issue 19): disjoint per worker, reshuffled per epoch,
pulled as steps ask, and replayed exactly from a saved position."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ama_ray.errors import StageInputError
from ama_ray.train.data import ShardStream, TableSource, draw_batch, in_shard

pytestmark = pytest.mark.timeout(120)


def _table(n: int, task: str = "t") -> pa.Table:
    return pa.table({"example_id": [f"{task}{i:05d}" for i in range(n)], "value": list(range(n)),
                     "prompt_input_ids": [[i % 7 + 1] for i in range(n)]})


def _ids(rows: list[dict]) -> list[str]:
    return [r["example_id"] for r in rows]


def test_shards_are_disjoint_and_cover_the_task():
    table = _table(500)
    seen = []
    for rank in range(3):
        stream = ShardStream("t", TableSource(table), seed=0, rank=rank, world=3)
        mine = _ids(stream.take(int(in_shard(table["example_id"].to_pylist(), rank, 3).sum())))
        assert len(set(mine)) == len(mine)  # one epoch: no row twice
        seen.append(set(mine))
    assert set.union(*seen) == set(table["example_id"].to_pylist())
    assert sum(map(len, seen)) == 500 and all(len(s) > 100 for s in seen)


def test_epochs_reshuffle_and_small_tasks_cycle():
    stream = ShardStream("t", TableSource(_table(40)), seed=3)
    first, second, third = (_ids(stream.take(40)) for _ in range(3))
    assert set(first) == set(second) == set(third) and first != second != third
    assert stream.position() == [2, 40]


def test_seek_replays_exactly_what_an_uninterrupted_stream_draws():
    table = _table(300)
    straight = ShardStream("t", TableSource(table), seed=1, rank=1, world=2, read_rows=32)
    before = _ids(straight.take(217))  # crosses an epoch boundary (~150 rows a rank)
    saved = straight.position()
    after = _ids(straight.take(120))
    resumed = ShardStream("t", TableSource(table), seed=1, rank=1, world=2, read_rows=32)
    resumed.seek(saved)
    assert resumed.position() == saved and saved[0] == 1
    assert _ids(resumed.take(120)) == after  # same rows, same order


def test_a_worker_without_rows_is_a_clear_error():
    stream = ShardStream("tiny", TableSource(_table(1)), seed=0, rank=1, world=2)
    stream_other = ShardStream("tiny", TableSource(_table(1)), seed=0, rank=0, world=2)
    empty = stream if not in_shard(["t00000"], 1, 2)[0] else stream_other
    with pytest.raises(StageInputError, match="no training rows on worker"):
        empty.take(1)


def test_draw_batch_pulls_only_what_the_labels_ask_for():
    streams = [ShardStream(f"t{i}", TableSource(_table(50, f"t{i}")), seed=0) for i in range(3)]
    labels = np.array([2, 0, 2, 2, 1])
    rows, ordered = draw_batch(streams, labels)
    assert ordered.tolist() == [0, 1, 2, 2, 2] and [r["example_id"][:2] for r in rows] == ["t0", "t1", "t2", "t2", "t2"]
    assert [s.position() for s in streams] == [[0, 1], [0, 1], [0, 3]]


@pytest.mark.parametrize("task_bytes", [1, 2**20], ids=["a task per row group", "one task for the file"])
def test_a_ray_data_shard_streams_deterministically(ray_session, tmp_path, monkeypatch, task_bytes):
    """The trainer's source: a Ray Data iterator over a Parquet file read in file order."""
    from ray.data import DataContext

    from ama_ray.train import row_groups

    monkeypatch.setattr(row_groups, "READ_TASK_BYTES", task_bytes)
    from ama_ray.storage import RunDir
    from ama_ray.train.data import parquet_dataset

    unit = RunDir(str(tmp_path)).scores("t")
    unit.begin()
    pq.write_table(_table(900), unit.file(unit.split_file("train")), row_group_size=100)

    def source():
        DataContext.get_current().execution_options.preserve_order = True
        return parquet_dataset([(unit, "train")]).iterator()

    streams = [ShardStream("t", source(), seed=5, rank=0, world=2, shuffle_rows=256, read_rows=64) for _ in range(3)]
    try:
        one, two, three = streams
        first = _ids(one.take(600))  # more than one epoch of this rank's ~450 rows
        saved = one.position()
        tail = _ids(one.take(100))
        assert _ids(two.take(600)) == first
        three.seek(saved)
        assert _ids(three.take(100)) == tail
    finally:
        for stream in streams:  # stop each pass in flight: a Ray Data execution left running
            stream.close()      # past ray.shutdown() aborts the process at exit
    mine = set(i for i in _table(900)["example_id"].to_pylist() if in_shard([i], 0, 2)[0])
    assert set(first) == mine  # a whole epoch of exactly this rank's rows, then the next one


def test_read_tasks_cover_every_row_group_once_in_runs_of_about_a_megabyte():
    """Ray Data keeps every read task in the object store for the whole read: a task per ~1 MB
    of rows (never less than a row group) keeps that term small however many row groups a file has."""
    from ama_ray.train.row_groups import READ_TASK_BYTES, ParquetFileInfo, RowGroups

    small = ParquetFileInfo("a", "", None, groups=480, size=480 * READ_TASK_BYTES // 8)  # 8 row groups per MB
    wide = ParquetFileInfo("b", "", None, groups=5, size=5 * 3 * READ_TASK_BYTES)  # a row group is 3 MB
    spans = RowGroups([small, wide]).spans()
    assert [(f.path, start, n) for f, start, n in spans if f is wide] == [("b", g, 1) for g in range(5)]
    runs = [(start, n) for f, start, n in spans if f is small]
    assert len(runs) == 60 and {n for _, n in runs} == {8}
    assert [g for start, n in runs for g in range(start, start + n)] == list(range(480))
    odd = ParquetFileInfo("c", "", "tag", groups=10, size=10 * READ_TASK_BYTES // 4)
    assert [(s, n) for _, s, n in RowGroups([odd]).spans()] == [(0, 4), (4, 4), (8, 2)]


def test_output_blocks_yields_every_row_in_order_and_sends_no_iteration_stats(ray_session, tmp_path, monkeypatch):
    """The inference passes read their results with `output_blocks`: every row once, in file order,
    and none of the per-block stats `iter_batches` sends Ray Data's stats actor (they grew with the
    data read and sat in the object store: docs/performance.md section 4)."""
    from ray.data._internal import stats

    from ama_ray.storage import RunDir
    from ama_ray.train.data import TAG, output_blocks, parquet_dataset

    sent = []
    monkeypatch.setattr(stats._StatsManager, "update_iteration_metrics", staticmethod(lambda *a, **k: sent.append(a)))
    run = RunDir(str(tmp_path))
    units = [run.scores(name) for name in ("a", "b")]
    for unit in units:
        unit.begin()
        pq.write_table(_table(300, unit.path[-1]), unit.file(unit.split_file("train")), row_group_size=64)
    ds = parquet_dataset([(u, "train") for u in units], tags=["a", "b"]).map_batches(lambda t: t, batch_format="pyarrow", batch_size=50)
    ds.context.execution_options.preserve_order = True
    tables = list(output_blocks(ds))
    assert all(isinstance(t, pa.Table) for t in tables)
    ids = [i for t in tables for i in t["example_id"].to_pylist()]
    assert ids == _table(300, "a")["example_id"].to_pylist() + _table(300, "b")["example_id"].to_pylist()
    assert [tag for t in tables for tag in t[TAG].to_pylist()] == ["a"] * 300 + ["b"] * 300
    assert sent == []
