"""A SISA run on a store: train, delete, verify, status, predict, evaluate.

This is the in-process engine (no Ray), usable from a notebook. Storage layout
under the run's prefix:

    RUN/HEAD                              pointer to the current manifest (the commit)
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
from .checkpoint import State, dump_state, load_state, state_digest
from .config import SisaConfig
from .errors import UnlearnError
from .keys import sha256_hex
from .manifest import DeletionReceipt, Manifest, ShardEntry, SliceEntry
from .plan import apply_deletion, build_layout, checkpoint_key, plan_deletion, retrain_fraction, stage_ids
from .records import Record, id_problem, quote
from .lock import RunLock, lock_key
from .store import Store

MANAGED = ("manifests/", "data/", "ckpt/")  # sub-prefixes that garbage collection owns

_trainers: dict[str, object] = {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def get_trainer(config: SisaConfig):
    """One loaded base model per process and configuration (loading costs seconds)."""
    from .models import load_classifier
    from .trainer import StageTrainer

    key = json.dumps([config.model, list(config.labels), config.lora_r, config.lora_alpha, config.lora_dropout])
    if key not in _trainers:
        clf = load_classifier(config.model, len(config.labels), config.lora_r, config.lora_alpha, config.lora_dropout)
        _trainers.clear()
        _trainers[key] = clf
    return StageTrainer(config, _trainers[key])


def check_run_name(name: str) -> None:
    if not name:
        raise UnlearnError("--run: empty run name")
    problem = id_problem(name)
    if problem:
        raise UnlearnError(f"--run {quote(name)}: {problem}")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, leave=False)


def encode_slice(records: Sequence[Record]) -> bytes:
    return "".join(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False) + "\n"
                   for r in sorted(records, key=lambda r: r.id)).encode("utf-8")


def decode_slice(data: bytes) -> list[Record]:
    # split on "\n" only: str.splitlines() would also split inside texts at U+2028, U+0085, ...
    return [Record(**json.loads(line)) for line in data.decode("utf-8").split("\n") if line]


def slice_entry(key: str, records: Sequence[Record]) -> SliceEntry:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.label] = counts.get(r.label, 0) + 1
    return SliceEntry(key, [r.id for r in records], [r.owner for r in records], dict(sorted(counts.items())))


class SisaRun:
    def __init__(self, store: Store, manifest: Manifest):
        self.store = store
        self.manifest = manifest

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

    def _data_key(self, data: bytes) -> str:
        return f"{self.name}/data/{sha256_hex(data)}.jsonl"

    def _ckpt_key(self, shard: int, stage: int, shard_layout: Sequence[Sequence[str]]) -> str:
        key = checkpoint_key(self.config.digest(), shard, stage, shard_layout)
        return f"{self.name}/ckpt/{shard:04d}/{stage:04d}-{key}.safetensors"

    def _tombstone(self, kind: str, value: str) -> str:
        return hmac.new(bytes.fromhex(self.manifest.salt), f"{kind}\x1f{value}".encode(), "sha256").hexdigest()

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
    def _read_head(cls, store: Store, run: str) -> Manifest:
        try:
            head = json.loads(store.get(cls._head(run)))
            mkey = head["manifest"]
        except KeyError:
            raise UnlearnError(f"run {quote(run)} not found in store {store.uri}") from None
        except (ValueError, TypeError):
            raise UnlearnError(f"run {quote(run)}: {store.uri}/{cls._head(run)} is not a valid pointer") from None
        try:
            return Manifest.loads(store.get(mkey), f"{store.uri}/{mkey}")
        except KeyError:
            raise UnlearnError(f"run {quote(run)}: manifest {mkey} is missing from {store.uri}") from None

    @classmethod
    def open(cls, store: Store, run: str) -> "SisaRun":
        check_run_name(run)
        return cls(store, cls._read_head(store, run))

    def _load_checkpoint(self, key: str) -> State:
        try:
            return load_state(self.store.get(key))
        except KeyError:
            raise UnlearnError(f"run {quote(self.name)}: checkpoint {key} is missing (changed by another "
                               f"command while reading? try again)") from None
        except Exception as exc:  # safetensors raises its own error type for corrupt data
            raise UnlearnError(f"run {quote(self.name)}: checkpoint {key} is unreadable ({exc})") from None

    def _load_slice(self, key: str) -> list[Record]:
        try:
            return decode_slice(self.store.get(key))
        except KeyError:
            raise UnlearnError(f"run {quote(self.name)}: slice data {key} is missing") from None
        except (ValueError, TypeError) as exc:
            raise UnlearnError(f"run {quote(self.name)}: slice data {key} is unreadable ({exc})") from None

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
    def _train_stages(self, trainer, shard: int, shard_layout: Sequence[Sequence[str]], records: dict[str, Record],
                      first_stage: int, state: State, bar, write: bool) -> list[tuple[str, str]]:
        """Stages first_stage..R-1 of one shard; returns (checkpoint key, digest) per stage."""
        out = []
        for stage in range(first_stage, self.config.slices):
            batch = [records[rid] for rid in stage_ids(shard_layout, stage)]
            state = trainer.train_stage(state, batch, shard, stage, on_step=lambda: bar.update(1))
            digest = state_digest(state)
            key = self._ckpt_key(shard, stage, shard_layout)
            if write:
                meta = {"run": self.name, "shard": shard, "stage": stage, "digest": digest, "records": len(batch)}
                self.store.put(key, dump_state(state, meta))
            out.append((key, digest))
        return out

    def _total_steps(self, trainer, shard_layout: Sequence[Sequence[str]], first_stage: int) -> int:
        return sum(trainer.stage_steps(len(stage_ids(shard_layout, s))) for s in range(first_stage, self.config.slices))

    @classmethod
    def train(cls, store: Store, run: str, records: Sequence[Record], config: SisaConfig,
              progress: bool = False) -> "SisaRun":
        check_run_name(run)
        store.check()
        if not config.labels:
            labels = sorted({r.label for r in records})
            if len(labels) < 2:
                raise UnlearnError(f"the data has a single label {labels}; a classifier needs two or more")
            config = SisaConfig.from_json({**config.to_json(), "labels": labels})
        known = set(config.labels)
        for r in records:
            if r.label not in known:
                raise UnlearnError(f"record {quote(r.id)}: label {quote(r.label)} is not one of {list(config.labels)}")
        layout = build_layout(((r.id, r.owner) for r in records), config.seed, config.shards, config.slices)
        by_id = {r.id: r for r in records}
        now = _now()
        manifest = Manifest(run=run, config=config, shards=[], salt=os.urandom(16).hex(), created=now, updated=now)
        self = cls(store, manifest)
        with RunLock(store, run, "train"):
            if store.exists(cls._head(run)):
                raise UnlearnError(f"run {quote(run)} already exists in {store.uri}; choose another --run")
            self._train_all(layout, by_id, progress)
        return self

    def _train_all(self, layout, by_id: dict[str, Record], progress: bool) -> None:
        store, run, manifest, config = self.store, self.name, self.manifest, self.config
        for key in store.list_all(f"{run}/"):  # leftovers of an earlier train that died
            if key != lock_key(run):
                store.delete(key)
        try:
            trainer = get_trainer(config)
            total = sum(self._total_steps(trainer, shard_layout, 0) for shard_layout in layout)
            with _progress(total, f"train {run}", progress) as bar:
                for k, shard_layout in enumerate(layout):
                    slices = []
                    for ids in shard_layout:
                        data = encode_slice([by_id[i] for i in ids])
                        key = self._data_key(data)
                        store.put(key, data)
                        slices.append(slice_entry(key, [by_id[i] for i in ids]))
                    stages = self._train_stages(trainer, k, shard_layout, by_id, 0, trainer.initial_state(k), bar, True)
                    manifest.shards.append(ShardEntry(k, slices, [s[0] for s in stages], [s[1] for s in stages]))
            self._commit(manifest)
        except BaseException:
            try:  # nothing was committed: leave the store as it was
                for key in store.list_all(f"{run}/"):
                    if key != lock_key(run):
                        store.delete(key)
            except Exception as cleanup:  # keep the original error; say what is left
                print(f"unlearn: warning: could not remove the partial run {run!r}: {cleanup}", file=sys.stderr)
            raise

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
               progress: bool = False) -> DeletionReceipt:
        with RunLock(self.store, self.name, "delete"):
            self.manifest = self._read_head(self.store, self.name)  # a stale handle acts on the current state
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
        new_layout = apply_deletion(old.layout(), targets)
        shards = [ShardEntry(s.shard, list(s.slices), list(s.checkpoints), list(s.stage_digests)) for s in old.shards]
        R = self.config.slices
        redone_sizes: list[int] = []
        try:
            trainer = get_trainer(self.config)
            total = sum(self._total_steps(trainer, new_layout[d.shard], d.first_stage) for d in plan)
            with _progress(total, f"delete from {self.name}", progress) as bar:
                for d in plan:
                    entry = shards[d.shard]
                    records = {r.id: r for sl in entry.slices for r in self._load_slice(sl.data)}
                    for rid in d.removed:
                        del records[rid]
                    for j in range(d.first_stage, R):
                        ids_j = new_layout[d.shard][j]
                        if ids_j != entry.slices[j].ids:
                            data = encode_slice([records[i] for i in ids_j])
                            key = self._data_key(data)
                            self.store.put(key, data)
                            entry.slices[j] = slice_entry(key, [records[i] for i in ids_j])
                    if d.first_stage == 0:
                        state = trainer.initial_state(d.shard)
                    else:
                        state = self._load_checkpoint(entry.checkpoints[d.first_stage - 1])
                    stages = self._train_stages(trainer, d.shard, new_layout[d.shard], records, d.first_stage,
                                                state, bar, True)
                    entry.checkpoints[d.first_stage:] = [s[0] for s in stages]
                    entry.stage_digests[d.first_stage:] = [s[1] for s in stages]
                    receipt.shards.append(d.shard)
                    receipt.stages_redone[str(d.shard)] = list(range(d.first_stage, R))
                    receipt.digests[str(d.shard)] = {"before": old.shards[d.shard].digest, "after": entry.digest}
                    redone_sizes += [len(stage_ids(new_layout[d.shard], j)) for j in range(d.first_stage, R)]
            held_owners = set(old.owners().values())
            tombs = set(old.tombstones) | {self._tombstone("id", i) for i in targets}
            tombs |= {self._tombstone("owner", o) for o in owners if o in held_owners}
            new = Manifest(run=old.run, config=old.config, shards=shards, salt=old.salt, tombstones=sorted(tombs),
                           version=old.version + 1, created=old.created, updated=_now())
        except BaseException:
            self._collect_garbage()  # HEAD still names the old manifest: drop what this command wrote
            raise
        remaining = new.labels_held()
        receipt.warnings = [
            f"label {quote(label)} has no records left; a from-scratch run must pass "
            f"--labels {','.join(self.config.labels)} to reproduce this state"
            for label in self.config.labels if label not in remaining]
        receipt.purged_objects = self._commit(new)
        receipt.version = new.version
        receipt.retrain_fraction = round(retrain_fraction(redone_sizes, R, new.records), 6)
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
        trainer = get_trainer(self.config)
        layout = self.manifest.layout()
        report = []
        total = sum(self._total_steps(trainer, layout[k], 0) for k in chosen)
        with _progress(total, f"verify {self.name}", progress) as bar:
            for k in chosen:
                entry = self.manifest.shards[k]
                problems = []
                records: dict[str, Record] = {}
                for j, sl in enumerate(entry.slices):
                    got = self._load_slice(sl.data)
                    if [r.id for r in got] != sl.ids:
                        problems.append(f"slice {j}: stored records differ from the manifest")
                    records.update((r.id, r) for r in got)
                stages = self._train_stages(trainer, k, layout[k], records, 0, trainer.initial_state(k), bar, False)
                rows = []
                for j, (key, digest) in enumerate(stages):
                    stored = state_digest(self._load_checkpoint(entry.checkpoints[j]))
                    ok = digest == entry.stage_digests[j] == stored and key == entry.checkpoints[j]
                    if not ok:
                        problems.append(f"stage {j}: digest or checkpoint key differs")
                    rows.append({"stage": j, "expected": entry.stage_digests[j], "retrained": digest,
                                 "stored": stored, "key_matches": key == entry.checkpoints[j]})
                report.append({"shard": k, "records": entry.records, "match": not problems,
                               "problems": problems, "stages": rows})
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
        trainer = get_trainer(self.config)
        shards = [s.shard for s in self.manifest.shards if s.records > 0]
        probs = [trainer.predict_proba(self._load_checkpoint(self.manifest.shards[k].checkpoints[-1]), texts)
                 for k in shards]
        return shards, np.stack(probs) if probs else np.zeros((0, len(texts), len(self.config.labels)))

    def predict(self, texts: Sequence[str], method: str = "vote") -> dict:
        shards, probs = self.shard_probabilities(texts)
        weights = [self.manifest.shards[k].records for k in shards]
        labels, agg = aggregate(probs, method, weights)
        names = self.config.labels
        votes = vote_counts(probs)
        return {
            "aggregate": method, "shards": shards,
            "predictions": [{"text": t, "label": names[int(i)],
                             "probabilities": {n: round(float(p), 6) for n, p in zip(names, row)},
                             "votes": {n: int(v) for n, v in zip(names, vrow)}}
                            for t, i, row, vrow in zip(texts, labels, agg, votes)],
        }

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
