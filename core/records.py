"""Training records and their validation.

Every input is checked completely before anything is written, and each problem is
reported as one line naming the file, the line (or Parquet row) and the field.
Values quoted in messages are JSON-encoded with non-ASCII escaped, so an error
line never carries raw control characters or invalid bytes to the terminal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import UnlearnError

REQUIRED = ("id", "text", "label")
MAX_ID_LENGTH = 256
MAX_INT_DIGITS = 20  # integer ids and labels: up to 64-bit values; longer ones must be strings
QUOTE_LIMIT = 120  # longer values are cut in messages, which stay one readable line


@dataclass(frozen=True)
class Record:
    """One training record, of one of two forms:
    - labelled (`id, text, label[, owner]`): what classifiers, ERASE and SISA-LM's
      labelled runs learn;
    - prompt/completion (`id, prompt, completion[, owner]`): a causal LM learns to continue
      `prompt` (kept in `text`) with `completion`; `label` is then "" (no label)."""
    id: str
    text: str
    label: str
    owner: str
    completion: str | None = None

    @property
    def form(self) -> str:
        return "text/label" if self.completion is None else "prompt/completion"

    def to_json(self) -> dict:
        out = {"id": self.id, "text": self.text, "label": self.label, "owner": self.owner}
        if self.completion is not None:  # labelled records keep the bytes (and addresses) they always had
            out["completion"] = self.completion
        return out


class LongInteger:
    """A JSON integer literal longer than MAX_INT_DIGITS, kept unconverted (Python refuses
    to convert integers of more than 4300 digits, and no id needs more than 20)."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))


def quote(value: object) -> str:
    """`value` JSON-encoded with non-ASCII escaped; a long string is cut, with its length."""
    if isinstance(value, str) and len(value) > QUOTE_LIMIT:
        return json.dumps(value[:QUOTE_LIMIT - 20], ensure_ascii=True) + f"... ({len(value)} characters)"
    return json.dumps(value, ensure_ascii=True)


def shown_path(path: str) -> str:
    """A user-given path as a message shows it: as is when printable, else JSON-quoted with
    escapes (`"a\\u001b[31m.jsonl"`), so that no control character reaches the terminal."""
    return path if path.isprintable() else quote(path)


def unencodable(value: str) -> str | None:
    """Why `value` cannot be written as UTF-8 (a lone surrogate, as JSON's "\\ud800" or a
    command line's undecodable bytes give), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate U+{ord(value[exc.start]):04X} (not valid Unicode; it cannot be stored as UTF-8)"
    return None


def id_problem(value: str) -> str | None:
    """Why `value` is unsafe as part of a storage key, or None if it is safe."""
    bad = unencodable(value)
    if bad:
        return bad
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
    bad = unencodable(value)
    if bad:
        return bad
    if "," in value:
        return "contains a comma (owners are given comma-separated to delete)"
    control = _control_char(value)
    if control:
        return control
    if value != value.strip():
        return "has leading or trailing whitespace"
    return None


def field_value(row: dict, name: str, where: str, *, required: bool = True) -> str | None:
    if name not in row or row[name] is None:
        if required:
            raise UnlearnError(f"{where}: missing field '{name}'")
        return None
    value = row[name]
    if isinstance(value, LongInteger) or (type(value) is int and abs(value) >= 10 ** MAX_INT_DIGITS):
        digits = value.digits if isinstance(value, LongInteger) else f"more than {MAX_INT_DIGITS}"
        raise UnlearnError(f"{where}: field '{name}' is an integer of {digits} digits; integers may have at most "
                           f"{MAX_INT_DIGITS} digits (give longer values as strings)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UnlearnError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise UnlearnError(f"{where}: field '{name}' is empty")
    bad = unencodable(value)
    if bad:
        raise UnlearnError(f"{where}: field '{name}' {bad}")
    return value


def record_from_row(row: dict, where: str) -> Record:
    """Validate one row (a dict from JSON, CSV or Parquet) into a Record."""
    rid = field_value(row, "id", where)
    problem = id_problem(rid)
    if problem:
        raise UnlearnError(f"{where}: field 'id' {problem}: {quote(rid)} is unsafe as a storage key")
    if "prompt" in row or "completion" in row:
        both = [f for f in ("text", "label") if f in row]
        if both:
            raise UnlearnError(f"{where}: field '{both[0]}' next to 'prompt'/'completion': a record is either "
                               "id, text, label or id, prompt, completion")
        text, label = field_value(row, "prompt", where), ""
        completion = field_value(row, "completion", where)
    else:
        text, label, completion = field_value(row, "text", where), field_value(row, "label", where), None
    owner = field_value(row, "owner", where, required=False)
    if owner is None:
        owner = rid
    else:
        problem = owner_problem(owner)
        if problem:
            raise UnlearnError(f"{where}: field 'owner' {problem}: {quote(owner)}")
    return Record(rid, text, label, owner, completion)


def validate_rows(rows: Iterable[tuple[dict, str]]) -> list[Record]:
    """Validate rows and reject duplicate ids (naming both places)."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for row, where in rows:
        rec = record_from_row(row, where)
        if rec.id in seen:
            raise UnlearnError(f"{where}: field 'id': duplicate id {quote(rec.id)} (first at {seen[rec.id]})")
        seen[rec.id] = where
        if records and rec.form != records[0].form:
            raise UnlearnError(f"{where}: a {rec.form} record after {records[0].form} ones (first at "
                               f"{seen[records[0].id]}); one data set has one form")
        records.append(rec)
    return records


def with_labels(config, records: Sequence[Record]):
    """Fix the label set (the sorted labels of the data unless given) and check every record.
    For any method's config with `labels`, `to_json` and `from_json` (SISA, ERASE)."""
    completions = [r for r in records if r.completion is not None]
    if completions:
        raise UnlearnError(f"record {quote(completions[0].id)}: a prompt/completion record; classifiers need "
                           "id, text, label records (SISA trains on completions with --objective lm)")
    if not config.labels:
        labels = sorted({r.label for r in records})
        if len(labels) < 2:
            raise UnlearnError(f"the data has a single label {labels}; a classifier needs two or more")
        config = type(config).from_json({**config.to_json(), "labels": labels})
    known = set(config.labels)
    for r in records:
        if r.label not in known:
            raise UnlearnError(f"record {quote(r.id)}: label {quote(r.label)} is not one of {list(config.labels)}")
    return config
