"""What every method's run shares: a HEAD pointer to a manifest, commit, purge.

Storage layout under the run's prefix (the method adds its own object prefixes):

    RUN/HEAD                      pointer to the current manifest (the commit)
    RUN/LOCK                      held while a command mutates the run (core/lock.py)
    RUN/locks/                    the lock's heartbeat and takeover claims
    RUN/manifests/<sha256>.json   manifests: the run's settings, tombstones, and per unit (a
                                  SISA shard, an ERASE partition) its object's key and summary
    RUN/units/<sha256>.json       one unit's entry: its records' ids and owners, its objects' keys
                                  (core/units.py; manifest format 1 held these inline)
    RUN/queue/<id>.json           deletion requests accepted and not yet applied (cluster/)
    RUN/requests/<id>.json        receipts of applied deletion requests (cluster/)

Every mutation writes new objects, then the unit objects that changed, then a new
manifest, then HEAD, and only then purges what the new manifest no longer references
(every version of each object: a superseded unit object lists deleted ids). A crash
before HEAD leaves the previous state readable; a crash after it leaves garbage that the
next mutation purges first. What a deletion writes and reads grows with the units it
touches (and the number of units), not with the run's records.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterable

from .errors import ObjectMissing, UnlearnError
from .keys import sha256_hex
from .lock import RunLock, lock_key
from .records import id_problem, quote
from .store import Store
from .tombstones import Resolver
from .units import UNITS, SplitManifest, written


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run (it is the prefix of every key of the run), or None."""
    if not name:
        return "is empty"
    return id_problem(name)


def check_run_name(name: str) -> None:
    problem = run_name_problem(name)
    if problem:
        raise UnlearnError(f"--run {quote(name)}: {problem}")


def head_key(run: str) -> str:
    return f"{run}/HEAD"


def read_manifest_json(store: Store, run: str) -> tuple[str, bytes]:
    """(key, bytes) of the manifest HEAD names, with one-line errors."""
    try:
        mkey = json.loads(store.get(head_key(run)))["manifest"]
    except KeyError:
        raise UnlearnError(f"run {quote(run)} not found in store {store.uri}") from None
    except (ValueError, TypeError):
        raise UnlearnError(f"run {quote(run)}: {store.uri}/{head_key(run)} is not a valid pointer") from None
    try:
        return mkey, store.get(mkey)
    except KeyError:
        raise ObjectMissing(f"run {quote(run)}: manifest {mkey} is missing from {store.uri}") from None


def run_method(store: Store, run: str) -> str:
    """Which method ("sisa" or "erase") made the run."""
    check_run_name(run)
    mkey, data = read_manifest_json(store, run)
    try:
        return json.loads(data).get("method", "sisa")
    except (ValueError, AttributeError):
        raise UnlearnError(f"{store.uri}/{mkey}: unreadable manifest") from None


class StoredRun:
    """Base of SisaRun and EraseRun: `manifest` is a core.units.SplitManifest (MANIFEST its
    class); MANAGED names the sub-prefixes garbage collection owns."""

    MANAGED: tuple[str, ...] = ("manifests/", UNITS)
    MANIFEST: type = SplitManifest

    def __init__(self, store: Store, manifest):
        self.store = store
        self.manifest = manifest
        self._lock: RunLock | None = None  # held during a mutation
        self._resolver: tuple[object, Resolver] | None = None  # (the manifest it was built for, it)

    @property
    def name(self) -> str:
        return self.manifest.run

    @classmethod
    def read_head(cls, store: Store, run: str):
        """The manifest HEAD names (its unit objects are read on first use)."""
        mkey, data = read_manifest_json(store, run)
        manifest = cls.MANIFEST.loads(data, f"{store.uri}/{mkey}", store)
        manifest.key = mkey
        return manifest

    def read_for_verify(self) -> None:
        """Point this handle at the manifest HEAD names, every unit object read from the
        store now (and checked against its name), none from this process's cache."""
        from .units import fresh_reads

        with fresh_reads():
            manifest = self.read_head(self.store, self.name)
            manifest.units  # noqa: B018  (read now, inside fresh_reads)
        self.manifest = manifest

    def resolver(self) -> Resolver:
        """Resolves ids and owners against `manifest`; built once per manifest object (a
        commit makes a new one, none is changed in place) from the per-unit indexes, each
        built once per unit object: a batch of thousands of requests costs no pass over
        the records, and a commit that changed one shard re-indexes that shard alone."""
        if self._resolver is None or self._resolver[0] is not self.manifest:
            m = self.manifest
            self._resolver = (m, Resolver(m.indexes(), m.tombstones, m.salt))
        return self._resolver[1]

    def resolve(self, ids: Iterable[str] = (), owners: Iterable[str] = ()) -> tuple[set[str], list[str], list[str]]:
        """(ids to remove, requested ids/owners already deleted earlier, unknown ones)."""
        return self.resolver().resolve(ids, owners)

    @staticmethod
    def _head(run: str) -> str:
        return head_key(run)

    @classmethod
    def exists(cls, store: Store, run: str) -> bool:
        check_run_name(run)
        return store.exists(head_key(run))

    @classmethod
    def drop(cls, store: Store, run: str) -> int:
        """Purge every object (and version) of a run, HEAD last, so an interrupted drop
        can simply be re-run. Works without a HEAD too: a `train` killed before its
        commit leaves objects (training texts among them) and no HEAD."""
        check_run_name(run)
        with RunLock(store, run, "drop") as lock:
            mine = {head_key(run), lock_key(run)} | {k for k in store.list_all(f"{run}/locks/") if lock.token in k}
            keys = [k for k in store.list_all(f"{run}/") if k not in mine]
            for key in keys:
                store.delete(key)
            had_head = store.exists(head_key(run))
            store.delete(head_key(run))
            # a request appended while the first pass ran (its writer finds no HEAD and
            # removes it too, but do not count on that)
            late = [k for k in store.list_all(f"{run}/") if k not in mine]
            for key in late:
                store.delete(key)
        return len(keys) + len(late) + int(had_head)

    @staticmethod
    def leftovers(store: Store, run: str) -> list[str]:
        """Every key the run has in the store (committed or not, the lock included)."""
        check_run_name(run)
        return store.list_all(f"{run}/")

    @contextmanager
    def _locked(self, command: str, lock: RunLock | None = None):
        """Hold the run lock for one mutation, or use the one the caller holds (a
        coordinator applying a batch); `_commit` checks it is still held before HEAD."""
        if lock is None:
            with RunLock(self.store, self.name, command) as held:
                self._lock = held
                try:
                    yield held
                finally:
                    self._lock = None
        else:
            previous, self._lock = getattr(self, "_lock", None), lock
            try:
                yield lock
            finally:
                self._lock = previous

    def _manifest_key(self, manifest) -> str:
        return f"{self.name}/manifests/{sha256_hex(manifest.dumps())}.json"

    def _commit(self, manifest) -> int:
        """Write the unit objects the store lacks (those of the units that changed), the
        manifest, point HEAD at it (the commit), then purge everything the new manifest
        does not reference. A failed purge does not undo the commit: it is reported, and
        the next mutating command finishes it."""
        again = manifest is self.manifest  # re-committing the object held: rehash every unit
        manifest.seal(rehash=again)
        present = frozenset() if again else self.manifest.stored_units
        for (key, data), entry in zip(manifest.unit_objects(), manifest.units):
            if key not in present:
                self.store.put(key, data())
                written(self.store, key, entry)
        data = manifest.dumps()
        mkey = f"{self.name}/manifests/{sha256_hex(data)}.json"
        self.store.put(mkey, data)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.check()  # fenced: never commit after another process took the lock over
        self.store.put(head_key(self.name), json.dumps({"manifest": mkey}).encode())
        manifest.key, manifest.stored_units = mkey, frozenset(manifest.unit_keys())
        self.manifest = manifest
        try:
            self.store.prune_versions(head_key(self.name))
            return self._collect_garbage()
        except Exception as exc:
            print(f"unlearn: warning: committed, but the purge of superseded objects failed ({exc}); "
                  f"the next delete or drop finishes it", file=sys.stderr)
            return 0

    def _collect_garbage(self) -> int:
        """Purge every object (and object version) under the managed prefixes that the
        current manifest does not reference. Call only while holding the run lock."""
        keep = self.manifest.referenced_keys() | {self.manifest.key or self._manifest_key(self.manifest)}
        purged = 0
        for sub in self.MANAGED:
            for key in self.store.list_all(f"{self.name}/{sub}"):
                if key not in keep:
                    self.store.delete(key)
                    purged += 1
        return purged

    def _create(self, write: Callable[[], None]) -> None:
        """Under the run lock: refuse an existing run, purge the leftovers of an earlier
        create that died, then `write()` (objects, manifest, commit). If it fails nothing
        was committed, so everything it wrote is removed: the store is left as it was."""
        with self._locked("train"):
            if self.store.exists(head_key(self.name)):
                raise UnlearnError(f"run {quote(self.name)} already exists in {self.store.uri}; choose another --run")
            self._purge_uncommitted()
            try:
                write()
            except BaseException:
                try:
                    self._purge_uncommitted()
                except Exception as cleanup:  # keep the original error; say what is left
                    print(f"unlearn: warning: could not remove the partial run {quote(self.name)}: {cleanup}",
                          file=sys.stderr)
                raise

    def _purge_uncommitted(self) -> None:
        for key in self.store.list_all(f"{self.name}/"):
            if key != lock_key(self.name) and not key.startswith(f"{self.name}/locks/"):
                self.store.delete(key)
