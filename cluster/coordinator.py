"""The deletion coordinator: a durable request log, batching, routing, receipts.

A request (ids and/or owners) is validated against the committed manifest and
written to the run's log in the store (`RUN/requests/<request id>.json`) BEFORE it is
acknowledged. Pending requests are then applied in batches: every request accepted
within `window_s` of the oldest pending one goes into one deletion, which retrains
only the affected shards (through whichever executor the run has: shard actors on
Ray, or in-process). Each request gets a receipt: accepted and completed times,
the shards its records lived in, the stages redone there, digests before and after.

Once a request is done its log entry keeps counts and receipts only: the ids and
owners it named are dropped (and every older version of the entry purged), so the
log does not retain what was deleted. A coordinator that restarts replays every
entry still pending or applying; re-applying is harmless because deleting the
same thing twice is a no-op.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

from sisa.errors import UnlearnError
from sisa.records import quote
from sisa.store import Store

from .methods import open_run

STATUSES = ("pending", "applying", "done", "failed")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class DeletionRequest:
    request_id: str
    accepted: str
    status: str = "pending"
    ids: list[str] = field(default_factory=list)  # cleared once done
    owners: list[str] = field(default_factory=list)  # cleared once done
    requested: dict = field(default_factory=dict)  # {"ids": n, "owners": n}
    ignore_missing: bool = False
    batch: list[str] = field(default_factory=list)  # request ids applied together
    records_deleted: int = 0
    already_deleted: int = 0
    shards: list[int] = field(default_factory=list)  # SISA shards, or ERASE partitions, holding its records
    stages_redone: dict = field(default_factory=dict)
    digests: dict = field(default_factory=dict)
    version: int | None = None
    retrain_fraction: float = 0.0  # of the whole batch
    purged_objects: int = 0  # of the whole batch
    warnings: list[str] = field(default_factory=list)
    completed: str | None = None
    seconds: float | None = None
    reason: str | None = None
    details: dict = field(default_factory=dict)  # method-specific receipt (ERASE: certificate, new selection)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "DeletionRequest":
        return cls(**d)


def batch_due(accepted_times: list[float], now: float, window_s: float) -> bool:
    """A batch is applied once its oldest pending request has waited `window_s`."""
    return bool(accepted_times) and now >= min(accepted_times) + window_s


class Coordinator:
    """Owns one run's request log; `apply_due` does the work. Thread-safe."""

    def __init__(self, store: Store, run: str, run_factory: Callable[[], object] | None = None,
                 window_s: float = 0.0, lock_holder: str | None = None):
        """`run_factory()` returns the run object to apply deletions with (a SisaRun with
        its executor, an EraseRun with its partition pool); default: in this process.
        `lock_holder`: a name that survives restarts of this coordinator (the Ray actor's
        id), so a restarted incarnation takes over its predecessor's run lock; None (the
        default) locks like any command, so two coordinators never apply at once."""
        self.store = store
        self.run = run
        self.window_s = window_s
        self.lock_holder = lock_holder
        self.run_factory = run_factory or (lambda: open_run(store, run))
        self._lock = threading.RLock()  # guards the pending set
        self._apply_lock = threading.Lock()  # one batch at a time
        self._accepted_at: dict[str, float] = {}
        # what may not answer predictions (SISA: shards; ERASE: record ids) -> requests not yet applied
        self._quarantine: dict[object, set[str]] = {}
        self._accepted_targets: deque[tuple[int, frozenset]] = deque(maxlen=10_000)  # (sequence, record ids)
        self._sequence = 0
        self.fault: str | None = None  # tests: exit the process at "after-commit"
        self.manifest = open_run(store, run).manifest  # the committed state
        self._head = self._read_head_pointer()
        for req in self.log():  # replay: anything not finished is pending again
            if req.status in ("pending", "applying"):
                self._accepted_at[req.request_id] = 0.0
                self._quarantine_request(req)

    # -- the log -----------------------------------------------------------------------
    def _key(self, request_id: str) -> str:
        return f"{self.run}/requests/{request_id}.json"

    def _write(self, req: DeletionRequest) -> None:
        self.store.put(self._key(req.request_id), json.dumps(req.to_json(), sort_keys=True).encode())
        self.store.prune_versions(self._key(req.request_id))

    def log(self) -> list[DeletionRequest]:
        out = []
        for key in self.store.list(f"{self.run}/requests/"):
            try:
                out.append(DeletionRequest.from_json(json.loads(self.store.get(key))))
            except KeyError:
                continue
            except (ValueError, TypeError) as exc:
                raise UnlearnError(f"{self.store.uri}/{key}: unreadable request log entry ({exc})") from None
        return sorted(out, key=lambda r: r.request_id)

    def get(self, request_id: str) -> DeletionRequest:
        try:
            return DeletionRequest.from_json(json.loads(self.store.get(self._key(request_id))))
        except KeyError:
            raise UnlearnError(f"run {quote(self.run)}: no request {quote(request_id)}") from None

    # -- intake --------------------------------------------------------------------------
    def submit(self, ids: list[str] = (), owners: list[str] = (), ignore_missing: bool = False) -> str:
        """Validate, log durably, then return the request id (the acknowledgement)."""
        ids, owners = list(ids), list(owners)
        if not ids and not owners:
            raise UnlearnError("a deletion request needs ids or owners")
        run = open_run(self.store, self.run)
        _targets, _already, unknown = run.resolve(ids, owners)
        if unknown and not ignore_missing:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UnlearnError(f"run {quote(self.run)}: unknown {unknown[0]}{more}; request not accepted, nothing was deleted")
        now = time.time()
        req = DeletionRequest(request_id=f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}", accepted=_iso(now),
                              ids=ids, owners=owners, requested={"ids": len(ids), "owners": len(owners)},
                              ignore_missing=ignore_missing)
        with self._lock:
            self._write(req)  # durable before acknowledged
            self._accepted_at[req.request_id] = now
            self._quarantine_request(req)
        return req.request_id

    # -- the committed state -------------------------------------------------------------
    def _read_head_pointer(self) -> bytes | None:
        try:
            return self.store.get(f"{self.run}/HEAD")
        except KeyError:
            return None

    def refresh(self) -> None:
        """Follow commits made outside this coordinator (another process deleting with
        `--runtime local`): one small read of HEAD, a reload only when it moved."""
        head = self._read_head_pointer()
        if head == self._head:
            return
        with self._apply_lock:  # not while a batch of ours is committing
            manifest = open_run(self.store, self.run).manifest
            with self._lock:
                self.manifest, self._head = manifest, self._read_head_pointer()

    # -- quarantine --------------------------------------------------------------------
    def _quarantine_request(self, req: DeletionRequest) -> None:
        """From acknowledgement until its batch commits, no shard holding one of the
        request's records (SISA), no prompt example among them (ERASE), may answer."""
        run = self._view()
        targets, _already, _unknown = run.resolve(req.ids, req.owners)
        for unit in run.quarantine_of(targets):
            self._quarantine.setdefault(unit, set()).add(req.request_id)
        self._sequence += 1
        self._accepted_targets.append((self._sequence, frozenset(targets)))

    def _view(self):
        """A read-only run object over the committed manifest (no store reads)."""
        if self.manifest.method == "erase":
            from erase.run import EraseRun

            return EraseRun(self.store, self.manifest)
        from sisa.run import SisaRun

        return SisaRun(self.store, self.manifest)

    def _release(self, batch: list[DeletionRequest]) -> None:
        ids = {r.request_id for r in batch}
        for shard in list(self._quarantine):
            self._quarantine[shard] -= ids
            if not self._quarantine[shard]:
                del self._quarantine[shard]

    def serving_view(self) -> tuple[set[int], list]:
        """(quarantined shards, committed shard entries), read together."""
        with self._lock:
            return set(self._quarantine), list(self.manifest.shards)

    def predict(self, texts: list[str], serve, method: str = "vote", wait: bool = False,
                timeout_s: float = 3600.0) -> dict:
        """Ensemble prediction that honours quarantine. `serve(entries, texts)` returns
        (checkpoint key, probabilities) per entry. An answer is used only if, after it
        came back, its shard is not quarantined and the key is the committed one: a
        deletion acknowledged meanwhile drops it. With wait=True, waits until no shard
        is quarantined and answers from all of them."""
        from sisa.run import format_predictions, stack_probabilities

        if self.manifest.method == "erase":
            return self._predict_in_context(texts, serve, wait, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            quarantined, entries = self.serving_view()
            if not (wait and quarantined):
                asked = [e for e in entries if e.records > 0 and e.shard not in quarantined]
                answers = serve(asked, texts) if asked else []
                quarantined_after, entries_after = self.serving_view()
                kept = [(e.shard, probs) for e, (key, probs) in zip(asked, answers)
                        if e.shard not in quarantined_after and entries_after[e.shard].checkpoints[-1] == key]
                if not wait or len(kept) == len(asked):
                    with self._lock:
                        manifest = self.manifest
                    probs = stack_probabilities([p for _, p in kept], len(texts), manifest.config)
                    out = format_predictions(manifest, texts, [k for k, _ in kept], probs, method)
                    out["quarantined"] = sorted(quarantined | quarantined_after)
                    return out
            if time.monotonic() > deadline:
                raise UnlearnError(f"run {quote(self.run)}: shards {sorted(quarantined)} still retraining "
                                   f"after {timeout_s:.0f} s")
            time.sleep(0.05)

    def _predict_in_context(self, texts: list[str], serve, wait: bool, timeout_s: float) -> dict:
        """ERASE: `serve(manifest, texts, exclude)` answers with the committed prompt minus
        the examples whose deletion is acknowledged (quarantine holds every record id a
        pending request targets, so an example selected later by an earlier batch is
        covered too). If a request accepted while the answer was computed names an example
        it used, the answer is dropped and asked again: that request may have been
        applied and released within the call. With wait=True, waits until nothing is
        quarantined."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            with self._lock:
                quarantined, manifest, seen = set(self._quarantine), self.manifest, self._sequence
            if not (wait and quarantined):
                out = serve(manifest, texts, sorted(quarantined & set(manifest.selected_ids)))
                with self._lock:
                    later = set().union(*(t for n, t in self._accepted_targets if n > seen))
                if not later & set(out["examples"]):
                    out["quarantined"] = sorted(quarantined & set(manifest.selected_ids))
                    return out
            if time.monotonic() > deadline:
                raise UnlearnError(f"run {quote(self.run)}: examples still being deleted after {timeout_s:.0f} s")
            time.sleep(0.05)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._accepted_at)

    # -- work --------------------------------------------------------------------------------
    def apply_due(self, now: float | None = None, progress: bool = False) -> list[DeletionRequest]:
        """Apply one batch if it is due; returns the finished requests (empty if none).
        Requests submitted while a batch is applied are acknowledged at once and wait
        for the next batch."""
        with self._apply_lock:
            with self._lock:
                now = time.time() if now is None else now
                if not batch_due(list(self._accepted_at.values()), now, self.window_s):
                    return []
                batch = [self.get(rid) for rid in sorted(self._accepted_at)]
            for req in batch:
                req.status = "applying"
                self._write(req)
            try:
                done = self._apply(batch, progress)
            except Exception as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                for req in batch:  # nothing was deleted; the log keeps counts, not what was asked
                    req.status, req.reason, req.completed = "failed", reason, _iso(time.time())
                    req.ids, req.owners = [], []
                    self._write(req)
                self._forget(batch)
                raise
            self._forget(done)
            return done

    def _forget(self, batch: list[DeletionRequest]) -> None:
        with self._lock:
            for req in batch:
                self._accepted_at.pop(req.request_id, None)
            self._release(batch)

    def _apply(self, batch: list[DeletionRequest], progress: bool) -> list[DeletionRequest]:
        t0 = time.perf_counter()
        run = self.run_factory()
        run.manifest = run.read_head(self.store, self.run)
        per_request = {}
        for req in batch:  # which shards (partitions) each request's own records live in, before the batch
            targets, already, _unknown = run.resolve(req.ids, req.owners)
            per_request[req.request_id] = (run.units_of(targets), len(targets), len(already))
        ids = sorted({i for r in batch for i in r.ids})
        owners = sorted({o for r in batch for o in r.owners})
        receipt = run.delete(ids=ids, owners=owners, ignore_missing=True, progress=progress,
                             lock_holder=self.lock_holder)
        with self._lock:
            self.manifest = run.manifest  # committed: serve the new shard versions from now on
            self._head = self._read_head_pointer()
        if self.fault == "after-commit":  # committed, receipts not yet written
            os._exit(17)
        finished = _iso(time.time())
        seconds = round(time.perf_counter() - t0, 3)
        for req in batch:
            units, n_targets, n_already = per_request[req.request_id]
            req.status, req.completed, req.seconds = "done", finished, seconds
            req.batch = [r.request_id for r in batch]
            req.records_deleted, req.already_deleted = n_targets, n_already
            req.shards = units
            if run.manifest.method == "sisa":
                req.stages_redone = {str(k): receipt.stages_redone.get(str(k), []) for k in units}
                req.digests = {str(k): receipt.digests[str(k)] for k in units if str(k) in receipt.digests}
            else:  # one clustering state for the whole run
                req.digests = dict(receipt.digests) if units else {}
            req.details = receipt.details
            req.version = receipt.version
            req.retrain_fraction, req.purged_objects = receipt.retrain_fraction, receipt.purged_objects
            req.warnings = receipt.warnings
            req.ids, req.owners = [], []  # the log keeps no trace of what was deleted
            self._write(req)
        return batch


class CoordinatorLoop:
    """Applies due batches in a background thread (for long-lived coordinators)."""

    def __init__(self, coordinator: Coordinator, poll_s: float = 0.05):
        self.coordinator = coordinator
        self.poll_s = poll_s
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unlearn-coordinator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.coordinator.apply_due():
                    self._stop.wait(self.poll_s)
            except Exception as exc:  # recorded in the failed requests' entries
                self.errors.append(str(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def wait_for(coordinator: Coordinator, request_id: str, timeout_s: float = 3600.0, poll_s: float = 0.1) -> DeletionRequest:
    deadline = time.monotonic() + timeout_s
    while True:
        req = coordinator.get(request_id)
        if req.status in ("done", "failed") or time.monotonic() > deadline:
            return req
        time.sleep(poll_s)


