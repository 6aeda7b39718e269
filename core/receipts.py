"""What a deletion returns: the same receipt for every method, so the coordinator, the
request log and the HTTP API treat SISA and ERASE alike."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    def to_json(self) -> dict:
        return asdict(self)
