"""Reading records and texts from files (JSONL, CSV, Parquet, plain text) or named data sets.

Kept apart from `records` (what a record is and how it is validated) so that the data set
loaders, which build records, and this module, which can return a data set, never import
each other.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Iterator

from .errors import UnlearnError
from .records import REQUIRED, Record, field_value, validate_rows


def _decode_lines(path: str, raw: bytes) -> list[str]:
    lines = raw.split(b"\n")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UnlearnError(
                f"{path}:{n}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
            ) from None
    return out


def _jsonl_rows(path: str, raw: bytes) -> Iterator[tuple[dict, str]]:
    for n, line in enumerate(_decode_lines(path, raw), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UnlearnError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UnlearnError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield row, where


def _csv_rows(path: str, raw: bytes) -> Iterator[tuple[dict, str]]:
    text = "\n".join(_decode_lines(path, raw))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise UnlearnError(f"{path}:1: empty file, expected a header with {', '.join(REQUIRED)}") from None
    except csv.Error as exc:
        raise UnlearnError(f"{path}:1: malformed CSV ({exc})") from None
    for name in REQUIRED:
        if name not in header:
            raise UnlearnError(f"{path}:1: missing column '{name}' in the header")
    try:
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if not fields:
                continue
            if len(fields) != len(header):
                raise UnlearnError(f"{where}: malformed CSV row: {len(fields)} fields, header has {len(header)}")
            yield dict(zip(header, fields)), where
    except csv.Error as exc:
        raise UnlearnError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _parquet_rows(path: str) -> Iterator[tuple[dict, str]]:
    table = _read_parquet(path)
    for name in REQUIRED:
        if name not in table.column_names:
            raise UnlearnError(f"{path}: missing column '{name}'")
    for n, row in enumerate(table.to_pylist(), 1):
        yield row, f"{path}: row {n}"


def load_records(spec: str) -> list[Record]:
    """Records from a JSONL, CSV or Parquet file, or a named data set (`dataset:NAME`)."""
    if spec.startswith("dataset:"):
        from .datasets import load_dataset

        return load_dataset(spec)
    if not os.path.exists(spec):
        raise UnlearnError(f"{spec}: no such file")
    if os.path.isdir(spec):
        raise UnlearnError(f"{spec}: is a directory, expected a .jsonl, .csv or .parquet file")
    ext = os.path.splitext(spec)[1].lower()
    if ext == ".parquet":
        records = validate_rows(_parquet_rows(spec))
    else:
        with open(spec, "rb") as f:
            raw = f.read()
        if ext in (".jsonl", ".json", ".ndjson"):
            records = validate_rows(_jsonl_rows(spec, raw))
        elif ext == ".csv":
            records = validate_rows(_csv_rows(spec, raw))
        else:
            raise UnlearnError(f"{spec}: unknown file type {ext or '(none)'!r}; use .jsonl, .csv or .parquet")
    if not records:
        raise UnlearnError(f"{spec}: no records")
    return records


def load_texts(spec: str) -> list[str]:
    """Texts to predict: a .txt file or '-' for stdin (one per line), or JSONL/CSV/Parquet with a 'text' field."""
    if spec == "-":
        import sys

        texts = [line for line in _decode_lines("<stdin>", sys.stdin.buffer.read()) if line.strip()]
        if not texts:
            raise UnlearnError("<stdin>: no texts")
        return texts
    if not os.path.exists(spec):
        raise UnlearnError(f"{spec}: no such file")
    ext = os.path.splitext(spec)[1].lower()
    if ext == ".parquet":
        rows = _parquet_rows_text(spec)
    else:
        with open(spec, "rb") as f:
            raw = f.read()
        if ext == ".txt":
            texts = [line for line in _decode_lines(spec, raw) if line.strip()]
            if not texts:
                raise UnlearnError(f"{spec}: no texts")
            return texts
        if ext in (".jsonl", ".json", ".ndjson"):
            rows = _jsonl_rows(spec, raw)
        elif ext == ".csv":
            rows = _csv_text_rows(spec, raw)
        else:
            raise UnlearnError(f"{spec}: unknown file type {ext or '(none)'!r}; use .txt, .jsonl, .csv or .parquet")
    texts = [field_value(row, "text", where) for row, where in rows]
    if not texts:
        raise UnlearnError(f"{spec}: no texts")
    return texts


def _csv_text_rows(path: str, raw: bytes) -> Iterator[tuple[dict, str]]:
    text = "\n".join(_decode_lines(path, raw))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise UnlearnError(f"{path}:1: missing column 'text' in the header")
    for row in reader:
        yield row, f"{path}:{reader.line_num}"


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UnlearnError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _parquet_rows_text(path: str) -> Iterator[tuple[dict, str]]:
    table = _read_parquet(path)
    if "text" not in table.column_names:
        raise UnlearnError(f"{path}: missing column 'text'")
    for n, row in enumerate(table.to_pylist(), 1):
        yield row, f"{path}: row {n}"
