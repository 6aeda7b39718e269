"""The committed state of an ERASE run, stored and printed as JSON.

The manifest names where each partition's records live (texts are needed for the
prompt and for `verify`), the clustering state object (which also holds every
record's fixed-point embedding, so a deletion never re-embeds), the selected
examples in prompt order, and the state digest. Each partition's record list is an
object of its own (RUN/units/, see core/units.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from core.errors import UnlearnError
from core.units import FORMAT, SplitManifest, check_format

from .config import EraseConfig



@dataclass
class PartitionRecords:
    partition: int
    data: str  # storage key of the partition's records (JSONL, sorted by id)
    state: str  # storage key of its leaves' clustering state (safetensors), embeddings included
    ids: list[str]
    owners: list[str]
    label_counts: dict[str, int]


class EraseManifest(SplitManifest):
    """The committed state of an ERASE run. Format 2 keeps each partition's record list in
    an object of its own (core/units.py); format 1 (read still) held them all."""

    UNIT_NAME = "partition"
    LEGACY_FIELD = "partitions"

    def __init__(self, run: str, config: EraseConfig, partitions: list[PartitionRecords] | None, state: str,
                 selected_ids: list[str], digest: str, salt: str, tombstones: list[str] | None = None,
                 stats: dict | None = None, version: int = 1, created: str = "", updated: str = "",
                 method: str = "erase", format: int = FORMAT):
        self.run, self.config, self.salt = run, config, salt
        self.state = state  # storage key of the clustering head: roots, selection (safetensors)
        self.selected_ids = selected_ids  # the in-context examples, in prompt order
        self.digest = digest  # of the clustering state: equal digests, equal selections, bit for bit
        self.tombstones = list(tombstones or [])
        self.stats = dict(stats or {})  # deletions, certified, partition re-fits, root re-fits
        self.version, self.created, self.updated, self.method, self.format = version, created, updated, method, format
        self._init_units(None if partitions is None else list(partitions))

    @property
    def partitions(self) -> list[PartitionRecords]:
        return self.units

    @partitions.setter
    def partitions(self, entries: list[PartitionRecords]) -> None:
        self.units = entries

    @staticmethod
    def entry_json(entry: PartitionRecords) -> dict:  # asdict() would deep-copy the id lists
        return {"partition": entry.partition, "data": entry.data, "state": entry.state, "ids": entry.ids,
                "owners": entry.owners, "label_counts": entry.label_counts}

    @staticmethod
    def entry_from_json(p: dict) -> PartitionRecords:
        return PartitionRecords(**p)

    @staticmethod
    def summary(entry: PartitionRecords) -> dict:
        return {"partition": entry.partition, "records": len(entry.ids), "labels": entry.label_counts}

    @staticmethod
    def index_rows(entry: PartitionRecords):
        return ((rid, owner, 0) for rid, owner in zip(entry.ids, entry.owners))

    def scalars(self) -> dict:
        return {"run": self.run, "config": self.config.to_json(), "state": self.state,
                "selected_ids": self.selected_ids, "digest": self.digest, "salt": self.salt,
                "tombstones": self.tombstones, "stats": self.stats, "version": self.version,
                "created": self.created, "updated": self.updated, "method": self.method}

    @property
    def records(self) -> int:
        return sum(s["records"] for s in self.summaries())

    def labels_held(self) -> set[str]:
        return {label for s in self.summaries() for label, n in s["labels"].items() if n}

    def referenced_keys(self) -> set[str]:
        """Every object the manifest names (see sisa/manifest.py for the unit keys)."""
        return set(self._keys or ()) | {p.data for p in self.partitions} | {p.state for p in self.partitions} | \
            {self.state}

    @classmethod
    def loads(cls, data: bytes, where: str, store=None) -> "EraseManifest":
        try:
            d = json.loads(data)
            if d.get("method") != "erase":
                raise UnlearnError(f"{where}: not an ERASE manifest (method {d.get('method')!r})")
            check_format(d, where)
            m = cls(run=d["run"], config=EraseConfig.from_json(d["config"]), partitions=None, state=d["state"],
                    selected_ids=d["selected_ids"], digest=d["digest"], salt=d["salt"],
                    tombstones=d.get("tombstones", []), stats=d.get("stats", {}), version=d["version"],
                    created=d.get("created", ""), updated=d.get("updated", ""), format=d["format"])
            m._read_units(d, store, where)
            return m
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnlearnError(f"{where}: unreadable manifest ({exc})") from None
