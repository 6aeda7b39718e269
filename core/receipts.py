"""What a deletion returns: the same receipt for every method, so the coordinator, the
request log and the HTTP API treat SISA and ERASE alike."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable


@dataclass
class DeletionReceipt:
    run: str
    ids: list[str]  # records removed by this request
    already_deleted: list[str]  # requested ids/owners that an earlier request removed
    shards: list[int]  # affected shards, the only ones retrained
    stages_redone: dict[str, list[int]]
    digests: dict[str, dict[str, str]]  # shard -> {"before": ..., "after": ...}
    retrain_fraction: float  # examples retrained, as a fraction of one full training on the retained data
    purged_objects: int
    version: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific (ERASE: certificate, re-fits, new selection)
    not_found: list[str] = field(default_factory=list)  # requested ids/owners the run never held (ignore_missing)

    def to_json(self) -> dict:
        return asdict(self)


def not_found(ids: Iterable[str], owners: Iterable[str], unknown: Iterable[str]) -> list[str]:
    """The requested ids and owners that `tombstones.resolve` reported unknown (it quotes
    them for messages: `id "x"`, `owner "y"`), as they were requested."""
    from .records import quote

    unknown = set(unknown)
    return [v for kind, values in (("id", ids), ("owner", owners)) for v in values if f"{kind} {quote(v)}" in unknown]
