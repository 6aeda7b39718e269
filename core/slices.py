"""Records as stored data objects: one JSON line per record, sorted by id, so the same
records always give the same bytes (and the same content address)."""
from __future__ import annotations

import json
from typing import Sequence

from .records import Record


def encode_slice(records: Sequence[Record]) -> bytes:
    return "".join(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False) + "\n"
                   for r in sorted(records, key=lambda r: r.id)).encode("utf-8")


def decode_slice(data: bytes) -> list[Record]:
    # split on "\n" only: str.splitlines() would also split inside texts at U+2028, U+0085, ...
    return [Record(**json.loads(line)) for line in data.decode("utf-8").split("\n") if line]


def record_problems(entry, records: Sequence[Record]) -> list[str]:
    """How stored records differ from what a manifest entry says they are (`entry` has
    `ids`, `owners` and `label_counts`: a SISA SliceEntry or an ERASE PartitionRecords).
    The data object is content-addressed, so its bytes are the ones the manifest named;
    this catches a manifest and its objects that disagree, before anything trains on them."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.label] = counts.get(r.label, 0) + 1
    return [f"stored {what} differ from the manifest"
            for what, mine, theirs in (("ids", [r.id for r in records], list(entry.ids)),
                                       ("owners", [r.owner for r in records], list(entry.owners)),
                                       ("label counts", dict(sorted(counts.items())), dict(entry.label_counts)))
            if mine != theirs]


