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
from .records import REQUIRED, LongInteger, MAX_INT_DIGITS, Record, field_value, quote, validate_rows

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as spreadsheets write it: skipped


def _decode_lines(path: str, raw: bytes) -> list[str]:
    skip = len(BOM) if raw.startswith(BOM) else 0
    lines = raw[skip:].split(b"\n")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            column = exc.start + 1 + (skip if n == 1 else 0)
            raise UnlearnError(f"{path}:{n}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {column})") from None
    return out


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped (`--ids-file`, `--owners-file`)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UnlearnError(f"{path}: {exc.strerror}") from None
    return [line.strip() for line in _decode_lines(path, raw) if line.strip()]


class _DuplicateKey(Exception):
    pass


def _object(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _integer(literal: str):
    return LongInteger(literal) if len(literal.lstrip("-")) > MAX_INT_DIGITS else int(literal)


def parse_json_line(line: str, where: str):
    """One JSON value, strictly: duplicate keys, integers too long to be ids and nesting
    deeper than Python's recursion limit are one-line errors naming `where`."""
    try:
        return json.loads(line, object_pairs_hook=_object, parse_int=_integer)
    except json.JSONDecodeError as exc:
        raise UnlearnError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except _DuplicateKey as exc:
        raise UnlearnError(f"{where}: duplicate key {quote(exc.args[0])} in a JSON object") from None
    except RecursionError:
        raise UnlearnError(f"{where}: JSON nested too deeply") from None


def _jsonl_rows(path: str, raw: bytes) -> Iterator[tuple[dict, str]]:
    for n, line in enumerate(_decode_lines(path, raw), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        row = parse_json_line(line, where)
        if not isinstance(row, dict):
            kind = "int" if isinstance(row, LongInteger) else type(row).__name__
            raise UnlearnError(f"{where}: expected a JSON object, got {kind}")
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
    return _parquet_dicts(path, table, (*REQUIRED, "owner"))


def _parquet_dicts(path: str, table, names: tuple[str, ...]) -> Iterator[tuple[dict, str]]:
    """Rows of the named columns; a string that is not valid UTF-8 is named by row and field."""
    columns = {}
    for name in names:
        if name not in table.column_names:
            continue
        column = table.column(name)
        try:
            columns[name] = column.to_pylist()
        except UnicodeDecodeError:
            for n in range(len(column)):
                try:
                    column[n].as_py()
                except UnicodeDecodeError as exc:
                    raise UnlearnError(f"{path}: row {n + 1}: field '{name}' is not valid UTF-8 "
                                       f"(byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})") from None
            raise UnlearnError(f"{path}: column '{name}' is not valid UTF-8") from None
    for n in range(table.num_rows):
        yield {name: values[n] for name, values in columns.items()}, f"{path}: row {n + 1}"


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
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise UnlearnError(f"{path}:1: missing column 'text' in the header")
        for row in reader:
            yield row, f"{path}:{reader.line_num}"
    except csv.Error as exc:
        raise UnlearnError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


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
    return _parquet_dicts(path, table, ("text",))
