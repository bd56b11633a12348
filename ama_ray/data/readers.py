"""Read raw preference rows from local files or ``datasets.load_dataset`` specs.

Every reader yields ``(number, row)`` pairs, ``row`` a dict of column -> value, and streams:
memory does not grow with the file. ``number`` is what a user needs to find the row: the
line number for JSON lines and CSV (the line where the record starts; the CSV header is
line 1), the 1-based row index for Parquet, JSON arrays and ``load_dataset`` rows. Problems
a user can fix raise ``DataError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ama_ray.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_PARQUET_BATCH_ROWS = 1024


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line or row number, row)`` from a local .jsonl/.json/.parquet/.csv file.

    A .json file holds JSON lines or one JSON array of objects. Raises DataError at once
    for a missing, unreadable or unsupported file, and while iterating for a broken JSON
    line, a line that is not a JSON object, bytes that are not UTF-8, a malformed CSV
    record, or a file without rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type {suffix or '(none)'!r}", where=str(path),
                        fix=f"use one of {', '.join(SUFFIXES)}, or a datasets.load_dataset spec")
    if not path.exists():
        raise DataError("file not found", where=str(path),
                        fix="check the path (relative paths start at the working directory)")
    if path.is_dir():
        raise DataError("is a directory, not a file", where=str(path), fix="name one data file")
    if not os.access(path, os.R_OK):
        raise DataError("file is not readable", where=str(path), fix="check its permissions")
    if path.stat().st_size == 0:
        raise DataError("file is empty", where=str(path), fix="point to a file with rows")
    reader = {".parquet": _parquet_rows, ".csv": _csv_rows}.get(suffix, _json_rows)
    return _nonempty(reader(path), path)


def _nonempty(rows: Iterator[tuple[int, dict]], where: Path | str) -> Iterator[tuple[int, dict]]:
    count = 0
    for count, item in enumerate(rows, start=1):
        yield item
    if count == 0:
        raise DataError("holds no rows", where=str(where), fix="point to a file with rows")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, keeping line endings; a BOM is dropped."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"bytes at column {err.start + 1} are not UTF-8",
                                where=f"{path}:{number}",
                                fix="re-encode the file as UTF-8 (e.g. iconv -t UTF-8)") from None
            yield number, text


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    lines = _decoded_lines(path)
    first = True
    for number, text in lines:
        if not text.strip():
            continue
        if first and text.lstrip().startswith("["):  # one JSON array, not JSON lines
            yield from _json_array_rows(path, "\n" * (number - 1) + text + "".join(t for _, t in lines))
            return
        first = False
        try:
            row = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataError(f"broken JSON ({err.msg} at column {err.colno})", where=f"{path}:{number}",
                            fix="fix or delete that line; each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"line is a JSON {type(row).__name__}, not an object",
                            where=f"{path}:{number}", fix="write one JSON object per line")
        yield number, row


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"broken JSON ({err.msg} at column {err.colno})", where=f"{path}:{err.lineno}",
                        fix="fix the JSON array, or write one JSON object per line") from None
    if not isinstance(data, list):
        raise DataError("JSON file is neither JSON lines nor an array", where=str(path),
                        fix="write one JSON object per line")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"array element {number} is a JSON {type(row).__name__}, not an object",
                            where=str(path), fix="make every element an object")
        yield number, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    # Long responses exceed csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(text for _, text in _decoded_lines(path))
    header: list[str] | None = None
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"malformed CSV ({err})", where=f"{path}:{reader.line_num}",
                            fix="quote fields that hold commas, quotes or newlines") from None
        number, start = start, reader.line_num + 1
        if header is None:
            header = record
        elif record:  # csv yields [] for a blank line
            if len(record) != len(header):
                raise DataError(f"record has {len(record)} fields, the header {len(header)}",
                                where=f"{path}:{number}",
                                fix="quote fields that hold commas, or fix the record")
            yield number, dict(zip(header, record))


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err})", where=str(path),
                        fix="rewrite it with pyarrow or pandas .to_parquet()") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def load_hf_rows(spec: dict) -> Iterator[tuple[int, dict]]:
    """Yield ``(row number, row)`` from ``datasets.load_dataset(**spec)``.

    ``spec`` holds load_dataset's keyword arguments: ``path`` (a hub id, or a builder such
    as ``"json"``/``"parquet"``/``"csv"`` with ``data_files``), optionally ``name``,
    ``split`` (default ``"train"``), ``data_files``, ``revision``, ``streaming``,
    ``cache_dir``. Raises DataError when the dataset cannot be found, downloaded or built,
    or has no rows.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise DataError("a load_dataset spec needs a 'path' string", where=f"spec {spec!r}",
                        fix="e.g. {path: json, data_files: data/train.jsonl, split: train}")
    import datasets

    kwargs = {"split": "train", **spec}
    where = f"load_dataset({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        dataset = datasets.load_dataset(**kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise DataError(f"cannot load dataset: {type(cause).__name__}: {cause}", where=where,
                        fix="check path, data_files and split (the hub needs network access); "
                        "give a local file as data.tasks[].path to get errors that name the line") from None
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"spec selects several splits {list(dataset)}", where=where,
                        fix="set split (e.g. split: train)")
    return _nonempty(enumerate((dict(row) for row in dataset), start=1), where)
