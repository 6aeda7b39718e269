"""The committed state of an ERASE run, stored and printed as JSON.

The manifest names where each partition's records live (texts are needed for the
prompt and for `verify`), the clustering state object (which also holds every
record's fixed-point embedding, so a deletion never re-embeds), the selected
examples in prompt order, and the state digest.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from core.errors import UnlearnError

from .config import EraseConfig

FORMAT = 1


@dataclass
class PartitionRecords:
    partition: int
    data: str  # storage key of the partition's records (JSONL, sorted by id)
    state: str  # storage key of its leaves' clustering state (safetensors), embeddings included
    ids: list[str]
    owners: list[str]
    label_counts: dict[str, int]


@dataclass
class EraseManifest:
    run: str
    config: EraseConfig
    partitions: list[PartitionRecords]
    state: str  # storage key of the clustering head: roots, selection (safetensors)
    selected_ids: list[str]  # the in-context examples, in prompt order
    digest: str  # of the clustering state: equal digests, equal selections, bit for bit
    salt: str
    tombstones: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # deletions, certified, partition re-fits, root re-fits
    version: int = 1
    created: str = ""
    updated: str = ""
    method: str = "erase"
    format: int = FORMAT

    @property
    def records(self) -> int:
        return sum(len(p.ids) for p in self.partitions)

    def owners(self) -> dict[str, str]:
        return {rid: owner for p in self.partitions for rid, owner in zip(p.ids, p.owners)}

    def labels_held(self) -> set[str]:
        return {label for p in self.partitions for label, n in p.label_counts.items() if n}

    def referenced_keys(self) -> set[str]:
        return {p.data for p in self.partitions} | {p.state for p in self.partitions} | {self.state}

    def to_json(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_json()
        return d

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "EraseManifest":
        try:
            d = json.loads(data)
            if d.get("method") != "erase":
                raise UnlearnError(f"{where}: not an ERASE manifest (method {d.get('method')!r})")
            if d.get("format") != FORMAT:
                raise UnlearnError(f"{where}: manifest format {d.get('format')!r}, this version reads {FORMAT}")
            parts = [PartitionRecords(**p) for p in d.pop("partitions")]
            config = EraseConfig.from_json(d.pop("config"))
            return cls(partitions=parts, config=config, **d)
        except (ValueError, KeyError, TypeError) as exc:
            raise UnlearnError(f"{where}: unreadable manifest ({exc})") from None
