"""The work of one shard, and the executor interface that runs it for many shards.

`ShardWorker` trains, retrains, verifies and predicts one shard against a store. It
holds no run-level state (no manifest, no HEAD), so it can live in-process or inside
a Ray actor (`cluster/`). Shards write only content-addressed objects (slice data and
checkpoints), never the manifest, so several shards can work at once; the run commits
their results together (`sisa/run.py`).

An executor maps a list of shard jobs to results. `LocalExecutor` runs them one after
another in this process; the Ray runtime provides one that runs them in shard actors.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from core.errors import IntegrityError, ObjectMissing, UnlearnError
from core.keys import keyed_seed, sha256_hex
from core.records import Record, quote
from core.slices import decode_slice, encode_slice, record_problems
from core.store import Store

from .checkpoint import State, dump_state, load_state, state_digest
from .config import SisaConfig
from .manifest import ShardEntry, SliceEntry
from .plan import checkpoint_key, stage_ids

_classifiers: dict[str, object] = {}


def get_trainer(config: SisaConfig, shared: dict | None = None):
    """A StageTrainer over one loaded base model per process and model configuration
    (loading costs seconds; states are swapped in and out per shard). `shared`: frozen
    base weights as read-only arrays (see models.base_weights)."""
    key = json.dumps([config.objective, config.model, list(config.labels), config.lora_r, config.lora_alpha,
                      config.lora_dropout, config.device])
    if config.objective == "lm":
        from .lm import LMStageTrainer, load_adapted_lm

        if key not in _classifiers:
            _classifiers.clear()
            _classifiers[key] = load_adapted_lm(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                                shared=shared)
        return LMStageTrainer(config, _classifiers[key])
    from .models import load_classifier
    from .trainer import StageTrainer

    if key not in _classifiers:
        clf = load_classifier(config.model, len(config.labels), config.lora_r, config.lora_alpha, config.lora_dropout,
                              shared=shared)
        _classifiers.clear()
        _classifiers[key] = clf
    return StageTrainer(config, _classifiers[key])


def base_weights(config: SisaConfig) -> dict:
    """The frozen base model's parameters as numpy arrays, to put once into Ray's object store."""
    if config.objective == "lm":
        from .lm import lm_base_weights

        return lm_base_weights(config.model)
    from .models import base_weights as classifier_weights

    return classifier_weights(config.model, len(config.labels))


def slice_entry(key: str, records: Sequence[Record]) -> SliceEntry:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.label] = counts.get(r.label, 0) + 1
    return SliceEntry(key, [r.id for r in records], [r.owner for r in records], dict(sorted(counts.items())))


@dataclass(frozen=True)
class TrainJob:
    shard: int
    slices: list[list[Record]]  # records per slice, each sorted by id


@dataclass(frozen=True)
class RetrainJob:
    entry: ShardEntry  # the shard as last committed
    removed: tuple[str, ...]
    first_stage: int


class ShardWorker:
    def __init__(self, store: Store, run: str, config: SisaConfig, shared: dict | None = None):
        self.store = store
        self.run = run
        self.config = config
        self.shared = shared
        self._trainer = None
        self._serving: dict[str, State] = {}  # checkpoint key -> state, for predictions
        self.fault: str | None = None  # fault injection for tests: see crash_at()
        self.pause: tuple[str, float, str | None] | None = None  # and pause_at()

    def crash_at(self, point: str | None) -> None:
        """Make this process exit at `point` of the next job: "before-stage-J",
        "during-stage-J" (after its first step) or "after-stage-J" (after its checkpoint
        is written). Used by the fault-injection tests of the Ray runtime."""
        self.fault = point

    def pause_at(self, point: str | None, seconds: float = 0.0, release: str | None = None) -> None:
        """Make the next job wait at `point` (same names as crash_at), once: `seconds`, or
        less if the file `release` appears first. Tests hold a retraining open with it, to
        observe the system during it on however fast or slow a machine."""
        self.pause = (point, seconds, release) if point else None

    def _fault(self, point: str) -> None:
        if self.pause is not None and self.pause[0] == point:
            import os
            import time

            (_, seconds, release), self.pause = self.pause, None
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not (release and os.path.exists(release)):
                time.sleep(0.05)
        if self.fault == point:
            import os

            os._exit(17)
    @property
    def trainer(self):
        if self._trainer is None:
            self._trainer = get_trainer(self.config, self.shared)
        return self._trainer

    # -- objects -------------------------------------------------------------------
    def ckpt_key(self, shard: int, stage: int, shard_layout: Sequence[Sequence[str]]) -> str:
        key = checkpoint_key(self.config.digest(), shard, stage, shard_layout)
        return f"{self.run}/ckpt/{shard:04d}/{stage:04d}-{key}.safetensors"

    def write_slice(self, records: Sequence[Record]) -> SliceEntry:
        data = encode_slice(records)
        key = f"{self.run}/data/{sha256_hex(data)}.jsonl"
        self.store.put(key, data)
        return slice_entry(key, sorted(records, key=lambda r: r.id))

    def read_checkpoint(self, key: str) -> State:
        """The tensors a checkpoint holds, unchecked (see load_checkpoint). Bytes that are
        not safetensors are an IntegrityError: the writer only ever wrote whole ones."""
        try:
            data = self.store.get(key)
        except KeyError:
            raise ObjectMissing(f"run {quote(self.run)}: checkpoint {key} is missing") from None
        try:
            return load_state(data)
        except Exception as exc:  # safetensors raises its own error type for corrupt data
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IntegrityError(f"run {quote(self.run)}: checkpoint {key} is corrupted (not readable as "
                                 f"safetensors: {reason}); it was not used") from None

    def load_checkpoint(self, key: str, expected_digest: str) -> State:
        """The state of a checkpoint, checked against the digest the manifest records for
        its stage. Checkpoint keys name the training inputs (config and retained ids), not
        the bytes, so the store cannot check them: without this a flipped byte would change
        predictions, or be built on by a deletion and committed."""
        state = self.read_checkpoint(key)
        got = state_digest(state)
        if got != expected_digest:
            raise IntegrityError(f"run {quote(self.run)}: checkpoint {key} is corrupted (its state digest is "
                                 f"{got[:16]}..., the manifest records {expected_digest[:16]}...); it was not used")
        return state

    def load_slice(self, key: str) -> list[Record]:
        """A slice's records; an IntegrityError from the store (the bytes do not match the
        object's name) passes through unchanged."""
        try:
            return decode_slice(self.store.get(key))
        except KeyError:
            raise ObjectMissing(f"run {quote(self.run)}: slice data {key} is missing") from None
        except (ValueError, TypeError) as exc:
            raise UnlearnError(f"run {quote(self.run)}: slice data {key} is unreadable ({exc})") from None

    def load_checked_slice(self, entry: SliceEntry) -> list[Record]:
        """A slice's records, which must be the ones its manifest entry lists."""
        records = self.load_slice(entry.data)
        problems = record_problems(entry, records)
        if problems:
            raise IntegrityError(f"run {quote(self.run)}: slice data {entry.data}: {problems[0]}; it was not used")
        return records

    # -- stages ----------------------------------------------------------------------
    def total_steps(self, shard_layout: Sequence[Sequence[str]], first_stage: int) -> int:
        return sum(self.trainer.stage_steps(len(stage_ids(shard_layout, s)))
                   for s in range(first_stage, self.config.slices))

    def _stages(self, shard: int, shard_layout: Sequence[Sequence[str]], records: dict[str, Record],
                first_stage: int, state: State, on_step: Callable[[], None] | None,
                write: bool) -> list[tuple[str, str]]:
        """Stages first_stage..R-1; returns (checkpoint key, digest) per stage."""
        out = []
        for stage in range(first_stage, self.config.slices):
            batch = [records[rid] for rid in stage_ids(shard_layout, stage)]
            self._fault(f"before-stage-{stage}")
            step = on_step
            if self.fault == f"during-stage-{stage}":
                def step(point=f"during-stage-{stage}"):
                    self._fault(point)
            state = self.trainer.train_stage(state, batch, shard, stage, on_step=step)
            digest = state_digest(state)
            key = self.ckpt_key(shard, stage, shard_layout)
            if write:
                meta = {"run": self.run, "shard": shard, "stage": stage, "digest": digest, "records": len(batch)}
                self.store.put(key, dump_state(state, meta))
                self._fault(f"after-stage-{stage}")
            out.append((key, digest))
        return out

    def train(self, job: TrainJob, on_step: Callable[[], None] | None = None) -> ShardEntry:
        slices = [self.write_slice(recs) for recs in job.slices]
        layout = [sl.ids for sl in slices]
        records = {r.id: r for recs in job.slices for r in recs}
        stages = self._stages(job.shard, layout, records, 0, self.trainer.initial_state(job.shard), on_step, True)
        return ShardEntry(job.shard, slices, [k for k, _ in stages], [d for _, d in stages])

    def retrain(self, job: RetrainJob, on_step: Callable[[], None] | None = None) -> ShardEntry:
        if self.config.approx is not None:
            return self._unlearn_approximately(job, on_step)
        return self._retrain(job, on_step)

    def _unlearn_approximately(self, job: RetrainJob, on_step: Callable[[], None] | None) -> ShardEntry:
        """An approximate run (one shard, one slice): no retraining; the current model is
        "unlearned" in place (sisa/approx), the removed records leave the stored slice, and
        the new state is stored under a key of its own (never one a training would use)."""
        from .approx.unlearn import unlearn_state

        old = job.entry
        gone = set(job.removed)
        held = [r for sl in old.slices for r in self.load_checked_slice(sl)]
        forget = [r for r in held if r.id in gone]
        retain = [r for r in held if r.id not in gone]
        state = self.load_checkpoint(old.checkpoints[-1], old.stage_digests[-1])
        self._fault("before-stage-0")  # the fault points of a retraining's one stage (crash_at, pause_at)
        step = on_step
        if self.fault == "during-stage-0":
            def step():
                self._fault("during-stage-0")
        state, _report = unlearn_state(self.trainer, state, forget, retain, self.config.approx,
                                       keyed_seed(self.config.seed, "approx", old.stage_digests[-1]), step)
        slices = [self.write_slice(retain)]
        digest = state_digest(state)
        key = f"{self.run}/ckpt/{old.shard:04d}/approx-{digest[:32]}.safetensors"
        self.store.put(key, dump_state(state, {"run": self.run, "shard": old.shard, "approximate": True,
                                               "digest": digest, "records": len(retain)}))
        self._fault("after-stage-0")
        return ShardEntry(old.shard, slices, [key], [digest])

    def _retrain(self, job: RetrainJob, on_step: Callable[[], None] | None = None) -> ShardEntry:
        """Drop `removed`, rewrite the changed slices, restore the checkpoint before
        `first_stage` and redo the later stages. Writes only new objects, and only after
        every object it builds on (the shard's slices, the restore point) has been checked."""
        old = job.entry
        gone = set(job.removed)
        records = {r.id: r for sl in old.slices for r in self.load_checked_slice(sl) if r.id not in gone}
        state = (self.trainer.initial_state(old.shard) if job.first_stage == 0
                 else self.load_checkpoint(old.checkpoints[job.first_stage - 1],
                                           old.stage_digests[job.first_stage - 1]))
        slices = list(old.slices)
        for j in range(job.first_stage, self.config.slices):
            if gone & set(slices[j].ids):
                slices[j] = self.write_slice([records[i] for i in slices[j].ids if i not in gone])
        layout = [sl.ids for sl in slices]
        stages = self._stages(old.shard, layout, records, job.first_stage, state, on_step, True)
        return ShardEntry(old.shard, slices, old.checkpoints[:job.first_stage] + [k for k, _ in stages],
                          old.stage_digests[:job.first_stage] + [d for _, d in stages])

    def verify(self, entry: ShardEntry, on_step: Callable[[], None] | None = None) -> dict:
        """Retrain from scratch on the stored records; compare every stage with the
        manifest digest, the stored checkpoint tensors and the checkpoint key. Finding a
        corrupted or missing object is what verify is for: it becomes a problem of the
        report (a mismatch, exit 3), never an error."""
        problems: list[str] = []
        records = self._verify_slices(entry, problems)
        layout = entry.layout()
        retrained: list[str | None] = [None] * len(entry.checkpoints)
        if all(i in records for ids in layout for i in ids):
            stages = self._stages(entry.shard, layout, records, 0, self.trainer.initial_state(entry.shard),
                                  on_step, False)
            retrained = [d for _, d in stages]
        else:
            problems.append("not retrained: the records the manifest lists could not all be read")
        rows = []
        for j, (ckpt, expected) in enumerate(zip(entry.checkpoints, entry.stage_digests)):
            stored = self._stored_digest(j, ckpt, expected, problems)
            key_matches = self.ckpt_key(entry.shard, j, layout) == ckpt
            if retrained[j] is not None and retrained[j] != expected:
                problems.append(f"stage {j}: a from-scratch retrain gives digest {retrained[j][:16]}..., the manifest "
                                f"records {expected[:16]}...")
            if not key_matches:
                problems.append(f"stage {j}: checkpoint key {ckpt} is not the one the stage's records give")
            rows.append({"stage": j, "expected": expected, "retrained": retrained[j], "stored": stored,
                         "key_matches": key_matches})
        return {"shard": entry.shard, "records": entry.records, "match": not problems,
                "problems": problems, "stages": rows}

    def _verify_slices(self, entry: ShardEntry, problems: list[str]) -> dict[str, Record]:
        """The shard's stored records by id; each unreadable slice, or one whose ids,
        owners or label counts differ from its manifest entry, adds a problem."""
        records: dict[str, Record] = {}
        for j, sl in enumerate(entry.slices):
            try:
                got = self.load_slice(sl.data)
            except UnlearnError as exc:  # IntegrityError included: the bytes do not match the name
                problems.append(f"slice {j}: {exc}")
                continue
            problems.extend(f"slice {j}: {p} ({sl.data})" for p in record_problems(sl, got))
            records.update((r.id, r) for r in got)
        return records

    def _stored_digest(self, stage: int, key: str, expected: str, problems: list[str]) -> str | None:
        """The digest of a stored checkpoint (None if unreadable); a problem if it is not
        the manifest's."""
        try:
            stored = state_digest(self.read_checkpoint(key))
        except IntegrityError:
            problems.append(f"stage {stage}: stored checkpoint {key} is corrupted (not readable as safetensors)")
            return None
        except UnlearnError as exc:  # missing, or the store cannot be read
            problems.append(f"stage {stage}: {exc}")
            return None
        if stored != expected:
            problems.append(f"stage {stage}: stored checkpoint {key} is corrupted (its state digest is "
                            f"{stored[:16]}..., the manifest records {expected[:16]}...)")
        return stored

    def serving_state(self, entry: ShardEntry) -> tuple[str, State]:
        """(checkpoint key, state) of a shard's last stage. States are kept in memory by
        checkpoint key, so a serving shard reads each checkpoint version once; a state is
        cached only once its digest matched the manifest."""
        key = entry.checkpoints[-1]
        if key not in self._serving:
            state = self.load_checkpoint(key, entry.digest)
            if len(self._serving) >= 64:  # LoRA states are small, but bound the cache anyway
                self._serving.pop(next(iter(self._serving)))
            self._serving[key] = state
        return key, self._serving[key]

    def predict_proba(self, entry: ShardEntry, texts: Sequence[str]) -> tuple[str, np.ndarray]:
        """(checkpoint key the answer came from, label probabilities [n, L])."""
        key, state = self.serving_state(entry)
        return key, self.trainer.predict_proba(state, texts)

    def next_token_probs(self, entry: ShardEntry, sequences: Sequence[list[int]]) -> tuple[str, np.ndarray]:
        """(checkpoint key, [n, V] next-token probabilities): one generation step of an lm shard."""
        key, state = self.serving_state(entry)
        return key, self.trainer.next_token_probs(state, sequences)


class Executor(Protocol):
    """Runs shard jobs; results come back in job order."""

    def train(self, jobs: Sequence[TrainJob]) -> list[ShardEntry]: ...

    def retrain(self, jobs: Sequence[RetrainJob]) -> list[ShardEntry]: ...

    def verify(self, entries: Sequence[ShardEntry]) -> list[dict]: ...

    def predict(self, entries: Sequence[ShardEntry], texts: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        """Per entry: (checkpoint key that answered, probabilities [n, L])."""


class LocalExecutor:
    """Every shard in this process, one after another, with a progress bar of steps."""

    def __init__(self, store: Store, run: str, config: SisaConfig, progress: bool = False):
        self.worker = ShardWorker(store, run, config)
        self.progress = progress

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        # disable=None: bars on a terminal only, not in logs
        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=None if self.progress else True,
                    leave=False)

    def train(self, jobs: Sequence[TrainJob]) -> list[ShardEntry]:
        w = self.worker
        total = sum(w.total_steps([[r.id for r in s] for s in job.slices], 0) for job in jobs)
        with self._bar(total, f"train {w.run}") as bar:
            return [w.train(job, on_step=lambda: bar.update(1)) for job in jobs]

    def retrain(self, jobs: Sequence[RetrainJob]) -> list[ShardEntry]:
        w = self.worker
        total = sum(w.total_steps([[i for i in sl.ids if i not in job.removed] for sl in job.entry.slices],
                                  job.first_stage) for job in jobs)
        with self._bar(total, f"delete from {w.run}") as bar:
            return [w.retrain(job, on_step=lambda: bar.update(1)) for job in jobs]

    def verify(self, entries: Sequence[ShardEntry]) -> list[dict]:
        w = self.worker
        with self._bar(sum(w.total_steps(e.layout(), 0) for e in entries), f"verify {w.run}") as bar:
            return [w.verify(e, on_step=lambda: bar.update(1)) for e in entries]

    def predict(self, entries: Sequence[ShardEntry], texts: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        return [self.worker.predict_proba(e, texts) for e in entries]

    def next_token_probs(self, entries: Sequence[ShardEntry], sequences: Sequence[list[int]]) -> list[tuple[str, np.ndarray]]:
        return [self.worker.next_token_probs(e, sequences) for e in entries]
