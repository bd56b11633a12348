"""`storage.SplitWriters`: the one writer of split files in exact row groups (prepare, reference, score)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ama_ray.storage import ROW_GROUP_ROWS, RunDir, SplitWriters


def _rows(start: int, n: int) -> pa.Table:
    return pa.table({"example_id": [f"{i:06d}" for i in range(start, start + n)], "x": pa.array(range(start, start + n), pa.float32())})


def test_exact_row_groups_whatever_the_pieces(tmp_path):
    unit = RunDir(str(tmp_path / "run")).prepared("t")
    unit.begin()
    seen = []
    sizes = [700, 700, 1, 1500, 300]  # 3201 rows in pieces that straddle the row groups
    with SplitWriters({"a": (unit, "train"), "b": (unit, "test")}, check=lambda key, t: seen.append((key, t.num_rows))) as w:
        start = 0
        for n in sizes:
            w.add("a", _rows(start, n))
            start += n
    meta = pq.ParquetFile(unit.file(unit.split_file("train"))).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [ROW_GROUP_ROWS] * 3 + [3201 - 3 * ROW_GROUP_ROWS]
    assert pq.read_table(unit.file(unit.split_file("train")))["x"].to_pylist() == list(range(3201))  # order kept
    assert w.written == {"a": 3201, "b": 0} and sum(n for _, n in seen) == 3201 and {k for k, _ in seen} == {"a"}
    assert not unit.fs.get_file_info(unit.file(unit.split_file("test"))).is_file  # no schema, no rows: not written


def test_a_refused_group_and_an_error_write_nothing_more(tmp_path):
    import math

    unit = RunDir(str(tmp_path / "run")).prepared("t")
    unit.begin()

    def refuse(key, table):
        if any(math.isnan(v) for v in table["x"].to_pylist()):
            raise ValueError("not finite")

    bad = _rows(2 * ROW_GROUP_ROWS, 5).set_column(1, "x", pa.array([1.0, float("nan"), 1.0, 1.0, 1.0], pa.float32()))
    with pytest.raises(ValueError, match="not finite"):
        with SplitWriters({"a": (unit, "train")}, schema=_rows(0, 1).schema, check=refuse) as w:
            w.add("a", _rows(0, 2 * ROW_GROUP_ROWS))
            w.add("a", bad)  # the last, short group: refused when it is flushed
    assert w.written == {"a": 2 * ROW_GROUP_ROWS}
    assert pq.read_table(unit.file(unit.split_file("train"))).num_rows == 2 * ROW_GROUP_ROWS
    with pytest.raises(RuntimeError):
        with SplitWriters({"a": (unit, "validation")}, schema=_rows(0, 1).schema) as w:
            w.add("a", _rows(0, 10))
            raise RuntimeError("crash")
    assert pq.read_table(unit.file(unit.split_file("validation"))).num_rows == 0  # pending rows not flushed
