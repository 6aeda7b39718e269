"""Split manifests: each unit of a run (a SISA shard, an ERASE partition) in an object of its own.

A run's records are listed unit by unit (ids and owners, per slice for SISA). In manifest
format 1 every unit's list sat inside the one manifest object, so every deletion rewrote
and re-read the whole run's list: O(N) bytes per deletion. From format 2 on

    RUN/units/<sha256>.json      one unit's entry (its records' ids and owners, the keys of
                                 its objects), content-addressed and never changed

and the manifest names each unit's object with a small summary (what `status` shows), so a
commit writes only the unit objects that changed, the manifest and HEAD; and a reader
parses only the units it has not seen: parsed entries are cached by key (the key is the
SHA-256 of the bytes, which the store checks on every read, so a cached entry is exactly
what the key names), and so is each unit's index (id -> owner, owner -> ids), so resolving
after a commit that changed one shard rebuilds one shard's index.

A unit object names deleted ids once it is superseded: garbage collection purges it (with
every version) like any object of the run the new manifest does not reference.

Entries are immutable once written or read: a change is a new entry object (a deletion
builds new entries for the units it touches and keeps the others as they are).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import threading
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable, Sequence

from .errors import ObjectMissing, UnlearnError
from .keys import sha256_hex
from .records import quote

UNITS = "units/"
FORMAT = 2  # the manifest format this version writes
READS = (1, FORMAT)  # 1: every unit's entry inside the manifest; 2: one object per unit


def check_format(d: dict, where: str) -> None:
    if d.get("format") not in READS:
        raise UnlearnError(f"{where}: manifest format {d.get('format')!r}, this version reads "
                           f"{' and '.join(map(str, READS))}")


def canonical(d: Any) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def unit_key(run: str, data: bytes) -> str:
    return f"{run}/{UNITS}{sha256_hex(data)}.json"


class UnitIndex:
    """One unit's records: id -> owner, owner -> ids, id -> position (a slice). Built once
    per unit object."""

    __slots__ = ("held", "by_owner", "position")

    def __init__(self, rows: Iterable[tuple[str, str, int]]):
        self.held: dict[str, str] = {}
        self.position: dict[str, int] = {}
        by_owner: dict[str, list[str]] = defaultdict(list)
        for rid, owner, pos in rows:
            self.held[rid] = owner
            self.position[rid] = pos
            by_owner[owner].append(rid)
        self.by_owner = dict(by_owner)


class _Bounded:
    """A thread-safe LRU map bounded by the records its values hold, not by their number: a
    superseded unit of a 1M-record run holds megabytes (its ids in memory too), so a bound
    by count would let a long-lived coordinator grow by gigabytes. The newest value stays
    even if it alone is over the budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self.weight = 0
        self._d: OrderedDict = OrderedDict()  # key -> (value, weight)
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return None
            self._d.move_to_end(key)
            return hit[0]

    def put(self, key, value, weight: int = 1) -> None:
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self._d[key] = (value, weight)
            self.weight += weight
            while self.weight > self.budget and len(self._d) > 1:
                _, (_, w) = self._d.popitem(last=False)
                self.weight -= w

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.weight = 0


def records_in(entry) -> int:
    """The records a unit entry holds (SISA: `.records`; ERASE: its `ids`), plus one."""
    n = getattr(entry, "records", None)
    return 1 + (n if isinstance(n, int) else len(getattr(entry, "ids", ()) or ()))


# The cache's budget, in records, per map: the units of a run of up to half of it and the
# superseded versions of its shards in the other half (about 1 KB of memory per record
# for entries and indexes together). Set it to at least twice the run's records: a run
# larger than the budget is read from the store again and again (right, but slow).
CACHE_RECORDS = int(os.environ.get("UNLEARN_UNIT_CACHE_RECORDS", "2000000"))


class UnitCache:
    """Process-wide: parsed entries by (store, key); the key an entry object serialises to,
    by the object's identity (the cache holds the object, so its id is not reused); each
    unit's index by key. Each map is bounded by the records it holds (CACHE_RECORDS)."""

    def __init__(self, budget: int = CACHE_RECORDS):
        self.entries = _Bounded(budget)
        self.keys = _Bounded(budget)
        self.indexes = _Bounded(budget)

    def key_of(self, entry, run: str) -> str | None:
        hit = self.keys.get(id(entry))
        if hit is not None and hit[0] is entry and hit[1].startswith(f"{run}/{UNITS}"):
            return hit[1]
        return None

    def remember(self, entry, key: str) -> None:
        self.keys.put(id(entry), (entry, key), records_in(entry))

    def keep(self, store, key: str, entry) -> None:
        self.entries.put((store.uri, key), entry, records_in(entry))
        self.remember(entry, key)

    def clear(self) -> None:
        self.entries.clear()
        self.keys.clear()
        self.indexes.clear()


CACHE = UnitCache()


def clear_cache() -> None:
    """Forget every parsed unit (tests: act as a fresh process would)."""
    CACHE.clear()


class SplitManifest:
    """Base of the SISA and ERASE manifests: the list of unit entries, read lazily.

    A subclass sets UNIT_NAME ("shard", for messages), and implements `entry_json`,
    `entry_from_json`, `summary` (small: what status needs) and `index_rows` (id, owner,
    position of each record of an entry). `units` is the list of entries; the first access
    of a manifest read from a store reads the unit objects (from the cache when seen)."""

    UNIT_NAME = "unit"
    LEGACY_FIELD = "units"  # where format 1 kept the entries

    def _init_units(self, entries: list | None) -> None:
        self._entries = entries
        self._keys: list[str] | None = None  # unit object keys, once known
        self._summaries: list[dict] | None = None
        self._pending: dict[str, bytes] = {}  # the bytes of the entries `seal` serialised
        self._source = None  # the store a manifest was read from
        self.key: str | None = None  # the manifest object's key, once read or committed
        self.stored_units: frozenset[str] = frozenset()  # unit keys known to be in the store

    # -- for subclasses ------------------------------------------------------------------
    @staticmethod
    def entry_json(entry) -> dict:
        raise NotImplementedError

    @staticmethod
    def entry_from_json(d: dict):
        raise NotImplementedError

    @staticmethod
    def summary(entry) -> dict:
        raise NotImplementedError

    @staticmethod
    def index_rows(entry) -> Iterable[tuple[str, str, int]]:
        raise NotImplementedError

    def scalars(self) -> dict:
        """Every field of the manifest but its units, as JSON."""
        raise NotImplementedError

    # -- the units -------------------------------------------------------------------------
    @property
    def units(self) -> list:
        if self._entries is None:
            where = f"run {quote(self.run)}"
            self._entries = [read_unit(self._source, where, key, self.entry_from_json, self.UNIT_NAME)
                             for key in self._keys]
        return self._entries

    @units.setter
    def units(self, entries: list) -> None:
        self._entries, self._keys, self._summaries = list(entries), None, None

    def summaries(self) -> list[dict]:
        """Per unit, what status shows, without reading the unit objects of a split manifest."""
        if self._summaries is None:
            self._summaries = [self.summary(e) for e in self.units]
        return self._summaries

    def unit_keys(self) -> list[str]:
        if self._keys is None:
            self.seal()
        return list(self._keys)

    def seal(self, rehash: bool = False) -> None:
        """Fix the unit keys of the entries held: an entry seen before keeps its key; a new
        one (or all, with `rehash`) is serialised and hashed."""
        if self._entries is None:
            return  # not read: the keys as read
        run = self.run
        keys = []
        self._pending = {}
        for entry in self._entries:
            key = None if rehash else CACHE.key_of(entry, run)
            if key is None:
                data = canonical(self.entry_json(entry))
                key = unit_key(run, data)
                self._pending[key] = data
                CACHE.remember(entry, key)
            keys.append(key)
        self._keys = keys
        self._summaries = [self.summary(e) for e in self._entries]

    def unit_objects(self) -> list[tuple[str, Callable[[], bytes]]]:
        """(key, bytes when asked) per unit, for a commit that writes the missing ones."""
        keys = self.unit_keys()
        return [(k, (lambda k=k, e=e: self._pending.get(k) or canonical(self.entry_json(e))))
                for k, e in zip(keys, self.units)]

    def indexes(self) -> list[UnitIndex]:
        """Each unit's index, built once per unit object (cached by key)."""
        out = []
        for key, entry in zip(self.unit_keys(), self.units):
            index = CACHE.indexes.get(key)
            if index is None:
                index = UnitIndex(self.index_rows(entry))
                CACHE.indexes.put(key, index, 1 + len(index.held))
            out.append(index)
        return out

    def owners(self) -> dict[str, str]:
        """Every held id -> owner (O(records): for tests and tools, not per request)."""
        return {rid: owner for index in self.indexes() for rid, owner in index.held.items()}

    # -- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        keys = self.unit_keys()
        return {**self.scalars(), "format": FORMAT,
                "units": [{"key": k, "summary": s} for k, s in zip(keys, self.summaries())]}

    def dumps(self) -> bytes:
        return canonical(self.to_json())

    def _read_units(self, d: dict, store, where: str) -> None:
        """The units of a manifest read from JSON `d`: format 1 holds the entries, format 2
        names their objects (read on first use)."""
        if d.get("format") == 1:
            self._init_units([self.entry_from_json(e) for e in d[self.LEGACY_FIELD]])
        else:
            self._init_units(None)
            units = d["units"]
            if not isinstance(units, list) or not all(isinstance(u, dict) and isinstance(u["key"], str)
                                                      and isinstance(u["summary"], dict) for u in units):
                raise TypeError("'units' must be a list of {key, summary}")
            if store is None:
                raise UnlearnError(f"{where}: a split manifest is read from its store")
            named = re.compile(re.escape(f"{self.run}/{UNITS}") + r"[0-9a-f]{64}\.json")
            for u in units:  # only a content-addressed name of this run: the store checks its bytes on read
                if not named.fullmatch(u["key"]):
                    raise UnlearnError(f"{where}: {self.UNIT_NAME} object key {u['key']!r} is not "
                                       f"{self.run}/{UNITS}<sha256>.json")
            self._keys = [u["key"] for u in units]
            self._summaries = [u["summary"] for u in units]
            self._source = store
            self.stored_units = frozenset(self._keys)


_FRESH = contextvars.ContextVar("unlearn_fresh_unit_reads", default=False)


@contextlib.contextmanager
def fresh_reads():
    """Unit objects read within are read from the store, never taken from the cache. For
    verify: a proof must rest on what the store holds now, not on what this process parsed
    when it wrote or first read an object (since damaged at rest, say)."""
    token = _FRESH.set(True)
    try:
        yield
    finally:
        _FRESH.reset(token)


def read_unit(store, where: str, key: str, parse: Callable[[dict], Any], what: str = "unit"):
    """A unit's entry: from the cache, else read from the store (which checks the bytes
    against the SHA-256 in the key: its IntegrityError, one line naming the key, passes
    through) and parsed. Every failure is one line naming the key."""
    cached = None if _FRESH.get() else CACHE.entries.get((store.uri, key))
    if cached is not None:
        return cached
    try:
        data = store.get(key)
    except KeyError:
        raise ObjectMissing(f"{where}: {what} object {key} is missing from {store.uri}") from None
    try:
        entry = parse(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnlearnError(f"{store.uri}/{key}: unreadable {what} object ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    CACHE.keep(store, key, entry)
    return entry


def written(store, key: str, entry) -> None:
    """Record that `entry` is in `store` under `key` (the commit that wrote it)."""
    CACHE.keep(store, key, entry)


def locate(indexes: Sequence[UnitIndex], rid: str) -> tuple[int, int] | None:
    """(unit, position) of a held id, or None."""
    for u, index in enumerate(indexes):
        pos = index.position.get(rid)
        if pos is not None:
            return u, pos
    return None
