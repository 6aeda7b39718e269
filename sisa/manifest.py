"""The manifest of a SISA run, stored as JSON.

The manifest is the committed state of a run: which records each shard and slice
holds (and where their data object lives), which checkpoint object holds each
stage, and the digests. A run's HEAD pointer names the current manifest; writing
HEAD is the commit. Each shard's entry is an object of its own (RUN/units/, see
core/units.py), so a deletion rewrites the entries of the shards it touched only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from core.errors import UnlearnError
from core.units import FORMAT, SplitManifest, check_format

from .config import SisaConfig



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


class Manifest(SplitManifest):
    """The committed state of a SISA run. Format 2 (written since the split) keeps each
    shard's entry in an object of its own (core/units.py); format 1 (read still) held them
    all. `shards` reads the shard objects on first use; `summaries()` does not."""

    UNIT_NAME = "shard"
    LEGACY_FIELD = "shards"

    def __init__(self, run: str, config: SisaConfig, shards: list[ShardEntry] | None, salt: str,
                 tombstones: list[str] | None = None, version: int = 1, created: str = "", updated: str = "",
                 method: str = "sisa", format: int = FORMAT):
        self.run, self.config, self.salt = run, config, salt
        self.tombstones = list(tombstones or [])  # HMACs of deleted ids and owners
        self.version, self.created, self.updated, self.method, self.format = version, created, updated, method, format
        self._init_units(None if shards is None else list(shards))

    @property
    def shards(self) -> list[ShardEntry]:
        return self.units

    @shards.setter
    def shards(self, entries: list[ShardEntry]) -> None:
        self.units = entries

    @staticmethod
    def entry_json(entry: ShardEntry) -> dict:  # asdict() would deep-copy every id list
        return {"shard": entry.shard, "checkpoints": entry.checkpoints, "stage_digests": entry.stage_digests,
                "slices": [{"data": sl.data, "ids": sl.ids, "owners": sl.owners, "label_counts": sl.label_counts}
                           for sl in entry.slices]}

    @staticmethod
    def entry_from_json(s: dict) -> ShardEntry:
        return ShardEntry(s["shard"], [SliceEntry(**sl) for sl in s["slices"]], s["checkpoints"], s["stage_digests"])

    @staticmethod
    def summary(entry: ShardEntry) -> dict:
        return {"shard": entry.shard, "records": entry.records, "slices": [len(sl.ids) for sl in entry.slices],
                "digest": entry.digest}

    @staticmethod
    def index_rows(entry: ShardEntry):
        return ((rid, owner, j) for j, sl in enumerate(entry.slices) for rid, owner in zip(sl.ids, sl.owners))

    def scalars(self) -> dict:
        return {"run": self.run, "config": self.config.to_json(), "salt": self.salt, "tombstones": self.tombstones,
                "version": self.version, "created": self.created, "updated": self.updated, "method": self.method}

    @property
    def records(self) -> int:
        return sum(s["records"] for s in self.summaries())

    def layout(self) -> list[list[list[str]]]:
        return [s.layout() for s in self.shards]

    def labels_held(self) -> set[str]:
        return {label for s in self.shards for sl in s.slices for label, n in sl.label_counts.items() if n}

    def referenced_keys(self) -> set[str]:
        """Every object the manifest names: its shard objects and what they name. The unit
        keys of a format-1 manifest read from the store are not among them: no object holds
        them there, so a units/ object is the leftover of an interrupted commit."""
        keys = set(self._keys or ())
        for s in self.shards:
            keys.update(sl.data for sl in s.slices)
            keys.update(s.checkpoints)
        return keys

    @classmethod
    def loads(cls, data: bytes, where: str, store=None) -> "Manifest":
        """A manifest from its JSON; a split one (format 2) reads its shard objects from
        `store` on first use."""
        try:
            d = json.loads(data)
            check_format(d, where)
            m = cls(run=d["run"], config=SisaConfig.from_json(d["config"]), shards=None, salt=d["salt"],
                    tombstones=d.get("tombstones", []), version=d["version"], created=d.get("created", ""),
                    updated=d.get("updated", ""), method=d.get("method", "sisa"), format=d["format"])
            m._read_units(d, store, where)
            return m
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnlearnError(f"{where}: unreadable manifest ({exc})") from None
