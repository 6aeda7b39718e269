"""A run's deletion log in the store: the queue of accepted requests, and receipts.

    RUN/queue/<group id>.json       accepted, not yet applied: a group of requests written
                                    in one durable write (group commit), each with the ids
                                    and owners it names and what they quarantine (`units`);
                                    the group id is its first request's id
    RUN/requests/<request id>.json  the receipt once applied: counts, shards, digests;
                                    never the ids or owners
    RUN/requests/index/<day>.json   receipts compacted: one row of counts per older request
                                    (`compact`), by the UTC day its id was accepted

The newest `kept` receipts (default 1000, `$UNLEARN_RECEIPTS_KEPT`) stay whole; the lock
holder folds older ones into their day's index once there are a tenth more, so the folder
holds a bounded number of receipts plus one small object a day. A compacted request still
answers `done` with its counts, shards, stages and version (`compacted: true`); its digests,
details and warnings are gone. The index is written before the receipts go, so every
request is in the queue, a receipt or the index at every moment.

Any process may append a group to the queue (that write is the acknowledgement of every
request in it: durable first). Appenders only ever create new group objects; only the holder
of the run lock rewrites one (a request applying, pending again after a transient error,
failed for a permanent one) or finishes requests: receipts first, then the group is
rewritten without them (older versions pruned) or, once empty, purged with every version.
The queue is therefore both the list of work left and the quarantine every serving process
reads, and it is as long as the work left, not as the history. Groups are what make a busy
front door cheap: a server that acknowledges hundreds of requests a second writes one
object per group, not per request, and readers list and parse a few objects, not
thousands (parsed groups are cached by a hash of their bytes).

Every group (and receipt) carries a SHA-256 of its own content (`check`) and is read
strictly (every field's type, the group id matching the file name, each request id once): a flipped bit must not turn "delete r0003"
into "delete r0002", or move a quarantine to another shard. A queue group that fails is
damaged: it is reported, never applied, and while it is there every answering process
withholds everything (nothing says what it protected); `unlearn resume --discard-damaged`
removes it once it is restored or resubmitted. A queue object of one request written
before groups existed is read as a group of one.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field, fields

from core.errors import UnlearnError
from core.keys import sha256_hex
from core.records import quote
from core.store import Store

STATUSES = ("pending", "applying", "done", "failed")
_ID = re.compile(r"[0-9]{20}-[0-9a-f]{8}")


@dataclass
class DeletionRequest:
    request_id: str
    accepted: str
    status: str = "pending"
    ids: list[str] = field(default_factory=list)  # cleared once done
    owners: list[str] = field(default_factory=list)  # cleared once done
    units: list = field(default_factory=list)  # quarantined until done: SISA shards, ERASE record ids
    requested: dict = field(default_factory=dict)  # {"ids": n, "owners": n}
    ignore_missing: bool = False
    attempts: int = 0
    last_error: str | None = None  # the latest transient error; the request stays queued
    batch: list[str] = field(default_factory=list)  # (receipts before batch_id) request ids applied together
    batch_id: str | None = None  # the first request of the batch it was applied in
    batch_size: int = 0  # requests in that batch (a list of them all would grow with the batch squared)
    records_deleted: int = 0
    already_deleted_count: int = 0  # requested ids/owners an earlier request removed
    not_found_count: int = 0  # requested ids/owners the run never held (--ignore-missing)
    shards: list[int] = field(default_factory=list)  # SISA shards, or ERASE partitions, holding its records
    stages_redone: dict = field(default_factory=dict)
    digests: dict = field(default_factory=dict)
    version: int | None = None
    retrain_fraction: float = 0.0  # of the whole batch
    purged_objects: int = 0  # of the whole batch
    warnings: list[str] = field(default_factory=list)
    completed: str | None = None
    seconds: float | None = None
    reason: str | None = None  # why it failed (permanent causes only)
    details: dict = field(default_factory=dict)  # method-specific receipt (ERASE: certificate, new selection)
    compacted: bool = False  # read from the day index: counts only, no digests, details or warnings

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DeletionRequest":
        """Strict: a damaged entry is refused, not half-used."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        known = {f.name: f for f in fields(cls)}
        if isinstance(d.get("already_deleted"), int) and "already_deleted_count" not in d:
            d = {**d, "already_deleted_count": d["already_deleted"]}  # written before the rename
            del d["already_deleted"]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        req = cls(**d)
        for name, kind in _TYPES.items():
            value = getattr(req, name)
            if not _is(value, kind):
                raise ValueError(f"field {name!r} has the wrong type")
        if req.status not in STATUSES or not valid_request_id(req.request_id):
            raise ValueError("bad status or request id")
        return req


def _is(value, kind) -> bool:
    if kind == "str*":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "unit*":  # SISA shard numbers or ERASE record ids
        return isinstance(value, list) and all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
                                               for v in value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return any(_is(value, k) for k in kind)
    return isinstance(value, kind)


_TYPES = {"request_id": str, "accepted": str, "status": str, "ids": "str*", "owners": "str*", "units": "unit*",
          "requested": dict, "ignore_missing": bool, "attempts": "int", "last_error": (str, type(None)),
          "batch": "str*", "batch_id": (str, type(None)), "batch_size": "int", "records_deleted": "int",
          "already_deleted_count": "int", "not_found_count": "int",
          "shards": "unit*",
          "stages_redone": dict, "digests": dict, "version": ("int", type(None)), "retrain_fraction": "num",
          "purged_objects": "int", "warnings": "str*", "completed": (str, type(None)),
          "seconds": ("num", type(None)), "reason": (str, type(None)), "details": dict, "compacted": bool}

# what a compacted request keeps (a row of its day's index): counts and where its records were
INDEX_COLUMNS = ("request_id", "accepted", "completed", "requested", "ignore_missing", "attempts", "batch_id",
                 "batch_size", "records_deleted", "already_deleted_count", "not_found_count", "shards", "stages_redone",
                 "version", "retrain_fraction", "purged_objects", "seconds")
KEPT_DEFAULT = 1000


def receipts_kept() -> int:
    """How many receipts stay whole (`$UNLEARN_RECEIPTS_KEPT`, default 1000)."""
    value = os.environ.get("UNLEARN_RECEIPTS_KEPT", "")
    try:
        kept = int(value) if value else KEPT_DEFAULT
    except ValueError:
        raise UnlearnError(f"UNLEARN_RECEIPTS_KEPT={value!r}: not a whole number") from None
    if kept < 1:
        raise UnlearnError(f"UNLEARN_RECEIPTS_KEPT={value!r}: must be >= 1")
    return kept


def day_of(request_id: str) -> str:
    """The UTC day a request was accepted, from its id (nanoseconds since the epoch)."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(int(request_id[:20]) / 1e9, timezone.utc).date().isoformat()


def encode(req: DeletionRequest) -> bytes:
    """The entry as stored: its JSON with a SHA-256 of that JSON (`check`)."""
    body = req.to_json()
    return json.dumps({**body, "check": sha256_hex(_canonical(body))}, sort_keys=True).encode()


def checked_json(data: bytes, need_check: bool = True) -> dict:
    """A stored JSON object without its `check`, after comparing the two; ValueError naming
    what is wrong if it is damaged. Receipts written before checks existed have none
    (`need_check=False`)."""
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else "not JSON") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    check = d.pop("check", None)
    if check is None and need_check:
        raise ValueError("no checksum")
    if check is not None and check != sha256_hex(_canonical(d)):
        raise ValueError("its content does not match its checksum")
    return d


def decode(data: bytes, name: str, need_check: bool = True) -> DeletionRequest:
    """ValueError naming what is wrong if the entry is damaged. `name`: the request id its
    key says."""
    return _request(checked_json(data, need_check), name)


def _request(d: object, name: str | None = None) -> DeletionRequest:
    """One request from its JSON, strictly; ValueError if damaged or (given `name`) if it
    names another request than its key says."""
    try:
        req = DeletionRequest.from_json(d)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if name is not None and req.request_id != name:
        raise ValueError(f"it names request {req.request_id!r}")
    return req


def encode_group(group_id: str, reqs: list[DeletionRequest]) -> bytes:
    """A queue group as stored: its requests and a SHA-256 of the whole (`check`)."""
    body = {"group": group_id, "requests": [r.to_json() for r in reqs]}
    return json.dumps({**body, "check": sha256_hex(_canonical(body))}, sort_keys=True).encode()


def decode_group(data: bytes, name: str) -> list[DeletionRequest]:
    """The requests of a queue object (a group, or one request written before groups);
    ValueError naming what is wrong if it is damaged. `name`: the id its key says."""
    d = checked_json(data)
    if "requests" not in d:  # one request, as written before group commit
        return [_request(d, name)]
    if set(d) != {"group", "requests"} or d["group"] != name:
        raise ValueError(f"it names group {d.get('group')!r}" if "group" in d else "not a request group")
    if not isinstance(d["requests"], list) or not d["requests"]:
        raise ValueError("a group without requests")
    reqs = [_request(item) for item in d["requests"]]
    if len({r.request_id for r in reqs}) != len(reqs):
        raise ValueError("a request appears twice")
    return reqs


def _canonical(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class _Damaged(Exception):
    """A queue group that could hold the request looked for is damaged: args (key, error)."""


class UnknownRequest(UnlearnError):
    """No request of that id (HTTP 404)."""


def valid_request_id(request_id: str) -> bool:
    return isinstance(request_id, str) and bool(_ID.fullmatch(request_id))


class RequestLog:
    def __init__(self, store: Store, run: str):
        self.store = store
        self.run = run
        # queue key -> (a hash of its bytes, its requests): a group is parsed and checked once
        # per content, however often the loop and the quarantine list the queue
        self._parsed: dict[str, tuple[bytes, list[DeletionRequest]]] = {}
        self._parsed_lock = threading.Lock()

    def queue_key(self, group_id: str) -> str:
        return f"{self.run}/queue/{group_id}.json"

    def receipt_key(self, request_id: str) -> str:
        return f"{self.run}/requests/{request_id}.json"

    def index_key(self, day: str) -> str:
        return f"{self.run}/requests/index/{day}.json"

    def receipt_keys(self) -> list[str]:
        """Every whole receipt (the day index objects live one folder down)."""
        prefix = f"{self.run}/requests/"
        return [k for k in self.store.list(prefix) if "/" not in k[len(prefix):]]

    def index_keys(self) -> list[str]:
        return self.store.list(f"{self.run}/requests/index/")

    @staticmethod
    def _id_of(key: str) -> str:
        return key.rsplit("/", 1)[1].removesuffix(".json")

    def _read(self, key: str) -> DeletionRequest:
        """A receipt. KeyError if absent; ValueError if damaged."""
        return decode(self.store.get(key), self._id_of(key), need_check=False)

    def _read_group(self, key: str) -> list[DeletionRequest]:
        """The requests of a queue object, shared with the cache: callers copy before they
        change one. KeyError if absent; ValueError if damaged."""
        data = self.store.get(key)
        digest = hashlib.blake2b(data, digest_size=16).digest()
        with self._parsed_lock:
            hit = self._parsed.get(key)
        if hit is not None and hit[0] == digest:
            return hit[1]
        reqs = decode_group(data, self._id_of(key))
        with self._parsed_lock:
            self._parsed[key] = (digest, reqs)
        return reqs

    def _keep_parsed(self, keys: list[str]) -> None:
        with self._parsed_lock:
            listed = set(keys)
            self._parsed = {k: v for k, v in self._parsed.items() if k in listed}

    def _read_index(self, key: str) -> dict[str, DeletionRequest]:
        """The compacted requests of one day, by id. KeyError if absent; ValueError if damaged."""
        d = checked_json(self.store.get(key))
        columns, rows = d.get("columns"), d.get("rows")
        if not (isinstance(columns, list) and set(columns) <= set(INDEX_COLUMNS) and "request_id" in columns
                and isinstance(rows, list) and all(isinstance(r, list) and len(r) == len(columns) for r in rows)):
            raise ValueError("not a receipt index")
        out = {}
        for row in rows:
            try:
                req = DeletionRequest.from_json({**dict(zip(columns, row)), "status": "done", "compacted": True})
            except TypeError as exc:
                raise ValueError(str(exc)) from None
            out[req.request_id] = req
        return out

    def _index_of(self, request_id: str) -> DeletionRequest | None:
        """The compacted row of one request (None if its day has none); ValueError if damaged."""
        try:
            return self._read_index(self.index_key(day_of(request_id))).get(request_id)
        except KeyError:
            return None

    def _unreadable(self, key: str, exc: Exception) -> str:
        if key.startswith(f"{self.run}/requests/index/"):
            return f"run {quote(self.run)}: receipt index {quote(self._id_of(key))} is damaged ({exc}); skipped"
        return f"run {quote(self.run)}: request log entry {quote(self._id_of(key))} is damaged ({exc}); skipped"

    # -- writing -----------------------------------------------------------------------------
    def append(self, reqs: DeletionRequest | list[DeletionRequest]) -> str:
        """One durable write for the whole group, named by its first request; only when this
        returns may its requests be acknowledged. Returns the group id."""
        reqs = [reqs] if isinstance(reqs, DeletionRequest) else list(reqs)
        group_id = reqs[0].request_id
        self.store.put(self.queue_key(group_id), encode_group(group_id, reqs))
        return group_id

    def drop_group(self, group_id: str) -> None:
        """Remove a group its appender just wrote (the run was dropped meanwhile)."""
        self.store.delete(self.queue_key(group_id))

    def _groups_holding(self, request_ids: set[str]) -> dict[str, list[DeletionRequest]]:
        """queue key -> its requests, for each readable group holding any of `request_ids`
        (a damaged one is never rewritten: it is reported wherever it is read)."""
        out = {}
        for key in self.queued_keys():
            try:
                reqs = self._read_group(key)
            except (KeyError, ValueError):
                continue
            if any(r.request_id in request_ids for r in reqs):
                out[key] = reqs
        return out

    def update(self, reqs: DeletionRequest | list[DeletionRequest]) -> None:
        """Rewrite queued requests (lock holder only): each group holding one is written
        again with them replaced, and its older versions are dropped."""
        new = {r.request_id: r for r in ([reqs] if isinstance(reqs, DeletionRequest) else reqs)}
        for key, old in self._groups_holding(set(new)).items():
            self.store.put(key, encode_group(self._id_of(key), [new.get(r.request_id, r) for r in old]))
            self.store.prune_versions(key)

    def finish(self, reqs: DeletionRequest | list[DeletionRequest]) -> None:
        """Receipts first, then the requests leave the queue (every version of what named
        them goes, see drop_queued). A crash in between leaves both; the next lock holder
        drops the queue entries."""
        reqs = [reqs] if isinstance(reqs, DeletionRequest) else list(reqs)
        for req in reqs:
            req.ids, req.owners, req.units = [], [], []
            key = self.receipt_key(req.request_id)
            self.store.put(key, encode(req))
            self.store.prune_versions(key)
        self.drop_queued([r.request_id for r in reqs])

    def drop_queued(self, request_ids: str | list[str]) -> None:
        """Lock holder only: take requests out of their groups. A group keeping others is
        rewritten without them and its older versions (which named their ids) are pruned;
        an emptied group is purged with every version."""
        gone = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        for key, old in self._groups_holding(gone).items():
            left = [r for r in old if r.request_id not in gone]
            if left:
                self.store.put(key, encode_group(self._id_of(key), left))
                self.store.prune_versions(key)
            else:
                self.store.delete(key)

    def compact(self, kept: int, check=None) -> int:
        """Lock holder only: once more than `kept` + a tenth receipts are whole, fold the
        oldest into their day's index until `kept` are left. The index is written (and read
        back) before a receipt goes, so a crash or a second folder never loses a request.
        `check()` (the run lock's) runs before every write. Returns the receipts folded."""
        keys = self.receipt_keys()
        if len(keys) <= kept + max(1, kept // 10):
            return 0
        by_day: dict[str, list[DeletionRequest]] = {}
        for key in keys[:len(keys) - kept]:  # oldest first: ids start with the acceptance time
            try:
                req = self._read(key)
            except (KeyError, ValueError):
                continue  # gone meanwhile, or damaged: a damaged receipt stays where it is, reported
            by_day.setdefault(day_of(req.request_id), []).append(req)
        folded = 0
        for day, reqs in sorted(by_day.items()):
            key = self.index_key(day)
            try:
                rows = self._read_index(key)
            except KeyError:
                rows = {}
            except ValueError as exc:  # never write over a damaged index: it would lose its rows
                raise UnlearnError(f"{self._unreadable(key, exc).removesuffix('; skipped')}; receipts not "
                                   f"compacted") from None
            rows.update({r.request_id: r for r in reqs})
            body = {"day": day, "columns": list(INDEX_COLUMNS),
                    "rows": [[getattr(r, c) for c in INDEX_COLUMNS] for _, r in sorted(rows.items())]}
            if check is not None:
                check()
            self.store.put(key, json.dumps({**body, "check": sha256_hex(_canonical(body))}).encode())
            self.store.prune_versions(key)
            now = self._read_index(key)
            for req in reqs:
                if req.request_id in now:  # a receipt goes only once its row is readable
                    rkey = self.receipt_key(req.request_id)
                    self.store.delete(rkey)
                    folded += 1
        return folded

    # -- reading -----------------------------------------------------------------------------
    def queued_keys(self) -> list[str]:
        return self.store.list(f"{self.run}/queue/")

    def queued(self, copies: bool = True) -> tuple[list[DeletionRequest], list[str]]:
        """(queued requests in acceptance order, one line per queue object that cannot be
        read). `copies=False` returns the cached objects themselves, for callers that only
        look (the loop's is-a-batch-due check runs every 50 ms)."""
        out, problems = [], []
        keys = self.queued_keys()
        self._keep_parsed(keys)
        for key in keys:
            try:
                reqs = self._read_group(key)
            except KeyError:
                continue  # finished meanwhile
            except ValueError as exc:
                problems.append(self._unreadable(key, exc))
                continue
            out.extend(copy.copy(r) for r in reqs) if copies else out.extend(reqs)
        return sorted(out, key=lambda r: r.request_id), problems

    def _queued_one(self, request_id: str) -> DeletionRequest:
        """KeyError if no readable group holds it; ValueError if a group that could (named
        by an id no later than it) is damaged."""
        damaged = None
        for key in reversed(self.queued_keys()):  # its group is named by an id <= its own
            if self._id_of(key) > request_id:
                continue
            try:
                reqs = self._read_group(key)
            except KeyError:
                continue
            except ValueError as exc:
                damaged = damaged or (key, exc)
                continue
            for r in reqs:
                if r.request_id == request_id:
                    return copy.copy(r)
        if damaged is not None:
            raise _Damaged(*damaged)
        raise KeyError(request_id)

    def finished_among(self, request_ids: list[str]) -> set[str]:
        """Which of `request_ids` have a receipt, whole or compacted: one listing of the
        receipts and one read of each day's index involved, however many ids."""
        prefix = self.receipt_key("")[:-len(".json")]
        whole = {k[len(prefix):].removesuffix(".json") for k in self.receipt_keys()}
        done = {i for i in request_ids if i in whole}
        days: dict[str, list[str]] = {}
        for i in request_ids:
            if i not in done:
                days.setdefault(day_of(i), []).append(i)
        for day, ids in days.items():
            try:
                rows = self._read_index(self.index_key(day))
            except (KeyError, ValueError):  # none yet; a damaged one is reported where it is read
                continue
            done.update(i for i in ids if i in rows)
        return done

    def receipt(self, request_id: str) -> DeletionRequest | None:
        """Its receipt, whole or compacted; None if it has none (yet)."""
        try:
            return self._read(self.receipt_key(request_id))
        except KeyError:
            return self._index_of(request_id)

    def get(self, request_id: str) -> DeletionRequest:
        """The receipt if the request is done, else its queue entry."""
        if not valid_request_id(request_id):
            raise UnknownRequest(f"run {quote(self.run)}: no request {quote(request_id)}")
        # A request moves queue -> receipt -> index, each written before the last goes: read in
        # that order and once more, so one that moves meanwhile is still found.
        damaged = None
        for where in ("receipt", "queue", "index", "receipt", "index"):
            try:
                if where == "receipt":
                    found = self._read(self.receipt_key(request_id))
                elif where == "queue":
                    found = self._queued_one(request_id)
                else:
                    found = self._index_of(request_id)
            except KeyError:
                continue
            except _Damaged as exc:
                if where == "queue":  # it may be in the damaged group, or done meanwhile: look on
                    damaged = exc
                    continue
                raise
            except ValueError as exc:
                key = self.receipt_key(request_id) if where == "receipt" else self.index_key(day_of(request_id))
                raise UnlearnError(self._unreadable(key, exc).removesuffix("; skipped")) from None
            if found is not None:
                return found
        if damaged is not None:
            key, exc = damaged.args
            raise UnlearnError(self._unreadable(key, exc).removesuffix("; skipped")) from None
        raise UnknownRequest(f"run {quote(self.run)}: no request {quote(request_id)}")

    def entries(self) -> tuple[list[DeletionRequest], list[str]]:
        """Every request, done or queued, in acceptance order; and the unreadable ones."""
        queued, problems = self.queued()
        done = {}
        for key in self.receipt_keys():
            try:
                req = self._read(key)
            except KeyError:
                continue  # compacted meanwhile: its row is in the index, read next
            except ValueError as exc:
                problems.append(self._unreadable(key, exc))
                continue
            done[req.request_id] = req
        compacted = {}
        for key in self.index_keys():
            try:
                compacted.update(self._read_index(key))
            except KeyError:
                continue
            except ValueError as exc:
                problems.append(self._unreadable(key, exc))
        merged = {**{r.request_id: r for r in queued}, **compacted, **done}
        return sorted(merged.values(), key=lambda r: r.request_id), problems
