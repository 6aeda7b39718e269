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
import stat
from typing import BinaryIO, Iterator

from .errors import UnlearnError
from .records import REQUIRED, LongInteger, MAX_INT_DIGITS, Record, field_value, quote, shown_path, validate_rows

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as spreadsheets write it: skipped
MAX_FILE_BYTES = 2 << 30  # 2 GiB: an input file (or stdin) larger than this is refused
MAX_LINE_BYTES = 16 << 20  # 16 MiB: so is a line longer than this
RECORD_TYPES = (".jsonl", ".json", ".ndjson", ".csv", ".parquet")
TEXT_TYPES = (".txt", *RECORD_TYPES)


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _input_file(path: str, types: tuple[str, ...]) -> str:
    """Check, before anything is read, that `path` is a regular file of at most
    MAX_FILE_BYTES (a device such as /dev/zero would never end) whose extension is one of
    `types` (empty: any); returns the extension, lower case."""
    shown = shown_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnlearnError(f"{shown}: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL
        raise UnlearnError(f"{shown}: {getattr(exc, 'strerror', None) or exc}") from None
    ext = os.path.splitext(path)[1].lower()
    if stat.S_ISDIR(st.st_mode) and types:
        raise UnlearnError(f"{shown}: is a directory, expected a {', '.join(types[:-1])} or {types[-1]} file")
    if types and ext not in types:
        raise UnlearnError(f"{shown}: unknown file type {ext or '(none)'!r}; "
                           f"use {', '.join(types[:-1])} or {types[-1]}")
    if not stat.S_ISREG(st.st_mode):
        raise UnlearnError(f"{shown}: {_kind(st.st_mode)}, expected a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise UnlearnError(f"{shown}: {st.st_size} bytes, over the limit of {_size(MAX_FILE_BYTES)} for an input file")
    return ext


def _read_bounded(shown: str, f: BinaryIO) -> bytes:
    """All of `f`, read in chunks: more than MAX_FILE_BYTES in all, or a line longer than
    MAX_LINE_BYTES, is refused as soon as it is seen (memory stays bounded by the limit,
    also for a pipe or a file that grows while it is read)."""
    chunk_size = min(1 << 20, MAX_LINE_BYTES)  # a line inside one chunk is shorter than the limit
    chunks, total, line, newlines = [], 0, 0, 0  # line: bytes of the current line so far
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_FILE_BYTES:
            raise UnlearnError(f"{shown}: over the limit of {_size(MAX_FILE_BYTES)} for an input file")
        first = chunk.find(b"\n")
        line += len(chunk) if first < 0 else first
        if line > MAX_LINE_BYTES:
            raise UnlearnError(f"{shown}:{newlines + 1}: line longer than the limit of {_size(MAX_LINE_BYTES)}")
        if first >= 0:
            newlines += chunk.count(b"\n")
            line = len(chunk) - chunk.rfind(b"\n") - 1
        chunks.append(chunk)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return _read_bounded(shown_path(path), f)
    except OSError as exc:
        raise UnlearnError(f"{shown_path(path)}: {exc.strerror}") from None


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
    _input_file(path, ())
    return [line.strip() for line in _decode_lines(shown_path(path), _read_file(path)) if line.strip()]


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
            raise UnlearnError(f"{shown_path(path)}: missing column '{name}'")
    return _parquet_dicts(shown_path(path), table, (*REQUIRED, "owner"))


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
    ext = _input_file(spec, RECORD_TYPES)
    shown = shown_path(spec)
    if ext == ".parquet":
        records = validate_rows(_parquet_rows(spec))
    elif ext == ".csv":
        records = validate_rows(_csv_rows(shown, _read_file(spec)))
    else:
        records = validate_rows(_jsonl_rows(shown, _read_file(spec)))
    if not records:
        raise UnlearnError(f"{shown}: no records")
    return records


def load_texts(spec: str, fields: tuple[str, ...] = ("text",)) -> list[str]:
    """Texts to predict: a .txt file or '-' for stdin (one per line), or JSONL/CSV/Parquet
    with a 'text' field (or the first of `fields` a row has: generate also takes 'prompt')."""
    if spec == "-":
        import sys

        texts = [line for line in _decode_lines("<stdin>", _read_bounded("<stdin>", sys.stdin.buffer)) if line.strip()]
        if not texts:
            raise UnlearnError("<stdin>: no texts")
        return texts
    ext = _input_file(spec, TEXT_TYPES)
    shown = shown_path(spec)
    if ext == ".parquet":
        rows = _parquet_rows_text(spec, fields)
    elif ext == ".txt":
        rows = ((line, None) for line in _decode_lines(shown, _read_file(spec)) if line.strip())
    elif ext == ".csv":
        rows = _csv_text_rows(shown, _read_file(spec), fields)
    else:
        rows = _jsonl_rows(shown, _read_file(spec))
    texts = [row if where is None else field_value(row, next((f for f in fields if f in row), fields[0]), where)
             for row, where in rows]
    if not texts:
        raise UnlearnError(f"{shown}: no texts")
    return texts


def _csv_text_rows(path: str, raw: bytes, fields: tuple[str, ...] = ("text",)) -> Iterator[tuple[dict, str]]:
    text = "\n".join(_decode_lines(path, raw))
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        if reader.fieldnames is None or not set(fields) & set(reader.fieldnames):
            raise UnlearnError(f"{path}:1: missing column {' or '.join(repr(f) for f in fields)} in the header")
        for row in reader:
            yield row, f"{path}:{reader.line_num}"
    except csv.Error as exc:
        raise UnlearnError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        why = (str(exc).splitlines() or [type(exc).__name__])[0].replace(path, shown_path(path))
        raise UnlearnError(f"{shown_path(path)}: not a readable Parquet file ({why if why.isprintable() else quote(why)})") from None


def _parquet_rows_text(path: str, fields: tuple[str, ...] = ("text",)) -> Iterator[tuple[dict, str]]:
    table = _read_parquet(path)
    have = [f for f in fields if f in table.column_names]
    if not have:
        raise UnlearnError(f"{shown_path(path)}: missing column {' or '.join(repr(f) for f in fields)}")
    return _parquet_dicts(shown_path(path), table, (have[0],))
