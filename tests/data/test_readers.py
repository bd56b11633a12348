"""Readers of local JSONL/JSON/Parquet/CSV files and load_dataset specs: rows, numbers, errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ama_ray.data import readers
from ama_ray.data.readers import load_hf_rows, read_rows
from ama_ray.errors import DataError

ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2, with comma", "chosen": "c2\nsecond line", "rejected": "r2 \"quoted\""},
    {"prompt": "p3 é", "chosen": "c3", "rejected": "r3"},
]


def write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, blank_after_first=True)
    assert list(read_rows(path)) == [(1, ROWS[0]), (3, ROWS[1]), (4, ROWS[2])]


def test_json_holds_json_lines_or_an_array(tmp_path):
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert list(read_rows(lines)) == list(enumerate(ROWS, start=1))
    assert list(read_rows(array)) == list(enumerate(ROWS, start=1))


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert list(read_rows(path)) == [(1, ROWS[0])]


def test_parquet_rows_keep_nested_messages(tmp_path):
    rows = [{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "n": i} for i in range(2500)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = list(read_rows(path))
    assert [n for n, _ in got] == list(range(1, 2501))  # numbering runs across batches
    assert [r for _, r in got] == rows


def test_csv_numbers_records_by_starting_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'prompt,chosen,rejected\n'
        'p1,c1,r1\n'
        '"p2, with comma","c2\nsecond line","r2 ""quoted"""\n'
        '\n'
        'p3 é,c3,r3\n',
        encoding="utf-8",
    )
    assert list(read_rows(path)) == [(2, ROWS[0]), (3, ROWS[1]), (6, ROWS[2])]


def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"prompt\": \"p3\",\n", encoding="utf-8")
    rows = read_rows(path)
    assert next(rows) == (1, ROWS[0])
    with pytest.raises(DataError, match=rf"{path}:3: broken JSON"):
        list(rows)


def test_broken_json_array_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: broken JSON"):
        list(read_rows(path))


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\"just a string\"\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: line is a JSON str, not an object"):
        list(read_rows(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes_name_the_line(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    first = json.dumps(ROWS[0]) if suffix == ".jsonl" else "prompt,chosen,rejected"
    path.write_bytes(first.encode() + b"\n" + "caf\u00e9".encode("latin-1") + b",x,y\n")
    with pytest.raises(DataError, match=rf"{path}:2: bytes at column 4 are not UTF-8.*UTF-8"):
        list(read_rows(path))


def test_file_level_errors_are_raised_at_once(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_rows(tmp_path / "dir.jsonl")
    path = write_jsonl(tmp_path / "locked.jsonl", ROWS)
    # Permission bits do not stop root, so stand in for an unreadable file.
    monkeypatch.setattr(readers.os, "access", lambda p, mode: False)
    with pytest.raises(DataError, match="not readable.*permissions"):
        read_rows(path)


@pytest.mark.parametrize(
    "name, content",
    [("blank.jsonl", "\n\n  \n"), ("header.csv", "prompt,chosen,rejected\n")],
)
def test_files_without_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"{name}: holds no rows"):
        list(read_rows(path))


def test_malformed_csv_and_parquet(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\np1,c1,r1\np2,c2,r2,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: record has 4 fields, the header 3"):
        list(read_rows(path))
    fake = tmp_path / "d.parquet"
    fake.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_rows(fake))


def test_load_hf_rows_reads_local_files_like_read_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = {"path": "json", "data_files": str(path), "cache_dir": str(tmp_path / "cache")}
    assert list(load_hf_rows(spec)) == list(read_rows(path))


def test_load_hf_rows_errors(tmp_path):
    with pytest.raises(DataError, match="needs a 'path'"):
        load_hf_rows({"data_files": "x.jsonl"})
    with pytest.raises(DataError, match="cannot load dataset"):
        load_hf_rows({"path": "json", "data_files": str(tmp_path / "missing.jsonl"), "cache_dir": str(tmp_path)})
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="several splits.*set split"):
        load_hf_rows({"path": "json", "data_files": str(path), "split": None, "cache_dir": str(tmp_path)})
