"""Typed manifests and receipts, stored and printed as JSON.

The manifest is the committed state of a run: which records each shard and slice
holds (and where their data object lives), which checkpoint object holds each
stage, and the digests. A run's HEAD pointer names the current manifest; writing
HEAD is the commit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from core.errors import UnlearnError

from .config import SisaConfig

FORMAT = 1


@dataclass
class SliceEntry:
    data: str  # storage key of the slice's records (JSONL, sorted by id)
    ids: list[str]
    owners: list[str]
    label_counts: dict[str, int]


@dataclass
class ShardEntry:
    shard: int
    slices: list[SliceEntry]
    checkpoints: list[str]  # storage key of the state after each stage
    stage_digests: list[str]

    @property
    def digest(self) -> str:
        return self.stage_digests[-1]

    @property
    def records(self) -> int:
        return sum(len(s.ids) for s in self.slices)

    def layout(self) -> list[list[str]]:
        return [list(s.ids) for s in self.slices]


@dataclass
class Manifest:
    run: str
    config: SisaConfig
    shards: list[ShardEntry]
    salt: str  # keys the tombstones; random per run
    tombstones: list[str] = field(default_factory=list)  # HMACs of deleted ids and owners
    version: int = 1
    created: str = ""
    updated: str = ""
    method: str = "sisa"
    format: int = FORMAT

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    def layout(self) -> list[list[list[str]]]:
        return [s.layout() for s in self.shards]

    def labels_held(self) -> set[str]:
        return {label for s in self.shards for sl in s.slices for label, n in sl.label_counts.items() if n}

    def owners(self) -> dict[str, str]:
        return {rid: owner for s in self.shards for sl in s.slices for rid, owner in zip(sl.ids, sl.owners)}

    def referenced_keys(self) -> set[str]:
        keys = set()
        for s in self.shards:
            keys.update(sl.data for sl in s.slices)
            keys.update(s.checkpoints)
        return keys

    def to_json(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_json()
        return d

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT:
                raise UnlearnError(f"{where}: manifest format {d.get('format')!r}, this version reads {FORMAT}")
            shards = [ShardEntry(s["shard"], [SliceEntry(**sl) for sl in s["slices"]], s["checkpoints"],
                                 s["stage_digests"]) for s in d.pop("shards")]
            config = SisaConfig.from_json(d.pop("config"))
            return cls(shards=shards, config=config, **d)
        except (ValueError, KeyError, TypeError) as exc:
            raise UnlearnError(f"{where}: unreadable manifest ({exc})") from None
