"""Training records and their validation.

Every input is checked completely before anything is written, and each problem is
reported as one line naming the file, the line (or Parquet row) and the field.
Values quoted in messages are JSON-encoded with non-ASCII escaped, so an error
line never carries raw control characters or invalid bytes to the terminal.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import UnlearnError

REQUIRED = ("id", "text", "label")
MAX_ID_LENGTH = 256


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    label: str
    owner: str

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "label": self.label, "owner": self.owner}


def quote(value: object) -> str:
    return json.dumps(value, ensure_ascii=True)


def id_problem(value: str) -> str | None:
    """Why `value` is unsafe as part of a storage key, or None if it is safe."""
    if value in (".", ".."):
        return "is a relative path component"
    if ".." in value:
        return "contains '..'"
    for sep in ("/", "\\"):
        if sep in value:
            return f"contains the path separator {sep!r}"
    control = _control_char(value)
    if control:
        return control
    if value != value.strip():
        return "has leading or trailing whitespace"
    if len(value) > MAX_ID_LENGTH:
        return f"is longer than {MAX_ID_LENGTH} characters"
    return None


def _control_char(value: str) -> str | None:
    for ch in value:
        if ord(ch) < 32 or ord(ch) == 127 or 0x80 <= ord(ch) < 0xA0 or ch in "\u2028\u2029":
            return f"contains the control character U+{ord(ch):04X}"
    return None


def owner_problem(value: str) -> str | None:
    """Owners are hashed, never used as keys, but must survive `--owners a,b` on a command line."""
    if "," in value:
        return "contains a comma (owners are given comma-separated to delete)"
    control = _control_char(value)
    if control:
        return control
    if value != value.strip():
        return "has leading or trailing whitespace"
    return None


def _field(row: dict, name: str, where: str, *, required: bool = True) -> str | None:
    if name not in row or row[name] is None:
        if required:
            raise UnlearnError(f"{where}: missing field '{name}'")
        return None
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UnlearnError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise UnlearnError(f"{where}: field '{name}' is empty")
    return value


def record_from_row(row: dict, where: str) -> Record:
    """Validate one row (a dict from JSON, CSV or Parquet) into a Record."""
    rid = _field(row, "id", where)
    problem = id_problem(rid)
    if problem:
        raise UnlearnError(f"{where}: field 'id' {problem}: {quote(rid)} is unsafe as a storage key")
    text = _field(row, "text", where)
    label = _field(row, "label", where)
    owner = _field(row, "owner", where, required=False)
    if owner is None:
        owner = rid
    else:
        problem = owner_problem(owner)
        if problem:
            raise UnlearnError(f"{where}: field 'owner' {problem}: {quote(owner)}")
    return Record(rid, text, label, owner)


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


def validate_rows(rows: Iterable[tuple[dict, str]]) -> list[Record]:
    """Validate rows and reject duplicate ids (naming both places)."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for row, where in rows:
        rec = record_from_row(row, where)
        if rec.id in seen:
            raise UnlearnError(f"{where}: field 'id': duplicate id {quote(rec.id)} (first at {seen[rec.id]})")
        seen[rec.id] = where
        records.append(rec)
    return records


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
    texts = [_field(row, "text", where) for row, where in rows]
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
