"""Predictions that honour every acknowledged deletion, whichever process accepted it.

A request is in the store's queue (`RUN/queue/`) from the moment it is acknowledged
until its batch has committed. So any process that answers (serve, CLI predict or
eval, in-process or on Ray, SISA or ERASE) reads the queue around each answer:

1. read the queue, then HEAD; answer from what is not quarantined (SISA: every shard
   a queued request names; ERASE: every prompt example it names);
2. after the answer, read the queue again, then HEAD (in that order: a request that
   left the queue in between has committed, so HEAD shows it), and keep an answer only
   if its shard is still not quarantined and still on the committed checkpoint (ERASE:
   no example used is quarantined now or gone from the committed state); else ask again.

What a check costs: one LIST of the queue and one small GET of HEAD, twice per batch
of texts; queued entries are read once each (what a request quarantines never changes)
and the manifest once per commit (`bench/quarantine_bench.py` measures it).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from core.errors import ObjectMissing, Unavailable, UnlearnError
from core.records import quote
from core.store import Store

from .requestlog import RequestLog


class Committed:
    """The run's committed manifest, re-read only when HEAD moves."""

    def __init__(self, store: Store, run: str):
        self.store, self.run = store, run
        self._head: bytes | None = None
        self.manifest = None

    def read(self):
        from .methods import open_run

        try:
            head = self.store.get(f"{self.run}/HEAD")
        except KeyError:
            raise UnlearnError(f"run {quote(self.run)} not found") from None
        if head != self._head or self.manifest is None:
            for attempt in range(3):
                try:
                    self.manifest = open_run(self.store, self.run).manifest
                    break
                except ObjectMissing:  # HEAD moved and the old manifest was purged in between
                    if attempt == 2:
                        raise
            self._head = head
        return self.manifest

    def holds(self, ids) -> bool:
        """Whether the committed state holds every one of `ids` (ERASE: to tell a deleted
        example), from the per-unit indexes (built once per unit object, not per HEAD)."""
        indexes = self.manifest.indexes()
        return all(any(i in u.held for u in indexes) for i in ids)


class Quarantine:
    """What may not answer: the union of `units` over the queued requests. A damaged queue
    entry could have named anything, so while one is there `damaged` names it and the
    callers withhold everything (fail closed)."""

    def __init__(self, store: Store, run: str):
        self.log = RequestLog(store, run)
        self.problems: list[str] = []  # every damaged entry seen, one line each
        self.damaged: list[str] = []  # those in the queue at the last read

    def read(self) -> set:
        """Each queue group is read every time (its bytes: the lock holder rewrites a group
        when some of its requests finish), and parsed only when they changed."""
        keys = self.log.queued_keys()
        self.log._keep_parsed(keys)
        units, damaged = set(), []
        for key in keys:
            try:
                for req in self.log._read_group(key):
                    units.update(req.units)
            except KeyError:
                continue  # finished meanwhile
            except ValueError as exc:
                line = self.log._unreadable(key, exc)
                damaged.append(line)
                if line not in self.problems:
                    self.problems.append(line)
        self.damaged = damaged
        return units

    def fail_closed(self) -> str:
        return (f"{self.damaged[0].removesuffix('; skipped')}: it could name any record, so nothing answers until it "
                f"is restored or removed (`unlearn resume --run {self.log.run} --discard-damaged`, then submit that "
                f"deletion again)")


def _moved(committed: Committed) -> bool:
    """After an object the answer needed was missing: True if a commit made meanwhile
    purged it (ask again on the new state), False if it is plain missing."""
    before = committed._head
    try:
        committed.read()
    except UnlearnError:
        return False
    return committed._head != before


def predict_shards(committed: Committed, quarantine: Quarantine, serve: Callable, texts: Sequence[str],
                   wait: bool = False, timeout_s: float = 3600.0):
    """SISA: (manifest, answering shards, their probabilities, shards quarantined meanwhile,
    shards unavailable). `serve(entries, texts)` returns (checkpoint key, probabilities) per
    shard entry, or None for a shard that cannot answer now (its actor is restarting after
    a crash or a lost node): the others answer without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = quarantine.read()
        if quarantine.damaged:
            raise Unavailable(quarantine.fail_closed())
        manifest = committed.read()
        if not (wait and before & {e.shard for e in manifest.shards if e.records}):
            asked = [e for e in manifest.shards if e.records > 0 and e.shard not in before]
            if not asked and not wait and any(e.records for e in manifest.shards):
                raise Unavailable(f"run {quote(committed.run)}: every shard holding records is being retrained "
                                  f"for an acknowledged deletion (shards {sorted(before)}); ask again, or wait")
            try:
                answers = serve(asked, texts) if asked else []
            except ObjectMissing:
                if _moved(committed):
                    continue
                raise
            unavailable = sorted(e.shard for e, answer in zip(asked, answers) if answer is None)
            if asked and len(unavailable) == len(asked):
                raise Unavailable(f"run {quote(committed.run)}: no shard can answer now: shards {unavailable} are "
                                  f"restarting (a crashed actor or a lost node); ask again")
            answered = [(e, answer) for e, answer in zip(asked, answers) if answer is not None]
            after = quarantine.read()
            now = committed.read()
            kept = [(e.shard, probs) for e, (key, probs) in answered
                    if e.shard not in after and not quarantine.damaged and now.shards[e.shard].checkpoints[-1] == key]
            if len(kept) == len(answered):  # else a shard was quarantined or committed meanwhile: ask again
                return now, [k for k, _ in kept], [p for _, p in kept], sorted(before | after), unavailable
        if time.monotonic() > deadline:
            raise UnlearnError(f"run {quote(committed.run)}: shards {sorted(before)} still retraining "
                               f"after {timeout_s:.0f} s")
        time.sleep(0.05)


def predict_in_context(committed: Committed, quarantine: Quarantine, serve: Callable, texts: Sequence[str],
                       wait: bool = False, timeout_s: float = 3600.0) -> dict:
    """ERASE: `serve(manifest, texts, exclude)` answers with the committed prompt minus the
    quarantined examples (all of them while a queue entry is damaged). The answer is asked
    again if an example it used became quarantined or was deleted while it was computed."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = quarantine.read()
        manifest = committed.read()
        every = bool(quarantine.damaged)
        withheld = sorted(set(manifest.selected_ids) if every else before & set(manifest.selected_ids))
        if not (wait and withheld and not every):
            try:
                out = serve(manifest, texts, withheld)
            except ObjectMissing:
                if _moved(committed):
                    continue
                raise
            after = quarantine.read()
            committed.read()
            used = set(out["examples"])
            if not (used & after) and not (used and quarantine.damaged) and committed.holds(used):
                out["quarantined"] = withheld
                return out
        if time.monotonic() > deadline:
            raise UnlearnError(f"run {quote(committed.run)}: examples still being deleted after {timeout_s:.0f} s")
        time.sleep(0.05)


class Serving:
    """Answers for one run that honour every queued deletion. Read-only: it never takes
    the run lock and never applies or marks a request."""

    def __init__(self, store: Store, run: str):
        self.committed = Committed(store, run)
        self.quarantine = Quarantine(store, run)

    def shards(self, serve: Callable, texts: Sequence[str], wait: bool = False, timeout_s: float = 3600.0):
        """SISA: (manifest, shards that answered, probabilities [S', n, L], quarantined shards,
        shards whose actors were restarting)."""
        from sisa.run import stack_probabilities

        manifest, shards, probs, quarantined, unavailable = predict_shards(self.committed, self.quarantine, serve,
                                                                           texts, wait, timeout_s)
        return manifest, shards, stack_probabilities(probs, len(texts), manifest.config), quarantined, unavailable

    def predict(self, texts: Sequence[str], serve: Callable, method: str = "vote", wait: bool = False,
                timeout_s: float = 3600.0) -> dict:
        """SISA: `serve(entries, texts)` gives (checkpoint key, probabilities) per shard entry;
        ERASE: `serve(manifest, texts, exclude)` gives the in-context answer."""
        if self.committed.read().method == "erase":
            return predict_in_context(self.committed, self.quarantine, serve, texts, wait, timeout_s)
        from sisa.run import format_predictions

        manifest, shards, probs, quarantined, unavailable = self.shards(serve, texts, wait, timeout_s)
        out = format_predictions(manifest, texts, shards, probs, method)
        out["quarantined"] = quarantined
        if unavailable:
            out["unavailable"] = unavailable
        return out

    def generate(self, prompts: Sequence[str], next_probs: Callable, max_new_tokens: int = 32,
                 shard: int | None = None, wait: bool = False, timeout_s: float = 3600.0) -> dict:
        """SISA-LM: greedy continuations by the shards that may answer now; a shard with a
        pending deletion contributes no token (the whole generation is asked again if one
        became quarantined or was committed while it ran). `next_probs(entries, sequences)`
        gives (checkpoint key, [n, V]) per shard entry."""
        from sisa.generate import generate_answers

        config = self.committed.read().config

        def serve(entries, texts):
            use = [e for e in entries if shard is None or e.shard == shard]
            if shard is not None and not use:
                raise Unavailable(f"run {quote(self.committed.run)}: shard {shard} is being retrained for an "
                                  f"acknowledged deletion; ask again, or wait")
            out = generate_answers(config, texts, use, next_probs, max_new_tokens)
            return [(e.checkpoints[-1], out) for e in entries]

        _manifest, _shards, answers, quarantined, _ = predict_shards(self.committed, self.quarantine, serve,
                                                                     prompts, wait, timeout_s)
        if not answers:
            raise UnlearnError(f"run {quote(self.committed.run)}: no shard holds records; nothing can generate")
        return {**answers[0], "quarantined": quarantined}
