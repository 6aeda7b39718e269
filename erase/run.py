"""An ERASE run on a store: train, delete, verify, status, predict, evaluate.

The language model never changes; what a run learns is which k training records go
into the prompt. Training embeds every record once (each text alone, see embed.py),
clusters the embeddings with quantized k-means (model.py) and stores the state.
A deletion loads that state, runs the certificate (re-clustering only where it fails),
rewrites the affected partitions' record objects and the state, commits, and purges
every superseded object: the deleted texts and their embeddings included.

Besides HEAD, manifests and one unit object per partition (`core/stored_run.py`,
`core/units.py`) the run stores:

    RUN/units/<sha256>.json               one partition's entry: its data and state keys,
                                          its records' ids and owners, label counts
    RUN/data/<sha256>.jsonl               records of one partition, content-addressed
    RUN/state/<sha256>.safetensors        one partition's clustering state with its records'
                                          fixed-point embeddings; and the head (roots, selection)

The partitions' clustering work goes through a pool (`model.PartitionPool`): in this
process by default, or one Ray actor per partition (`cluster/`).
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from core.errors import ObjectMissing, UnlearnError
from core.keys import keyed_hash, sha256_hex
from core.lock import RunLock
from core.receipts import DeletionReceipt, not_found
from core.records import Record, quote, with_labels
from core.slices import decode_slice, encode_slice
from core.store import Store
from core.stored_run import StoredRun, check_run_name, now_iso
from core.tombstones import after_deletion
from core.units import UNITS

from .config import EraseConfig
from .manifest import EraseManifest, PartitionRecords


def prompt_order(seed: int, ids: Iterable[str]) -> list[str]:
    """The order of the examples in the prompt: keyed by id, so removing one example
    never reorders the others."""
    return sorted(ids, key=lambda i: (keyed_hash(seed, "erase-prompt-order", i), i))


def partition_of(config: EraseConfig, rid: str) -> int:
    """Which partition holds a record's text (the same keyed rule the clustering uses)."""
    return keyed_hash(config.seed, "erase-partition", rid) % config.partitions


def dump_tensors(tensors: dict, meta: dict) -> bytes:
    """safetensors with the JSON metadata in its header (never pickle)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"erase": json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def load_tensors(data: bytes, where: str) -> tuple[dict, dict]:
    from safetensors.numpy import load

    from core.tensorfile import read_metadata

    try:
        return load(data), json.loads(read_metadata(data)["erase"])
    except Exception as exc:  # safetensors raises its own error type on corrupt data
        raise UnlearnError(f"{where}: unreadable clustering state ({str(exc).splitlines()[0] if str(exc) else exc})") from None


def leaf_partition(key: str) -> int:
    """Partition index of a leaf key "<group>/<p>"."""
    return int(key.rsplit("/", 1)[1])


class EraseRun(StoredRun):
    MANAGED = ("manifests/", UNITS, "data/", "state/")
    MANIFEST = EraseManifest

    def __init__(self, store: Store, manifest: EraseManifest, pool=None):
        super().__init__(store, manifest)
        self.pool = pool
        self._model = None  # the loaded clustering state of the manifest (keyed by its digest)
        self._model_key: str | None = None
        self._classifiers: dict[str, object] = {}

    @property
    def config(self) -> EraseConfig:
        return self.manifest.config

    @classmethod
    def open(cls, store: Store, run: str, pool=None) -> "EraseRun":
        check_run_name(run)
        return cls(store, cls.read_head(store, run), pool)

    # -- objects ---------------------------------------------------------------------
    def _write_partition(self, index: int, records: Sequence[Record], state: str) -> PartitionRecords:
        records = sorted(records, key=lambda r: r.id)
        data = encode_slice(records)
        key = f"{self.name}/data/{sha256_hex(data)}.jsonl"
        self.store.put(key, data)
        counts: dict[str, int] = defaultdict(int)
        for r in records:
            counts[r.label] += 1
        return PartitionRecords(index, key, state, [r.id for r in records], [r.owner for r in records],
                                dict(sorted(counts.items())))

    def _put_state(self, tensors: dict, meta: dict) -> str:
        data = dump_tensors(tensors, meta)
        key = f"{self.name}/state/{sha256_hex(data)}.safetensors"
        self.store.put(key, data)
        return key

    def _write_head(self, model) -> str:
        return self._put_state(*model.head_tensors())

    def _write_leaves(self, model, partition: int) -> str:
        """One object per partition p with the leaves "<group>/p" of every group (their
        records' fixed-point embeddings and clustering state): a deletion rewrites only
        the partitions it touched, plus the small head."""
        keys = [k for k in model.partition_keys if leaf_partition(k) == partition]
        parts = model.partition_tensors(keys)
        tensors = {f"part/{key}/{name}": arr for key in keys for name, arr in parts[key][0].items()}
        return self._put_state(tensors, {key: parts[key][1] for key in keys})

    def _read_state(self, key: str) -> tuple[dict, dict]:
        """A state object's tensors and metadata. The store checks the bytes against the
        SHA-256 in the key; its IntegrityError passes through unchanged."""
        try:
            data = self.store.get(key)
        except KeyError:
            raise ObjectMissing(f"run {quote(self.name)}: clustering state {key} is missing") from None
        return load_tensors(data, f"{self.store.uri}/{key}")

    def load_partition(self, entry: PartitionRecords, check: bool = True) -> list[Record]:
        """A partition's records. The store checks the bytes against the SHA-256 in the
        key (its IntegrityError passes through unchanged); with `check`, the records must
        also be the ones the manifest lists (ids, owners, label counts), else nothing is
        built on them. `verify` reads unchecked and reports each difference instead."""
        from core.errors import IntegrityError
        from core.slices import record_problems

        try:
            records = decode_slice(self.store.get(entry.data))
        except KeyError:
            raise ObjectMissing(f"run {quote(self.name)}: partition data {entry.data} is missing") from None
        except (ValueError, TypeError) as exc:
            raise UnlearnError(f"run {quote(self.name)}: partition data {entry.data} is unreadable ({exc})") from None
        problems = record_problems(entry, records) if check else []
        if problems:
            raise IntegrityError(f"run {quote(self.name)}: partition data {entry.data}: {problems[0]}; "
                                 f"it was not used")
        return records

    def records(self, ids: Iterable[str] | None = None) -> list[Record]:
        """Retained records (all, or those named), read from their partitions' objects."""
        wanted = None if ids is None else set(ids)
        parts = self.manifest.partitions
        if wanted is not None:  # only the partitions the ids hash to (never a scan of every id)
            parts = [parts[p] for p in sorted({partition_of(self.config, rid) for rid in wanted})]
        out = []
        for entry in parts:
            out.extend(r for r in self.load_partition(entry) if wanted is None or r.id in wanted)
        return out

    def model(self):
        """The clustering state of the committed manifest, loaded once per process."""
        from .model import EraseModel

        if self._model is None or self._model_key != self.manifest.digest:
            tensors, meta = self._read_state(self.manifest.state)
            for entry in self.manifest.partitions:
                leaf_tensors, leaf_metas = self._read_state(entry.state)
                tensors.update(leaf_tensors)
                try:
                    for key, leaf_meta in leaf_metas.items():
                        meta["groups"][key.rsplit("/", 1)[0]]["partitions"][key] = leaf_meta
                except (KeyError, TypeError, AttributeError):
                    raise UnlearnError(f"run {quote(self.name)}: clustering state {entry.state} does not fit the "
                                       f"head {self.manifest.state}") from None
            self._model = EraseModel.from_tensors(tensors, meta, pool=self.pool)
            self._model_key = self.manifest.digest
        return self._model

    # -- training ------------------------------------------------------------------------
    @staticmethod
    def fit(records: Sequence[Record], config: EraseConfig, progress: bool = False, pool=None, embedder=None,
            embed_workers: int = 1):
        """Embed and cluster: the pure part of training (no store). `embed_workers`:
        processes that embed (the vectors are the same bits whatever the number)."""
        from .embed import Embedder
        from .model import EraseModel

        records = sorted(records, key=lambda r: r.id)
        embedder = embedder or Embedder(config.embedder, config.embed_max_length)
        X = embedder.embed([r.text for r in records], progress=progress, workers=embed_workers)
        return EraseModel.fit([r.id for r in records], [r.label for r in records], X, config.clustering(), pool=pool,
                              label_set=list(config.labels))

    @classmethod
    def train(cls, store: Store, run: str, records: Sequence[Record], config: EraseConfig,
              progress: bool = False, pool=None, embed_workers: int = 1) -> "EraseRun":
        check_run_name(run)
        store.check()
        config = with_labels(config, records)
        if not records:
            raise UnlearnError("no records to train on")
        t0 = time.perf_counter()
        model = cls.fit(records, config, progress, pool, embed_workers=embed_workers)
        fit_seconds = time.perf_counter() - t0
        now = now_iso()
        manifest = EraseManifest(run=run, config=config, partitions=[], state="", selected_ids=[], digest="",
                                 salt=os.urandom(16).hex(), created=now, updated=now,
                                 stats={"deletions": 0, "certified": 0, "partition_refits": 0, "root_refits": 0,
                                        "train_seconds": round(fit_seconds, 3)})
        self = cls(store, manifest, pool)
        by_partition: dict[int, list[Record]] = defaultdict(list)
        for r in records:
            by_partition[partition_of(config, r.id)].append(r)

        def write() -> None:
            manifest.partitions = [self._write_partition(p, by_partition[p], self._write_leaves(model, p))
                                   for p in range(config.partitions)]
            manifest.state = self._write_head(model)
            manifest.selected_ids = prompt_order(config.seed, model.selected_ids)
            manifest.digest = model.digest()
            self._commit(manifest)

        self._create(write)
        self._model, self._model_key = model, manifest.digest
        return self

    # -- deletion --------------------------------------------------------------------------
    def units_of(self, targets: Iterable[str]) -> list[int]:
        """The partitions holding any of `targets` (the only ones a deletion touches)."""
        return sorted({partition_of(self.config, t) for t in targets})

    def quarantine_of(self, targets: Iterable[str]) -> set[str]:
        """Every targeted record: none may be a prompt example of an answer once its
        deletion is acknowledged, including one that an earlier batch, still applying,
        is about to select."""
        return set(targets)

    def delete(self, ids: Iterable[str] = (), owners: Iterable[str] = (), ignore_missing: bool = False,
               progress: bool = False, lock: RunLock | None = None) -> DeletionReceipt:
        """`lock`: the run lock when the caller holds it (a coordinator), else taken here."""
        with self._locked("delete", lock):
            self.manifest = self.read_head(self.store, self.name)
            return self._delete_locked(list(ids), list(owners), ignore_missing)

    def _delete_locked(self, ids: list[str], owners: list[str], ignore_missing: bool) -> DeletionReceipt:
        t0 = time.perf_counter()
        targets, already, unknown = self.resolve(ids, owners)
        if unknown and not ignore_missing:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UnlearnError(f"run {quote(self.name)}: unknown {unknown[0]}{more}; nothing was deleted")
        self._collect_garbage()
        old = self.manifest
        receipt = DeletionReceipt(run=self.name, ids=sorted(targets), already_deleted=already, shards=[],
                                  stages_redone={}, digests={}, retrain_fraction=0.0, purged_objects=0,
                                  version=old.version, seconds=0.0, not_found=not_found(ids, owners, unknown))
        if not targets:
            receipt.seconds = round(time.perf_counter() - t0, 3)
            return receipt
        model = self.model()
        try:
            try:
                report = model.delete(sorted(targets))
            except UnlearnError:
                # partition actors restarted empty, or were changed by another driver: reload
                # the committed state into them and try once more
                self._model = None
                model = self.model()
                report = model.delete(sorted(targets))
            touched = self.units_of(targets)
            partitions = list(old.partitions)
            for p in touched:
                kept = [r for r in self.load_partition(old.partitions[p]) if r.id not in targets]
                partitions[p] = self._write_partition(p, kept, self._write_leaves(model, p))
            state = self._write_head(model)
            stats = dict(old.stats)
            stats["deletions"] = stats.get("deletions", 0) + len(targets)
            stats["certified"] = stats.get("certified", 0) + report.certified
            stats["partition_refits"] = stats.get("partition_refits", 0) + len(report.reclustered_partitions)
            stats["root_refits"] = stats.get("root_refits", 0) + int(report.root_refit)
            new = EraseManifest(
                run=old.run, config=old.config, partitions=partitions, state=state,
                selected_ids=prompt_order(old.config.seed, model.selected_ids), digest=model.digest(),
                salt=old.salt, tombstones=after_deletion(old.salt, old.tombstones, targets, owners,
                                                         self.resolver().owners_held(owners)),
                stats=stats, version=old.version + 1, created=old.created, updated=now_iso())
            receipt.purged_objects = self._commit(new)
        except BaseException:
            self._model = None  # the in-memory state may be ahead of the store: reload it next time
            self._collect_garbage()
            raise
        self._model_key = new.digest
        receipt.shards = touched
        receipt.digests = {"state": {"before": old.digest, "after": new.digest}}
        receipt.version = new.version
        # work redone, as a fraction of clustering everything again: the re-clustered partitions' records
        refit = 0
        for key in report.reclustered_partitions:  # leaf "<group>/<p>": its records in partition p
            group, p = key.rsplit("/", 1)
            part = new.partitions[int(p)]
            refit += part.label_counts.get(group, 0) if self.config.per_label else len(part.ids)
        receipt.retrain_fraction = round(refit / max(1, new.records), 6)
        receipt.details = {
            "certified": report.certified, "reclustered_partitions": list(report.reclustered_partitions),
            "root_refit": bool(report.root_refit), "selection_changed": bool(report.selection_changed),
            "cluster_seconds": round(report.seconds, 6)}  # no ids: receipts outlive later deletions
        remaining = new.labels_held()
        receipt.warnings = [
            f"label {quote(label)} has no records left; the prompt no longer shows it, and a from-scratch "
            f"run must pass --labels {','.join(self.config.labels)} to reproduce this state"
            for label in self.config.labels if label not in remaining]
        receipt.seconds = round(time.perf_counter() - t0, 3)
        return receipt

    # -- verification ------------------------------------------------------------------------
    def verify(self, progress: bool = False, embed_workers: int = 1) -> dict:
        """Re-embed the retained records from their stored texts, cluster from scratch and
        compare with the committed state: digest and selected examples. A corrupted or
        missing object, or stored records that differ from the manifest (ids, owners, label
        counts), is what verify is for: each is a problem of the report (exit 3), never an
        error. Records that cannot be trusted are not re-clustered."""
        from core.slices import record_problems

        from .model import EraseModel

        self.read_for_verify()
        self._model = None  # the stored state too: read again, not this process's copy
        problems: list[str] = []
        records: list[Record] = []
        for entry in self.manifest.partitions:
            try:
                got = self.load_partition(entry, check=False)
            except UnlearnError as exc:  # IntegrityError included: the bytes do not match the name
                problems.append(f"partition {entry.partition}: {exc}")
                continue
            problems.extend(f"partition {entry.partition}: {p} ({entry.data})" for p in record_problems(entry, got))
            records.extend(got)
        records_ok = not problems
        try:
            stored = self.model()
        except UnlearnError as exc:  # IntegrityError included
            stored = None
            problems.append(f"stored state: {exc}")
        fresh = None
        if not records_ok:
            problems.append("not re-clustered: the stored records could not be read or differ from the manifest")
        elif records:
            fresh = self.fit(records, self.config, progress, embed_workers=embed_workers)
        elif stored is not None:  # every record deleted: compare with the clustering of nothing
            fresh = EraseModel.fit([], [], np.zeros((0, stored.d), np.float32), self.config.clustering(),
                                   label_set=list(self.config.labels))
        digests = {what: model.digest() for what, model in (("stored state", stored), ("fresh clustering", fresh))
                   if model is not None}
        for what, digest in digests.items():
            if digest != self.manifest.digest:
                problems.append(f"{what} digest {str(digest)[:16]} != manifest {self.manifest.digest[:16]}")
        if fresh is not None and prompt_order(self.config.seed, fresh.selected_ids) != self.manifest.selected_ids:
            problems.append("the selected examples differ from a fresh clustering")
        return {"run": self.name, "exact": not problems, "records": len(records), "digest": self.manifest.digest,
                "selected_ids": list(self.manifest.selected_ids), "problems": problems}

    # -- reading -----------------------------------------------------------------------------
    def status(self) -> dict:
        m = self.manifest
        return {
            "run": m.run, "method": m.method, "store": self.store.uri, "version": m.version,
            "created": m.created, "updated": m.updated, "records": m.records,
            "deleted_items": len(m.tombstones), "config": m.config.to_json(),
            "selected_ids": list(m.selected_ids), "digest": m.digest, "stats": dict(m.stats),
            "partitions": [{"partition": s["partition"], "records": s["records"], "labels": s["labels"]}
                           for s in m.summaries()],  # from the manifest alone: no partition object is read
        }

    def examples(self, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(text, label) of the prompt examples, in prompt order."""
        skip = set(exclude)
        by_id = {r.id: r for r in self.records([i for i in self.manifest.selected_ids if i not in skip])}
        return [(by_id[i].text, by_id[i].label) for i in self.manifest.selected_ids if i in by_id]

    def classifier(self, lm: str | None = None):
        from .icl import InContextClassifier

        lm = lm or self.config.lm
        if lm not in self._classifiers:
            self._classifiers[lm] = InContextClassifier(lm=lm, labels=list(self.config.labels))
        return self._classifiers[lm]

    def predict(self, texts: Sequence[str], lm: str | None = None, exclude: Iterable[str] = ()) -> dict:
        examples = self.examples(exclude)
        probs = self.classifier(lm).predict_proba(examples, list(texts), calibrate=self.config.calibrate)
        return format_predictions(self.config.labels, texts, probs, self.manifest.selected_ids, exclude)

    def evaluate(self, records: Sequence[Record], lm: str | None = None) -> dict:
        index = {label: i for i, label in enumerate(self.config.labels)}
        for r in records:
            if r.label not in index:
                raise UnlearnError(f"record {quote(r.id)}: label {quote(r.label)} is not one of {list(self.config.labels)}")
        truth = np.array([index[r.label] for r in records])
        t0 = time.perf_counter()
        probs = self.classifier(lm).predict_proba(self.examples(), [r.text for r in records],
                                                  calibrate=self.config.calibrate)
        seconds = time.perf_counter() - t0
        return {"method": "erase", "records": len(records), "shots": len(self.manifest.selected_ids),
                "accuracy": round(float((probs.argmax(axis=1) == truth).mean()), 6) if len(records) else None,
                "seconds_per_query": round(seconds / max(1, len(records)), 6)}


def format_predictions(labels: Sequence[str], texts: Sequence[str], probs: np.ndarray, selected: Sequence[str],
                       exclude: Iterable[str] = ()) -> dict:
    """The in-context answer: label and probabilities per text, and which examples the
    prompt used (examples quarantined by a pending deletion are left out and named)."""
    withheld = sorted(set(exclude) & set(selected))
    return {
        "method": "erase", "examples": [i for i in selected if i not in withheld], "withheld_examples": withheld,
        "predictions": [{"text": t, "label": labels[int(row.argmax())],
                         "probabilities": {n: round(float(p), 6) for n, p in zip(labels, row)}}
                        for t, row in zip(texts, probs)],
    }
