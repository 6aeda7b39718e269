"""A SISA run on a store: train, delete, verify, status, predict, evaluate.

The run owns the manifest and the commit; the per-shard work goes through an
executor (`sisa/shard.py`): in this process by default (no Ray, usable from a
notebook), or in Ray shard actors (`cluster/`). Besides HEAD, manifests and one unit
object per shard (see `stored_run.py` for the commit and the purge, `core/units.py` for the
shard objects), the run stores under its prefix:

    RUN/units/<sha256>.json               one shard's entry: per slice its data key, ids,
                                          owners, label counts; its checkpoints and digests
    RUN/data/<sha256>.jsonl               records of one slice, content-addressed
    RUN/ckpt/<shard>/<stage>-<key>.safetensors   state after a stage; key = checkpoint_key()

A deletion rewrites the objects of the shards it touches, their shard objects, the
manifest (settings, tombstones, and a key and summary per shard) and HEAD.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Sequence

import numpy as np

from core.errors import UnlearnError
from core.lock import RunLock
from core.receipts import DeletionReceipt, not_found
from core.records import Record, quote, with_labels
from core.store import Store
from core.stored_run import StoredRun, check_run_name, now_iso, read_manifest_json  # noqa: F401 (re-export)
from core.tombstones import after_deletion
from core.units import UNITS, locate

from .aggregate import aggregate, vote_counts
from .config import SisaConfig
from .manifest import Manifest
from .plan import (Placement, ShardDeletion, build_layout, placement_problems, plan_located, retrain_fraction,
                   stage_ids)
from .shard import Executor, LocalExecutor, RetrainJob, TrainJob, get_trainer  # noqa: F401 (re-export)


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


class SisaRun(StoredRun):
    MANAGED = ("manifests/", UNITS, "data/", "ckpt/")
    MANIFEST = Manifest

    def __init__(self, store: Store, manifest: Manifest, executor: Executor | None = None):
        super().__init__(store, manifest)
        self.executor = executor

    @property
    def config(self) -> SisaConfig:
        return self.manifest.config

    def _executor(self, progress: bool) -> Executor:
        return self.executor or LocalExecutor(self.store, self.name, self.config, progress)

    @classmethod
    def open(cls, store: Store, run: str, executor: Executor | None = None) -> "SisaRun":
        check_run_name(run)
        return cls(store, cls.read_head(store, run), executor)

    # -- training ------------------------------------------------------------------
    @classmethod
    def train(cls, store: Store, run: str, records: Sequence[Record], config: SisaConfig,
              progress: bool = False, executor: Executor | None = None) -> "SisaRun":
        check_run_name(run)
        store.check()
        config = config_for(config, records)
        layout = build_layout(((r.id, r.owner) for r in records), config.seed, config.shards, config.slices)
        by_id = {r.id: r for r in records}
        now = now_iso()
        manifest = Manifest(run=run, config=config, shards=[], salt=os.urandom(16).hex(), created=now, updated=now)
        self = cls(store, manifest, executor)
        jobs = [TrainJob(k, [[by_id[i] for i in ids] for ids in shard]) for k, shard in enumerate(layout)]

        def write() -> None:
            manifest.shards = self._executor(progress).train(jobs)
            self._commit(manifest)

        self._create(write)
        return self

    @classmethod
    def start_approx(cls, store: Store, run: str, source: str, approx) -> "SisaRun":
        """An approximate run (`approx`: an ApproxConfig) that starts from the model of
        `source`, an lm run of one shard and one slice: the state a training of `run` would
        give (approximate settings play no part in training), without training again. The
        source's records and final checkpoint are copied; the source is not changed."""
        check_run_name(run)
        src = cls.open(store, source)
        c = src.config
        if c.objective != "lm" or c.shards != 1 or c.slices != 1 or c.approx is not None:
            kind = "approximate" if c.approx is not None else f"{c.objective}, {c.shards} shards x {c.slices} slices"
            raise UnlearnError(f"--from {quote(source)}: an approximate run starts from an lm run of 1 shard and "
                               f"1 slice, not approximate itself (that run is {kind})")
        if src.manifest.shards[0].records == 0:
            raise UnlearnError(f"--from {quote(source)}: that run holds no records")
        config = SisaConfig.from_json({**c.to_json(), "extra": {**c.extra, "approx": approx.to_json()}})
        now = now_iso()
        manifest = Manifest(run=run, config=config, shards=[], salt=os.urandom(16).hex(), created=now, updated=now)
        self = cls(store, manifest)

        def write() -> None:
            from .checkpoint import dump_state
            from .manifest import ShardEntry
            from .shard import ShardWorker

            entry = src.manifest.shards[0]
            reader, writer = ShardWorker(store, source, c), ShardWorker(store, run, config)
            records = [r for sl in entry.slices for r in reader.load_checked_slice(sl)]
            state = reader.load_checkpoint(entry.checkpoints[-1], entry.stage_digests[-1])
            stored = writer.write_slice(records)
            key = writer.ckpt_key(0, 0, [stored.ids])
            store.put(key, dump_state(state, {"run": run, "shard": 0, "stage": 0, "digest": entry.stage_digests[-1],
                                              "records": len(records), "from": source}))
            manifest.shards = [ShardEntry(0, [stored], [key], [entry.stage_digests[-1]])]
            self._commit(manifest)

        self._create(write)
        return self

    # -- deletion ------------------------------------------------------------------
    def units_of(self, targets: Iterable[str]) -> list[int]:
        """The shards whose models hold any of `targets` (what a deletion must retrain),
        from the per-shard indexes (built once per shard object, like the resolver's)."""
        return sorted({d.shard for d in self._plan(targets)})

    def _plan(self, targets: Iterable[str]) -> list[ShardDeletion]:
        indexes = self.manifest.indexes()

        def where(rid: str) -> Placement | None:
            found = locate(indexes, rid)
            return None if found is None else Placement(self.manifest.shards[found[0]].shard, found[1])

        return plan_located(where, targets)

    def quarantine_of(self, targets: Iterable[str]) -> list[int]:
        """What may not answer predictions once the deletion of `targets` is acknowledged."""
        return self.units_of(targets)

    def delete(self, ids: Iterable[str] = (), owners: Iterable[str] = (), ignore_missing: bool = False,
               progress: bool = False, lock: RunLock | None = None) -> DeletionReceipt:
        """`lock`: the run lock when the caller holds it (a coordinator), else taken here."""
        with self._locked("delete", lock):
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
        plan = self._plan(targets)
        receipt = DeletionReceipt(run=self.name, ids=sorted(targets), already_deleted=already, shards=[],
                                  stages_redone={}, digests={}, retrain_fraction=0.0, purged_objects=0,
                                  version=old.version, seconds=0.0, not_found=not_found(ids, owners, unknown))
        if not plan:
            receipt.seconds = round(time.perf_counter() - t0, 3)
            return receipt
        R = self.config.slices
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
        tombs = after_deletion(old.salt, old.tombstones, targets, owners, self.resolver().owners_held(owners))
        new = Manifest(run=old.run, config=old.config, shards=shards, salt=old.salt, tombstones=tombs,
                       version=old.version + 1, created=old.created, updated=now_iso())
        remaining = new.labels_held()
        receipt.warnings = [
            f"label {quote(label)} has no records left; a from-scratch run must pass "
            f"--labels {','.join(self.config.labels)} to reproduce this state"
            for label in self.config.labels if label not in remaining]
        if self.config.approx is not None:
            receipt.warnings.append(APPROXIMATE.format(method=self.config.approx.method))
        receipt.purged_objects = self._commit(new)
        receipt.version = new.version
        if self.config.approx is None:
            redone = [len(stage_ids(new.shards[d.shard].layout(), j)) for d in plan for j in range(d.first_stage, R)]
            receipt.retrain_fraction = round(retrain_fraction(redone, R, new.records), 6)
        else:  # nothing was retrained: the model was changed in place
            receipt.stages_redone = {}
        receipt.seconds = round(time.perf_counter() - t0, 3)
        return receipt

    # -- verification ----------------------------------------------------------------
    def verify(self, shards: Sequence[int] | None = None, progress: bool = False) -> dict:
        """Retrain the chosen shards from scratch on their retained records and compare
        every stage's digest with the manifest and with the stored checkpoint tensors;
        and re-derive each record's shard and slice from its owner, since a retrain on a
        wrong layout would reproduce the stored digests."""
        approx = self.config.approx
        if approx is not None:
            raise UnlearnError(f"run {quote(self.name)} is approximate ({approx.method}): not verifiable; its "
                               f"deletions were unlearned in place, which no retraining reproduces (see what it "
                               f"still knows with `unlearn audit`)")
        self.read_for_verify()
        S = self.config.shards
        chosen = list(range(S)) if shards is None else list(shards)
        for k in chosen:
            if not 0 <= k < S:
                raise UnlearnError(f"--shard {k}: run {quote(self.name)} has shards 0..{S - 1}")
        report = self._executor(progress).verify([self.manifest.shards[k] for k in chosen])
        for r in report:
            entry = self.manifest.shards[r["shard"]]
            misplaced = placement_problems(entry.shard, [(sl.ids, sl.owners) for sl in entry.slices],
                                           self.config.seed, S)
            if misplaced:
                r["problems"] = misplaced + r["problems"]
                r["match"] = False
        return {"run": self.name, "exact": all(r["match"] for r in report), "shards": report}

    # -- reading -----------------------------------------------------------------------
    def status(self) -> dict:
        m = self.manifest
        return {
            "run": m.run, "method": m.method, "store": self.store.uri, "version": m.version,
            "created": m.created, "updated": m.updated, "records": m.records,
            "deleted_items": len(m.tombstones), "config": m.config.to_json(),
            **({"approximate": APPROXIMATE.format(method=self.config.approx.method)} if self.config.approx else {}),
            "shards": [{"shard": s["shard"], "records": s["records"], "slices": s["slices"], "digest": s["digest"]}
                       for s in m.summaries()],  # from the manifest alone: no shard object is read
        }

    def shard_probabilities(self, texts: Sequence[str]) -> tuple[list[int], np.ndarray]:
        """Probabilities of every non-empty shard model: (shards, array [S', n, L])."""
        entries = [s for s in self.manifest.shards if s.records > 0]
        answers = self._executor(False).predict(entries, texts)
        return [e.shard for e in entries], stack_probabilities([p for _, p in answers], len(texts), self.config)

    def predict(self, texts: Sequence[str], method: str = "vote") -> dict:
        shards, probs = self.shard_probabilities(texts)
        return format_predictions(self.manifest, texts, shards, probs, method)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, shard: int | None = None) -> dict:
        """Greedy continuations of `prompts` by the ensemble of every non-empty shard (or one
        shard alone); an lm run only."""
        from .generate import generate_answers

        entries = [s for s in self.manifest.shards if s.records > 0 and (shard is None or s.shard == shard)]
        if shard is not None and not entries:
            raise UnlearnError(f"--shard {shard}: run {quote(self.name)} has no shard {shard} holding records")
        return generate_answers(self.config, prompts, entries, self._executor(False).next_token_probs, max_new_tokens)

    def evaluate(self, records: Sequence[Record], method: str = "vote") -> dict:
        check_labels(self.config, records)
        shards, probs = self.shard_probabilities([r.text for r in records])
        return evaluation(self.manifest, records, shards, probs, method)


APPROXIMATE = ("approximate: not verifiable ({method} unlearned the deleted records in place; the model may "
               "still hold what they taught it)")


def config_for(config: SisaConfig, records: Sequence[Record]) -> SisaConfig:
    """The config a run on `records` trains with: the label set fixed (labelled records),
    or none (prompt/completion records, which only the lm objective learns)."""
    if config.objective == "lm" and records and records[0].completion is not None:
        if config.labels:
            raise UnlearnError(f"--labels {','.join(config.labels)}: the data are prompt/completion records, "
                               "which have no labels")
        return config
    return with_labels(config, records)


def check_labels(config, records: Sequence[Record]) -> None:
    known = set(config.labels)
    for r in records:
        if r.completion is not None:
            raise UnlearnError(f"record {quote(r.id)}: a prompt/completion record; eval needs id, text, label records")
        if r.label not in known:
            raise UnlearnError(f"record {quote(r.id)}: label {quote(r.label)} is not one of {list(config.labels)}")


def evaluation(manifest: Manifest, records: Sequence[Record], shards: Sequence[int], probs: np.ndarray,
               method: str) -> dict:
    """Accuracy of the ensemble of `shards` (probabilities [S', n, L]), overall and per shard."""
    index = {label: i for i, label in enumerate(manifest.config.labels)}
    truth = np.array([index[r.label] for r in records])
    weights = [manifest.shards[k].records for k in shards]
    labels, _ = aggregate(probs, method, weights)
    return {
        "aggregate": method, "records": len(records), "accuracy": round(float((labels == truth).mean()), 6),
        "shards": [{"shard": k, "accuracy": round(float((probs[i].argmax(axis=1) == truth).mean()), 6)}
                   for i, k in enumerate(shards)],
    }
