"""The deletion coordinator: durable intake, one applier at a time, receipts.

A request (ids and/or owners) is validated against the committed state and appended to
the run's queue in the store (`requestlog.py`) BEFORE it is acknowledged. Requests that
arrive together are group-committed: while one thread writes a group, the others queue
up in memory, and the next of them writes all of those in one durable write (no timer:
a lone request is written at once, a busy front door forms larger groups by itself). From then on
it belongs to the log, not to the process that accepted it: whichever coordinator holds
the run lock applies every queued request (its own and those other processes accepted),
in batches: every request accepted within `window_s` of the oldest queued one goes
into one deletion, which retrains only the affected shards (through the run's executor:
shard actors on Ray, or in-process). A coordinator that finds the lock held by a live
process leaves the queue alone; that holder, or the next one, applies it.

An accepted request is never failed for a transient cause (lock held, actor or node
lost, store timeout, crash): it stays queued and is applied by the next attempt. Only a
permanent cause (a stored object that fails its integrity check) marks it `failed`, and
then it keeps its ids and its quarantine so that `unlearn resume --retry-failed` can
apply it once the store is repaired. Once done, the receipt keeps counts only: the ids
and owners it named are purged with every version of the queue entry.

Serving reads the same queue (`quarantine.py`), so nothing whose deletion is
acknowledged answers, whichever process acknowledged it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from core.errors import IntegrityError, UnlearnError, one_line
from core.lock import LockLost, LockWatch, RunBusy, RunLock, describe
from core.records import quote
from core.store import Store
from core.stored_run import head_key

from .methods import open_run
from .quarantine import Serving
from .requestlog import STATUSES, DeletionRequest, RequestLog  # noqa: F401 (re-export)
from .requestlog import receipts_kept as receipts_kept_default


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _epoch(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return 0.0  # unparseable: due at once


MAX_GROUP = 1024  # requests per group commit (a queue object of about 400 KB); a bulk is never split


@dataclass
class _Intake:
    """One request waiting to be group-committed: its thread waits on `done` until it
    has its `request_id` or `error`, or until it is asked to lead (write the next group)."""
    ids: list[str]
    owners: list[str]
    ignore_missing: bool
    done: threading.Event = field(default_factory=threading.Event)
    request_id: str | None = None
    error: BaseException | None = None
    siblings: list = field(default_factory=list, repr=False)  # its bulk (itself included): accepted or refused whole
    index: int = 0  # its place in the bulk


def _in_bulk(bulk: list, item, message: str) -> str:
    """`message` about `item`; in a bulk of several, which one it is and that none was accepted."""
    if len(bulk) <= 1 or item is None:
        return message
    return f"requests[{item.index}]: {message.replace('; request not accepted', '; no request of the bulk accepted')}"


def batch_due(accepted_times: list[float], now: float, window_s: float) -> bool:
    """A batch is applied once its oldest queued request has waited `window_s`."""
    return bool(accepted_times) and now >= min(accepted_times) + window_s


def is_permanent(exc: BaseException) -> bool:
    """Only a failed integrity check is permanent: retrying reads the same bad bytes.
    Everything else (lock held or lost, actor or node lost, store timeout) is retried."""
    return isinstance(exc, IntegrityError)


class Coordinator:
    """Intake and application of one run's deletions. Thread-safe."""

    def __init__(self, store: Store, run: str, run_factory: Callable[[], object] | None = None,
                 window_s: float = 0.0, receipts_kept: int | None = None):
        """`run_factory()` returns the run object to apply deletions with (a SisaRun with
        its executor, an EraseRun with its partition pool); default: in this process.
        `receipts_kept`: receipts kept whole, older ones are compacted (default
        `$UNLEARN_RECEIPTS_KEPT` or 1000; see requestlog.py)."""
        self.store = store
        self.run = run
        self.window_s = window_s
        self.receipts_kept = receipts_kept if receipts_kept is not None else receipts_kept_default()
        self.run_factory = run_factory or (lambda: open_run(store, run))
        self.requests = RequestLog(store, run)
        self.serving = Serving(store, run)
        self.committed, self.quarantine = self.serving.committed, self.serving.quarantine
        self._apply_lock = threading.Lock()  # one batch at a time in this process
        self.busy: str | None = None  # who held the run lock at our last try
        self._watch = LockWatch()  # a holder elsewhere is judged by its heartbeat across our tries
        self.problems: list[str] = []  # unreadable log entries seen (reported once each)
        self.fault: str | None = None  # tests: exit the process at "after-commit"
        self._intake_lock = threading.Lock()
        self._intake: list[_Intake] = []  # waiting for the group being written to be durable
        self._committing = False  # a thread is writing a group
        self._intake_run: tuple[bytes, object] | None = None  # (HEAD's bytes, the run opened at it)
        self._last_ns = 0  # request ids keep increasing within this process
        self.groups_written = 0
        self.committed.read()
        # what was queued before this coordinator started is a replay (after a crash, or
        # accepted by another process): due at once, whatever the window
        self._replay = set(self.pending())

    @property
    def manifest(self):
        return self.committed.read()

    def _report(self, problems: list[str]) -> None:
        for line in problems:
            if line not in self.problems:
                self.problems.append(line)
                print(f"unlearn: warning: {line}", file=sys.stderr, flush=True)

    # -- the log -----------------------------------------------------------------------
    def log(self) -> list[DeletionRequest]:
        entries, problems = self.requests.entries()
        self._report(problems)
        return entries

    def get(self, request_id: str) -> DeletionRequest:
        return self.requests.get(request_id)

    def pending(self) -> list[str]:
        queued, problems = self.requests.queued()
        self._report(problems)
        return [r.request_id for r in queued if r.status != "failed"]

    # -- intake --------------------------------------------------------------------------
    def submit(self, ids: list[str] = (), owners: list[str] = (), ignore_missing: bool = False) -> str:
        """Validate, log durably, then return the request id (the acknowledgement).

        Group commit: the first caller writes its group; callers that arrive meanwhile wait,
        and when that write is durable the first of them writes all of theirs at once. Each
        request is validated on its own (a bad one fails alone); the group's one write is what
        acknowledges them all, so none is acknowledged before it is durable."""
        (out,) = self.submit_bulk([[(ids, owners, ignore_missing)]])
        if isinstance(out, BaseException):
            raise out
        return out[0]

    def submit_bulk(self, bulks: list[list[tuple[list[str], list[str], bool]]]) -> list[list[str] | BaseException]:
        """Bulks of requests, each request `(ids, owners, ignore_missing)`, from one caller
        (an HTTP front end's batch of POST /delete). A bulk is accepted whole (its request
        ids, in order, once durable) or refused whole (the exception, naming the request by
        its index); bulks succeed or fail apart. They join the same group commit as `submit`."""
        mine: list[list[_Intake]] = []
        refused: dict[int, BaseException] = {}  # bulks refused before the intake (an empty one holds no item)
        todo: list[_Intake] = []
        for b, bulk in enumerate(bulks):
            items = [_Intake(list(ids), list(owners), bool(im)) for ids, owners, im in bulk]
            for i, item in enumerate(items):
                item.siblings, item.index = items, i
            empty = next((item for item in items if not item.ids and not item.owners), None)
            typed = next((item for item in items
                          if not all(isinstance(v, str) for v in (*item.ids, *item.owners))), None)
            if not items or empty is not None or typed is not None:
                error = UnlearnError(_in_bulk(items, empty or typed, "a deletion request needs ids or owners"
                                              if typed is None else "ids and owners must be strings; request "
                                              "not accepted, nothing was deleted"))
                refused[b] = error
                for item in items:
                    item.error = error
            else:
                todo += items
            mine.append(items)
        if todo:
            with self._intake_lock:
                self._intake.extend(todo)
                lead = not self._committing
                self._committing = True
            try:
                for item in todo:
                    while item.request_id is None and item.error is None:
                        # `done` without an answer: the last writer handed the next group to us
                        if lead or item.done.is_set():
                            lead = False
                            self._write_next_group()
                        else:
                            item.done.wait()
            except BaseException:
                self._leave_intake(todo, lead)
                raise
        out: list[list[str] | BaseException] = []
        for b, items in enumerate(mine):
            error = refused.get(b) or next((item.error for item in items if item.error is not None), None)
            out.append(error if error is not None else [item.request_id for item in items])
        return out

    def _leave_intake(self, items: list[_Intake], lead: bool) -> None:
        """A caller leaves with an exception (KeyboardInterrupt, an asynchronous one) while its
        requests wait: they are taken out unwritten (never acknowledged), and if the lead was
        ours (not yet taken), it passes on, else nobody would write another group."""
        with self._intake_lock:
            mine = {id(item) for item in items}
            if not any(id(item) in mine for item in self._intake):
                if lead and not self._intake:
                    self._committing = False
                elif lead:
                    self._intake[0].done.set()
                return
            # the lead is handed by setting `done` on the head of the intake
            handed = lead or (self._intake and id(self._intake[0]) in mine and self._intake[0].done.is_set())
            self._intake = [item for item in self._intake if id(item) not in mine]
            if handed:
                if self._intake:
                    self._intake[0].done.set()
                else:
                    self._committing = False

    def _write_next_group(self) -> None:
        with self._intake_lock:
            n = min(MAX_GROUP, len(self._intake))
            while n < len(self._intake) and self._intake[n].siblings is self._intake[n - 1].siblings:
                n += 1  # a bulk is never split between two writes
            group, self._intake = self._intake[:n], self._intake[n:]
        try:
            self._write_group(group)
        except BaseException as exc:  # nothing of this group is acknowledged; every caller hears why
            for item in group:
                if item.request_id is None and item.error is None:
                    item.error = exc
        finally:
            with self._intake_lock:
                for item in group:
                    item.done.set()
                if self._intake:
                    self._intake[0].done.set()  # no answer yet: it leads the next group
                else:
                    self._committing = False

    def _run_for_intake(self):
        """The run at its committed state, opened again only when HEAD changed: validating
        a request then costs a look-up, not a read of the manifest."""
        try:
            head = self.store.get(head_key(self.run))
        except KeyError:
            raise UnlearnError(f"run {quote(self.run)} not found in store {self.store.uri}") from None
        if self._intake_run is None or self._intake_run[0] != head:
            self._intake_run = (head, open_run(self.store, self.run))
        return self._intake_run[1]

    def _same_training(self, run) -> bool:
        """Whether the run now at HEAD is the training `run` was opened at (a commit since is
        fine: records never move between shards; a new training of the name has a new salt)."""
        try:
            now = self._run_for_intake()
        except Exception:  # noqa: BLE001 (unreadable or gone: not provably the same)
            return False
        return (now.manifest.method, now.manifest.salt) == (run.manifest.method, run.manifest.salt)

    def _write_group(self, group: list[_Intake]) -> None:
        run = self._run_for_intake()
        base = max(time.time_ns(), self._last_ns + 1)
        accepted: list[tuple[_Intake, DeletionRequest]] = []
        now = _iso(time.time())
        units: dict[int, list] = {}
        for item in group:
            try:  # whatever one request raises refuses its bulk, never the others of the group
                targets, _already, unknown = run.resolve(item.ids, item.owners)
                if unknown and not item.ignore_missing:
                    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                    raise UnlearnError(_in_bulk(item.siblings, item, f"run {quote(self.run)}: unknown {unknown[0]}"
                                                                     f"{more}; request not accepted, nothing was deleted"))
                units[id(item)] = sorted(run.quarantine_of(targets))
            except Exception as exc:
                error = exc if isinstance(exc, UnlearnError) else UnlearnError(_in_bulk(
                    item.siblings, item, f"run {quote(self.run)}: request not accepted, nothing was deleted "
                                         f"({type(exc).__name__}: {exc})"))
                for sibling in item.siblings:  # its bulk is refused whole
                    sibling.error = sibling.error or error
        for item in group:
            if item.error is None:
                req = DeletionRequest(request_id=f"{base + len(accepted):020d}-{uuid.uuid4().hex[:8]}", accepted=now,
                                      ids=item.ids, owners=item.owners, units=units[id(item)],
                                      ignore_missing=item.ignore_missing,
                                      requested={"ids": len(item.ids), "owners": len(item.owners)})
                accepted.append((item, req))
        self._last_ns = base + len(accepted)
        if not accepted:
            return
        validated = self._intake_run[0]
        group_id = self.requests.append([req for _item, req in accepted])  # durable before acknowledged
        try:
            head = self.store.get(head_key(self.run))
        except KeyError:  # dropped meanwhile: leave nothing behind
            self.requests.drop_group(group_id)
            raise UnlearnError(f"run {quote(self.run)} was dropped while the request was accepted; nothing to delete") from None
        if head != validated and not self._same_training(run):
            # dropped and trained again meanwhile: `units` name the old run's shards, not the
            # ones that hold the records now; the group must not quarantine by them
            self.requests.drop_group(group_id)
            raise UnlearnError(f"run {quote(self.run)} was trained again while the request was accepted; request not "
                               f"accepted, submit it again")
        self.groups_written += 1
        for item, req in accepted:  # from now on serving leaves `units` out
            item.request_id = req.request_id

    # -- serving ---------------------------------------------------------------------------
    def predict(self, texts: list[str], serve, method: str = "vote", wait: bool = False,
                timeout_s: float = 3600.0) -> dict:
        """Ensemble prediction that honours every queued deletion in the store (see
        quarantine.Serving for `serve`)."""
        out = self.serving.predict(texts, serve, method, wait, timeout_s)
        self._report(self.quarantine.problems)
        return out

    def generate(self, prompts: list[str], next_probs, max_new_tokens: int = 32, shard: int | None = None,
                 wait: bool = False, timeout_s: float = 3600.0) -> dict:
        """Ensemble generation (SISA-LM) under the same quarantine as predict."""
        manifest = self.serving.committed.read()
        if getattr(manifest.config, "objective", None) != "lm":
            raise UnlearnError(f"run {self.run} is a classifier (objective classify): only runs trained with "
                               "--objective lm generate text")
        if shard is not None and not 0 <= shard < manifest.config.shards:
            raise UnlearnError(f"shard {shard}: run {self.run} has shards 0..{manifest.config.shards - 1}")
        if shard is not None and not manifest.shards[shard].records:
            raise UnlearnError(f"shard {shard}: run {self.run}'s shard {shard} holds no records")
        out = self.serving.generate(prompts, next_probs, max_new_tokens, shard, wait, timeout_s)
        self._report(self.quarantine.problems)
        return out

    def quarantined(self) -> list:
        return sorted(self.quarantine.read())

    # -- work --------------------------------------------------------------------------------
    def apply_due(self, now: float | None = None, progress: bool = False) -> list[DeletionRequest]:
        """Apply one batch if one is due and the run lock is free (or its holder is gone);
        returns the requests finished (empty if none). When another live process holds the
        lock, `busy` says who, and the queue is left to it."""
        with self._apply_lock:
            queued, problems = self.requests.queued(copies=False)
            self._report(problems)
            todo = [r for r in queued if r.status != "failed"]
            now = time.time() if now is None else now
            accepted = [0.0 if r.request_id in self._replay else _epoch(r.accepted) for r in todo]
            if not batch_due(accepted, now, self.window_s):
                return []
            try:
                lock = RunLock(self.store, self.run, "delete", watch=self._watch).acquire()
            except RunBusy as exc:
                self.busy = one_line(exc)
                return []
            self.busy = None
            try:
                return self._apply_locked(lock, progress)
            finally:
                lock.release()

    def _apply_locked(self, lock: RunLock, progress: bool) -> list[DeletionRequest]:
        self._sweep()
        queued, _problems = self.requests.queued()  # again, now that we own the log
        finished = self.requests.finished_among([r.request_id for r in queued])
        if finished:
            self.requests.drop_queued(sorted(finished))  # done before a crash took its cleanup
        batch = [r for r in queued if r.request_id not in finished and r.status != "failed"]
        if not batch:
            return []
        took_over = (f"took over the run lock: {describe(lock.took_over)} ({lock.took_over['why']})"
                     if lock.took_over else None)
        for req in batch:
            req.status, req.attempts, req.reason = "applying", req.attempts + 1, None
            if took_over:  # kept with the request until its receipt: the audit trail of a crash
                req.warnings = [*req.warnings, took_over]
        self.requests.update(batch)
        try:
            done = self._apply(batch, progress, lock)
        except BaseException as exc:
            if isinstance(exc, LockLost):
                raise  # the new holder owns these entries now: not ours to rewrite
            if is_permanent(exc) and len(batch) > 1:
                # one damaged object must not fail the others: apply each request alone
                done = self._apply_one_by_one(batch, progress, lock)
                self._tidy(lock)
                return done
            self._settle(batch, exc, lock)
            raise
        self._tidy(lock)
        return done

    def _tidy(self, lock: RunLock) -> None:
        """Keep the receipts folder bounded (requestlog.compact) and remove what writers
        killed during this batch left (a submitter's queue entry). The batch is committed
        and receipted already: a failure here is a warning, and the next batch tries again."""
        try:
            self.requests.compact(self.receipts_kept, check=lock.check)
            self._sweep()
        except Exception as exc:
            print(f"unlearn: warning: run {self.run}: old receipts or temporary files left for the next batch "
                  f"({one_line(exc) if str(exc) else type(exc).__name__})", file=sys.stderr, flush=True)

    def _apply_one_by_one(self, batch: list[DeletionRequest], progress: bool, lock: RunLock) -> list[DeletionRequest]:
        done, failed = [], None
        for i, req in enumerate(batch):
            try:
                done += self._apply([req], progress, lock)
            except BaseException as exc:
                if isinstance(exc, LockLost):
                    raise
                if not is_permanent(exc):
                    self._settle(batch[i:], exc, lock)  # this one and the rest: queued again
                    raise
                self._settle([req], exc, lock)
                failed = failed or exc
        if failed is not None and not done:
            raise failed
        return done

    def _settle(self, batch: list[DeletionRequest], exc: BaseException, lock: RunLock) -> None:
        """After a failed attempt: a permanent cause marks the requests failed, a transient
        one queues them again; both keep their ids and quarantine (still to be applied)."""
        line = one_line(exc) if str(exc) else type(exc).__name__
        try:
            lock.check()
            for req in batch:
                if is_permanent(exc):
                    req.status, req.reason = "failed", (f"{line}; kept for retry: `unlearn resume --run {self.run} "
                                                        f"--retry-failed` once repaired")
                else:
                    req.status = "pending"
                req.last_error = line
            self.requests.update(batch)
        except Exception:  # the lock is gone or the store is down: the entries stay as they are
            pass

    def sweep(self) -> bool:
        """Remove what killed writers left, now, if the run lock is free (`resume` with
        nothing queued: otherwise only the next batch would). False if another process
        holds the lock: it sweeps after its batch."""
        try:
            lock = RunLock(self.store, self.run, "resume", watch=self._watch).acquire()
        except RunBusy:
            return False
        try:
            self._sweep()
        finally:
            lock.release()
        return True

    def _sweep(self) -> None:
        """Temporary files that killed writers left (they may name deleted ids). A file names
        its writer (core/store.py): one whose writer on this machine is gone is removed at
        once. Others (another machine's) anywhere in the run once two minutes old (any
        process appends to the queue or tries the lock, so a younger one may be a write in
        progress), and in `requests/` at once, since only the lock holder, which is us,
        writes there."""
        for prefix, age in ((f"{self.run}/", 120), (f"{self.run}/requests/", 0)):
            for key in self.store.stale_temporary(prefix, older_than_s=age):
                self.store.delete(key)
        # A holder killed between rewriting a group without its finished requests and pruning
        # the group's older versions left versions naming them; the current version no longer
        # holds them, so nothing else would ever look again. Only the lock holder rewrites a
        # group: pruning keeps the current version. A damaged group keeps its versions (an
        # older one may be what restores it).
        for key in self.requests.queued_keys():
            try:
                self.requests._read_group(key)
            except (KeyError, ValueError):
                continue
            self.store.prune_versions(key)

    def discard_damaged(self, on_wait: Callable[[str], None] | None = None) -> list[str]:
        """Remove queue entries that fail their checks (after restoring what can be restored:
        nothing in them can be trusted, so they are never applied, and while they are there
        nothing answers). Returns the keys removed; their deletions must be submitted again."""
        with RunLock(self.store, self.run, "resume", wait=True, on_wait=on_wait, watch=self._watch):
            gone = []
            for key in self.requests.queued_keys():
                try:
                    self.requests._read_group(key)
                except KeyError:
                    continue
                except ValueError as exc:
                    print(f"unlearn: warning: {self.requests._unreadable(key, exc).removesuffix('; skipped')}; "
                          f"removed", file=sys.stderr)
                    self.store.delete(key)
                    gone.append(key)
        return gone

    def requeue_failed(self, on_wait: Callable[[str], None] | None = None) -> list[str]:
        """Queue the failed requests again (once the store is repaired): they keep their
        ids, so the next batch applies them. Rewriting the log needs the run lock."""
        with RunLock(self.store, self.run, "resume", wait=True, on_wait=on_wait, watch=self._watch):
            queued, problems = self.requests.queued()
            self._report(problems)
            again = [req for req in queued if req.status == "failed"]
            for req in again:
                req.status, req.reason = "pending", None
            if again:
                self.requests.update(again)
        return [req.request_id for req in again]

    def _apply(self, batch: list[DeletionRequest], progress: bool, lock: RunLock) -> list[DeletionRequest]:
        t0 = time.perf_counter()
        run = self.run_factory()
        run.manifest = run.read_head(self.store, self.run)
        per_request = {}
        for req in batch:  # which shards (partitions) each request's own records live in, before the batch
            targets, already, unknown = run.resolve(req.ids, req.owners)
            per_request[req.request_id] = (run.units_of(targets), len(targets), len(already), len(unknown))
        ids = sorted({i for r in batch for i in r.ids})
        owners = sorted({o for r in batch for o in r.owners})
        receipt = run.delete(ids=ids, owners=owners, ignore_missing=True, progress=progress, lock=lock)
        if self.fault == "after-commit":  # committed, receipts not yet written
            os._exit(17)
        finished = _iso(time.time())
        seconds = round(time.perf_counter() - t0, 3)
        for req in batch:
            units, n_targets, n_already, n_unknown = per_request[req.request_id]
            req.status, req.completed, req.seconds, req.last_error = "done", finished, seconds, None
            req.batch_id, req.batch_size = batch[0].request_id, len(batch)
            req.records_deleted, req.already_deleted_count, req.not_found_count = n_targets, n_already, n_unknown
            req.shards = units
            if run.manifest.method == "sisa":
                req.stages_redone = {str(k): receipt.stages_redone[str(k)] for k in units  # none: approximate
                                     if str(k) in receipt.stages_redone}
                req.digests = {str(k): receipt.digests[str(k)] for k in units if str(k) in receipt.digests}
            else:  # one clustering state for the whole run
                req.digests = dict(receipt.digests) if units else {}
            req.details = receipt.details
            req.version = receipt.version
            req.retrain_fraction, req.purged_objects = receipt.retrain_fraction, receipt.purged_objects
            req.warnings = [*req.warnings, *receipt.warnings]
        self.requests.finish(batch)  # the receipts keep no trace of what was deleted
        return batch


class CoordinatorLoop:
    """Applies due batches in a background thread (for long-lived coordinators). A
    transient failure is retried with a growing pause (up to 30 s); the request stays
    queued and quarantined meanwhile."""

    def __init__(self, coordinator: Coordinator, poll_s: float = 0.05):
        self.coordinator = coordinator
        self.poll_s = poll_s
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unlearn-coordinator", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pause = 0.0
        while not self._stop.is_set():
            try:
                if self.coordinator.apply_due():
                    pause = 0.0
                    continue
                # nothing due, or another live process holds the lock and applies the queue
                self._stop.wait(self.poll_s if self.coordinator.busy is None else max(self.poll_s, 0.5))
            except Exception as exc:
                self.errors.append(one_line(exc) if str(exc) else type(exc).__name__)
                pause = min(30.0, max(0.5, pause * 2))
                print(f"unlearn: warning: run {self.coordinator.run}: deletion not applied yet ({self.errors[-1]}); "
                      f"retrying in {pause:.1f} s", file=sys.stderr, flush=True)
                self._stop.wait(pause)

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
