"""A SISA run on a store: train, delete, verify, status, predict, evaluate.

The run owns the manifest and the commit; the per-shard work goes through an
executor (`sisa/shard.py`): in this process by default (no Ray, usable from a
notebook), or in Ray shard actors (`cluster/`). Storage layout under the run's prefix:

    RUN/HEAD                              pointer to the current manifest (the commit)
    RUN/LOCK                              held while a command mutates the run
    RUN/manifests/<sha256>.json           manifests
    RUN/data/<sha256>.jsonl               records of one slice, content-addressed
    RUN/ckpt/<shard>/<stage>-<key>.safetensors   state after a stage; key = checkpoint_key()

Every mutation writes new objects, then a new manifest, then HEAD, and only then
purges what the new manifest no longer references (old checkpoints, old slice data,
old manifests, every version of each). A crash before HEAD leaves the previous
state readable; a crash after it leaves garbage that the next mutation purges first.
"""
from __future__ import annotations

import hmac
import json
import os
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Iterable, Sequence

import numpy as np

from .aggregate import aggregate, vote_counts
from .config import SisaConfig
from .errors import UnlearnError
from .keys import sha256_hex
from .lock import RunLock, lock_key
from .manifest import DeletionReceipt, Manifest
from .plan import apply_deletion, build_layout, plan_deletion, retrain_fraction, stage_ids
from .records import Record, id_problem, quote
from .shard import Executor, LocalExecutor, RetrainJob, TrainJob, get_trainer  # noqa: F401 (re-export)
from .store import Store

MANAGED = ("manifests/", "data/", "ckpt/")  # sub-prefixes that garbage collection owns


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_run_name(name: str) -> None:
    if not name:
        raise UnlearnError("--run: empty run name")
    problem = id_problem(name)
    if problem:
        raise UnlearnError(f"--run {quote(name)}: {problem}")


def with_labels(config: SisaConfig, records: Sequence[Record]) -> SisaConfig:
    """Fix the label set (the sorted labels of the data unless given) and check every record."""
    if not config.labels:
        labels = sorted({r.label for r in records})
        if len(labels) < 2:
            raise UnlearnError(f"the data has a single label {labels}; a classifier needs two or more")
        config = SisaConfig.from_json({**config.to_json(), "labels": labels})
    known = set(config.labels)
    for r in records:
        if r.label not in known:
            raise UnlearnError(f"record {quote(r.id)}: label {quote(r.label)} is not one of {list(config.labels)}")
    return config


def stack_probabilities(probs: Sequence[np.ndarray], n: int, config: SisaConfig) -> np.ndarray:
    return np.stack(probs) if len(probs) else np.zeros((0, n, len(config.labels)))


def format_predictions(manifest: Manifest, texts: Sequence[str], shards: Sequence[int], probs: np.ndarray,
                       method: str) -> dict:
    """The ensemble's answer: label, probabilities and votes per text, and which shards answered."""
    weights = [manifest.shards[k].records for k in shards]
    labels, agg = aggregate(probs, method, weights)
    names = manifest.config.labels
    votes = vote_counts(probs)
    return {
        "aggregate": method, "shards": list(shards),
        "predictions": [{"text": t, "label": names[int(i)],
                         "probabilities": {n: round(float(p), 6) for n, p in zip(names, row)},
                         "votes": {n: int(v) for n, v in zip(names, vrow)}}
                        for t, i, row, vrow in zip(texts, labels, agg, votes)],
    }


class SisaRun:
    def __init__(self, store: Store, manifest: Manifest, executor: Executor | None = None):
        self.store = store
        self.manifest = manifest
        self.executor = executor

    # -- naming ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.run

    @property
    def config(self) -> SisaConfig:
        return self.manifest.config

    @staticmethod
    def _head(run: str) -> str:
        return f"{run}/HEAD"

    def _tombstone(self, kind: str, value: str) -> str:
        return hmac.new(bytes.fromhex(self.manifest.salt), f"{kind}\x1f{value}".encode(), "sha256").hexdigest()

    def _executor(self, progress: bool) -> Executor:
        return self.executor or LocalExecutor(self.store, self.name, self.config, progress)

    # -- open / commit -------------------------------------------------------------
    @classmethod
    def exists(cls, store: Store, run: str) -> bool:
        check_run_name(run)
        return store.exists(cls._head(run))

    @classmethod
    def drop(cls, store: Store, run: str) -> int:
        """Purge every object (and version) of a run, HEAD last, so an interrupted drop
        can simply be re-run."""
        check_run_name(run)
        with RunLock(store, run, "drop"):
            keys = [k for k in store.list_all(f"{run}/") if k not in (cls._head(run), lock_key(run))]
            for key in keys:
                store.delete(key)
            store.delete(cls._head(run))
        return len(keys) + 1

    @classmethod
    def read_head(cls, store: Store, run: str) -> Manifest:
        try:
            mkey = json.loads(store.get(cls._head(run)))["manifest"]
        except KeyError:
            raise UnlearnError(f"run {quote(run)} not found in store {store.uri}") from None
        except (ValueError, TypeError):
            raise UnlearnError(f"run {quote(run)}: {store.uri}/{cls._head(run)} is not a valid pointer") from None
        try:
            return Manifest.loads(store.get(mkey), f"{store.uri}/{mkey}")
        except KeyError:
            raise UnlearnError(f"run {quote(run)}: manifest {mkey} is missing from {store.uri}") from None

    @classmethod
    def open(cls, store: Store, run: str, executor: Executor | None = None) -> "SisaRun":
        check_run_name(run)
        return cls(store, cls.read_head(store, run), executor)

    def _manifest_key(self, manifest: Manifest) -> str:
        return f"{self.name}/manifests/{sha256_hex(manifest.dumps())}.json"

    def _commit(self, manifest: Manifest) -> int:
        """Write the manifest, point HEAD at it (the commit), then purge everything the
        new manifest does not reference. A failed purge does not undo the commit: it is
        reported, and the next mutating command finishes it."""
        mkey = self._manifest_key(manifest)
        self.store.put(mkey, manifest.dumps())
        self.store.put(self._head(self.name), json.dumps({"manifest": mkey}).encode())
        self.manifest = manifest
        try:
            self.store.prune_versions(self._head(self.name))
            return self._collect_garbage()
        except Exception as exc:
            print(f"unlearn: warning: committed, but the purge of superseded objects failed ({exc}); "
                  f"the next delete or drop finishes it", file=sys.stderr)
            return 0

    def _collect_garbage(self) -> int:
        """Purge every object (and object version) under the managed prefixes that the
        current manifest does not reference. Call only while holding the run lock."""
        keep = self.manifest.referenced_keys() | {self._manifest_key(self.manifest)}
        purged = 0
        for sub in MANAGED:
            for key in self.store.list_all(f"{self.name}/{sub}"):
                if key not in keep:
                    self.store.delete(key)
                    purged += 1
        return purged

    # -- training ------------------------------------------------------------------
    @classmethod
    def train(cls, store: Store, run: str, records: Sequence[Record], config: SisaConfig,
              progress: bool = False, executor: Executor | None = None) -> "SisaRun":
        check_run_name(run)
        store.check()
        config = with_labels(config, records)
        layout = build_layout(((r.id, r.owner) for r in records), config.seed, config.shards, config.slices)
        by_id = {r.id: r for r in records}
        now = _now()
        manifest = Manifest(run=run, config=config, shards=[], salt=os.urandom(16).hex(), created=now, updated=now)
        self = cls(store, manifest, executor)
        jobs = [TrainJob(k, [[by_id[i] for i in ids] for ids in shard]) for k, shard in enumerate(layout)]
        with RunLock(store, run, "train"):
            if store.exists(cls._head(run)):
                raise UnlearnError(f"run {quote(run)} already exists in {store.uri}; choose another --run")
            self._purge_uncommitted()  # leftovers of an earlier train that died
            try:
                manifest.shards = self._executor(progress).train(jobs)
                self._commit(manifest)
            except BaseException:
                try:  # nothing was committed: leave the store as it was
                    self._purge_uncommitted()
                except Exception as cleanup:  # keep the original error; say what is left
                    print(f"unlearn: warning: could not remove the partial run {quote(run)}: {cleanup}",
                          file=sys.stderr)
                raise
        return self

    def _purge_uncommitted(self) -> None:
        for key in self.store.list_all(f"{self.name}/"):
            if key != lock_key(self.name):
                self.store.delete(key)

    # -- deletion ------------------------------------------------------------------
    def resolve(self, ids: Iterable[str] = (), owners: Iterable[str] = ()) -> tuple[set[str], list[str], list[str]]:
        """(ids to remove, requested ids/owners already deleted earlier, unknown ones)."""
        held = self.manifest.owners()
        by_owner: dict[str, list[str]] = defaultdict(list)
        for rid, owner in held.items():
            by_owner[owner].append(rid)
        tombs = set(self.manifest.tombstones)
        targets: set[str] = set()
        already: list[str] = []
        unknown: list[str] = []
        for kind, values, table in (("id", ids, None), ("owner", owners, by_owner)):
            for v in values:
                if (v in held) if table is None else (v in table):
                    targets.update([v] if table is None else table[v])
                elif self._tombstone(kind, v) in tombs:
                    already.append(v)
                else:
                    unknown.append(f"{kind} {quote(v)}")
        return targets, already, unknown

    def delete(self, ids: Iterable[str] = (), owners: Iterable[str] = (), ignore_missing: bool = False,
               progress: bool = False, lock_holder: str | None = None) -> DeletionReceipt:
        with RunLock(self.store, self.name, "delete", holder=lock_holder):
            self.manifest = self.read_head(self.store, self.name)  # a stale handle acts on the current state
            return self._delete_locked(list(ids), list(owners), ignore_missing, progress)

    def _delete_locked(self, ids: list[str], owners: list[str], ignore_missing: bool,
                       progress: bool) -> DeletionReceipt:
        t0 = time.perf_counter()
        targets, already, unknown = self.resolve(ids, owners)
        if unknown and not ignore_missing:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UnlearnError(f"run {quote(self.name)}: unknown {unknown[0]}{more}; nothing was deleted")
        self._collect_garbage()  # leftovers of an interrupted command go first
        old = self.manifest
        plan = plan_deletion(old.layout(), targets)
        receipt = DeletionReceipt(run=self.name, ids=sorted(targets), already_deleted=already, shards=[],
                                  stages_redone={}, digests={}, retrain_fraction=0.0, purged_objects=0,
                                  version=old.version, seconds=0.0)
        if not plan:
            receipt.seconds = round(time.perf_counter() - t0, 3)
            return receipt
        R = self.config.slices
        new_layout = apply_deletion(old.layout(), targets)
        jobs = [RetrainJob(old.shards[d.shard], d.removed, d.first_stage) for d in plan]
        try:
            entries = self._executor(progress).retrain(jobs)
        except BaseException:
            self._collect_garbage()  # HEAD still names the old manifest: drop what this command wrote
            raise
        shards = list(old.shards)
        for d, entry in zip(plan, entries):
            shards[d.shard] = entry
            receipt.shards.append(d.shard)
            receipt.stages_redone[str(d.shard)] = list(range(d.first_stage, R))
            receipt.digests[str(d.shard)] = {"before": old.shards[d.shard].digest, "after": entry.digest}
        held_owners = set(old.owners().values())
        tombs = set(old.tombstones) | {self._tombstone("id", i) for i in targets}
        tombs |= {self._tombstone("owner", o) for o in owners if o in held_owners}
        new = Manifest(run=old.run, config=old.config, shards=shards, salt=old.salt, tombstones=sorted(tombs),
                       version=old.version + 1, created=old.created, updated=_now())
        remaining = new.labels_held()
        receipt.warnings = [
            f"label {quote(label)} has no records left; a from-scratch run must pass "
            f"--labels {','.join(self.config.labels)} to reproduce this state"
            for label in self.config.labels if label not in remaining]
        receipt.purged_objects = self._commit(new)
        receipt.version = new.version
        redone = [len(stage_ids(new_layout[d.shard], j)) for d in plan for j in range(d.first_stage, R)]
        receipt.retrain_fraction = round(retrain_fraction(redone, R, new.records), 6)
        receipt.seconds = round(time.perf_counter() - t0, 3)
        return receipt

    # -- verification ----------------------------------------------------------------
    def verify(self, shards: Sequence[int] | None = None, progress: bool = False) -> dict:
        """Retrain the chosen shards from scratch on their retained records and compare
        every stage's digest with the manifest and with the stored checkpoint tensors."""
        S = self.config.shards
        chosen = list(range(S)) if shards is None else list(shards)
        for k in chosen:
            if not 0 <= k < S:
                raise UnlearnError(f"--shard {k}: run {quote(self.name)} has shards 0..{S - 1}")
        report = self._executor(progress).verify([self.manifest.shards[k] for k in chosen])
        return {"run": self.name, "exact": all(r["match"] for r in report), "shards": report}

    # -- reading -----------------------------------------------------------------------
    def status(self) -> dict:
        m = self.manifest
        return {
            "run": m.run, "method": m.method, "store": self.store.uri, "version": m.version,
            "created": m.created, "updated": m.updated, "records": m.records,
            "deleted_items": len(m.tombstones), "config": m.config.to_json(),
            "shards": [{"shard": s.shard, "records": s.records, "slices": [len(sl.ids) for sl in s.slices],
                        "digest": s.digest} for s in m.shards],
        }

    def shard_probabilities(self, texts: Sequence[str]) -> tuple[list[int], np.ndarray]:
        """Probabilities of every non-empty shard model: (shards, array [S', n, L])."""
        entries = [s for s in self.manifest.shards if s.records > 0]
        answers = self._executor(False).predict(entries, texts)
        return [e.shard for e in entries], stack_probabilities([p for _, p in answers], len(texts), self.config)

    def predict(self, texts: Sequence[str], method: str = "vote") -> dict:
        shards, probs = self.shard_probabilities(texts)
        return format_predictions(self.manifest, texts, shards, probs, method)

    def evaluate(self, records: Sequence[Record], method: str = "vote") -> dict:
        index = {label: i for i, label in enumerate(self.config.labels)}
        for r in records:
            if r.label not in index:
                raise UnlearnError(f"record {quote(r.id)}: label {quote(r.label)} is not one of {list(self.config.labels)}")
        truth = np.array([index[r.label] for r in records])
        shards, probs = self.shard_probabilities([r.text for r in records])
        weights = [self.manifest.shards[k].records for k in shards]
        labels, _ = aggregate(probs, method, weights)
        return {
            "aggregate": method, "records": len(records), "accuracy": round(float((labels == truth).mean()), 6),
            "shards": [{"shard": k, "accuracy": round(float((probs[i].argmax(axis=1) == truth).mean()), 6)}
                       for i, k in enumerate(shards)],
        }
