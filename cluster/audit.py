"""`unlearn audit`: what a run still knows about a forget set, next to a reference run
retrained without it. Composes sisa.audit (shard models, attacks) and ERASE's in-context
classifier with the pure measures of core.membership; runs in this process.

Per run (and per reference):
- knowledge of the forget set (and its paraphrased questions, if given), of retained
  records (utility: a keyed sample of what the run holds) and of the holdout set;
- membership inference: AUC of forget against holdout, for loss, zlib and min-k% scores;
- relearning (SISA and approximate runs): every shard fine-tuned on a keyed part of the
  forget set, then its knowledge of the rest, before and after;
- quantization (SISA and approximate runs): the forget set's knowledge with the shard
  models' weights rounded to 8 and 4 bits.
ERASE runs answer from their prompt: the attacks on weights do not apply (the LM is frozen
and shared by every run) and are reported as such.

An exact deletion leaves a run bit-identical to the reference, so each figure equals the
reference's; an approximate one does not, and the gaps say by how much.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from core.errors import UnlearnError
from core.keys import keyed_hash
from core.membership import Scored, knowledge, membership
from core.records import Record, quote
from core.store import Store

RETAIN_SAMPLE = 64
RELEARN_FRACTION = 0.2
RELEARN_STEPS = 10
RELEARN_LR = 1e-4  # an attacker's gentle fine-tuning (the usual LoRA rate), not the training's
BITS = (8, 4)


class EraseSubject:
    """An ERASE run as an audit sees it: label probabilities from its current prompt."""
    tokens = False

    def __init__(self, run):
        self.run = run
        self._index = {label: i for i, label in enumerate(run.config.labels)}

    def check_form(self, records: Sequence[Record], where: str) -> None:
        for r in records:
            if r.completion is not None or r.label not in self._index:
                raise UnlearnError(f"{where}: record {quote(r.id)}: run {quote(self.run.name)} predicts the labels "
                                   f"{list(self.run.config.labels)}; give id, text, label records with those labels")

    def held(self) -> list[Record]:
        return self.run.records()

    def score(self, records: Sequence[Record]) -> list[Scored]:
        if not records:
            return []
        probs = self.run.classifier().predict_proba(self.run.examples(), [r.text for r in records],
                                                    calibrate=self.run.config.calibrate)
        return [Scored.from_logprobs(np.log(np.maximum(np.asarray(row, dtype=np.float64), 1e-300))[None, :],
                                     [self._index[r.label]], r.text + " " + r.label) for row, r in zip(probs, records)]


class SisaSubject:
    def __init__(self, run):
        from sisa.audit import ShardModels

        self.run, self.models = run, ShardModels(run)
        self.tokens = self.models.tokens
        self.states = self.models.states()

    def check_form(self, records, where):
        self.models.check_form(records, where)

    def held(self):
        return self.models.held()

    def score(self, records):
        return self.models.score(self.states, records)


def subject(store: Store, name: str):
    from cluster.methods import open_run

    run = open_run(store, name)
    return EraseSubject(run) if run.manifest.method == "erase" else SisaSubject(run)


def keyed_part(records: Sequence[Record], fraction: float, tag: str) -> tuple[list[Record], list[Record]]:
    """(a keyed `fraction` of the records, at least one, the rest)."""
    order = sorted(records, key=lambda r: (keyed_hash(0, tag, r.id), r.id))
    n = max(1, round(fraction * len(order)))
    return order[:n], order[n:]


def check_sets(sub, forget: Sequence[Record], holdout: Sequence[Record], paraphrased: Sequence[Record],
               files: dict[str, str], reference: bool = False) -> None:
    run = sub.run
    for name, records in (("forget", forget), ("holdout", holdout), ("paraphrased", paraphrased)):
        sub.check_form(records, files[name])
    targets, already, unknown = run.resolve([r.id for r in forget], [])
    if reference:
        if targets:
            rid = sorted(targets)[0]
            raise UnlearnError(f"{files['forget']}: reference run {quote(run.name)} holds forget record {quote(rid)}: "
                               "a reference is a run trained without the forget set")
        if already and getattr(run.config, "approx", None) is not None:  # its model may still hold them
            raise UnlearnError(f"{files['forget']}: reference run {quote(run.name)} is approximate and unlearned "
                               f"forget record {quote(already[0])}: a reference is a run trained without the forget set")
    elif unknown:
        raise UnlearnError(f"{files['forget']}: {unknown[0]}: run {quote(run.name)} never held it (it neither holds "
                           "it nor deleted it)")
    inside, _already, _unknown = run.resolve([r.id for r in holdout], [])
    if inside:
        raise UnlearnError(f"{files['holdout']}: run {quote(run.name)} holds record {quote(sorted(inside)[0])}; "
                           "the holdout set must be records no run was trained on")
    if {r.id for r in forget} & {r.id for r in holdout}:
        raise UnlearnError(f"{files['holdout']}: record {quote(sorted({r.id for r in forget} & {r.id for r in holdout})[0])} "
                           "is in the forget set too")


def audit_run(sub, forget, holdout, paraphrased, retain, relearn_steps: int, relearn_fraction: float,
              relearn_lr: float,
              progress=None) -> dict:
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    say("knowledge")
    scored = {"forget": sub.score(forget), "holdout": sub.score(holdout)}
    out = {"run": sub.run.name, "method": method_of(sub.run), "knowledge": {}}
    if paraphrased:
        scored["forget_paraphrased"] = sub.score(paraphrased)
    scored["retain"] = sub.score(retain)
    out["knowledge"] = {k: knowledge(v) for k, v in scored.items()}
    out["membership"] = membership(scored["forget"], scored["holdout"])
    if isinstance(sub, EraseSubject):
        why = "not applicable: an ERASE run holds its data in the prompt, and its LM is frozen and shared by every run"
        out["relearn"] = out["quantization"] = {"skipped": why}
    else:
        attack, rest = keyed_part(forget, relearn_fraction, "relearn")
        if not rest:
            out["relearn"] = {"skipped": f"the forget set has {len(forget)} record(s): none left to measure after "
                                         "fine-tuning on a part of it"}
        else:
            say(f"relearning: {relearn_steps} steps on {len(attack)} forget records")
            models = sub.models
            attacked = models.relearned(sub.states, attack, relearn_steps, relearn_lr)
            out["relearn"] = {"steps": relearn_steps, "lr": relearn_lr, "attack_records": len(attack),
                              "measured_records": len(rest),
                              "before": knowledge(models.score(sub.states, rest)),
                              "after": knowledge(models.score(attacked, rest))}
        out["quantization"] = {}
        for bits in BITS:
            say(f"quantization: {bits} bits")
            out["quantization"][f"{bits}bit"] = {
                "forget": knowledge(sub.models.quantized_score(sub.states, forget, bits)),
                "retain": knowledge(sub.models.quantized_score(sub.states, retain, bits))}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def method_of(run) -> str:
    if run.manifest.method == "erase":
        return "erase"
    approx = run.config.approx
    return f"approx ({approx.method})" if approx else f"sisa ({run.config.objective}, S={run.config.shards})"


def audit(store: Store, name: str, forget: Sequence[Record], holdout: Sequence[Record],
          paraphrased: Sequence[Record] = (), reference: str | None = None, files: dict | None = None,
          retain_sample: int = RETAIN_SAMPLE, relearn_steps: int = RELEARN_STEPS,
          relearn_fraction: float = RELEARN_FRACTION, relearn_lr: float = RELEARN_LR, progress=None) -> dict:
    files = {"forget": "--forget", "holdout": "--holdout", "paraphrased": "--paraphrased", **(files or {})}
    if not forget or not holdout:
        raise UnlearnError(f"{files['forget' if not forget else 'holdout']}: no records")
    if reference == name:  # it would equal itself in every figure, whatever it still knows
        raise UnlearnError(f"--reference {quote(name)} is the run audited; a reference is another run, trained "
                           "without the forget set")
    sub = subject(store, name)
    check_sets(sub, forget, holdout, paraphrased, files)
    ref = None
    if reference is not None:
        ref = subject(store, reference)
        check_sets(ref, forget, holdout, paraphrased, files, reference=True)
        if ref.tokens != sub.tokens or isinstance(ref, EraseSubject) != isinstance(sub, EraseSubject):
            raise UnlearnError(f"reference run {quote(reference)} answers differently from run {quote(name)} "
                               "(prompt/completion vs labels, or another method's kind)")
    forget_ids = {r.id for r in forget}  # before a deletion the run still holds them
    held = [r for r in sub.held() if r.id not in forget_ids]
    retain = sorted(held, key=lambda r: (keyed_hash(0, "audit-retain", r.id), r.id))[:retain_sample]
    say = progress or (lambda _msg: None)
    say(f"run {name}")
    out = {"forget_records": len(forget), "holdout_records": len(holdout), "paraphrased_records": len(paraphrased),
           "retain_records": len(retain), "subject": audit_run(sub, forget, holdout, paraphrased, retain,
                                                               relearn_steps, relearn_fraction, relearn_lr,
                                                               progress)}
    if ref is not None:
        say(f"reference {reference}")
        out["reference"] = audit_run(ref, forget, holdout, paraphrased, retain, relearn_steps, relearn_fraction,
                                     relearn_lr,
                                     progress)
        out["membership_gap"] = {k: (None if v is None or out["reference"]["membership"][k] is None
                                     else round(v - out["reference"]["membership"][k], 6))
                                 for k, v in out["subject"]["membership"].items()}
        out["identical_to_reference"] = strip_seconds(out["subject"]) == strip_seconds(out["reference"])
    return out


def strip_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("seconds", "run", "method")}
