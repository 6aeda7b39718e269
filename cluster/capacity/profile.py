"""`unlearn profile`: measure what training, deleting and answering cost on this machine.

Imperative shell around the real code paths: stages are timed through the same
`StageTrainer` the shard actors use, deletions through `SisaRun.delete` on a scratch
store, with one torch thread (one core per shard actor, as on Ray). Nothing touches a
user's run: calibrating on a run (`--run`) reads its configuration, records and
layout, and measures on a copy of a sample in a temporary store.

Per-example and per-stage costs come from timing one stage over the same records at two
epoch counts (a line through two points; the same texts, so their lengths cancel). The
fixed cost of a deletion is what a real deletion took beyond the time spent training its
stages, split into a per-batch and a per-shard part by deleting from one shard and then
from two in one batch. Each timing is the minimum of repeats: the
machine is shared and the minimum is the least disturbed.
"""
from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from fractions import Fraction
from typing import Callable, Sequence

from cluster.options import OptionError
from sisa.config import SisaConfig
from core.errors import UnlearnError
from sisa.plan import stage_pass_sizes
from core.records import Record

from .costs import Profile

# ERASE values used until a measurement replaces them (documented as placeholders).
ERASE_PLACEHOLDERS = {
    "erase_certificate_s": 0.002,
    "erase_recluster_s_per_record": 0.0005,
    "erase_fallback_p": 0.01,
    "erase_batch_fixed_s": 0.05,
}

# Training examples a timing may take (--records x --epochs): 96 x 3 take about a minute with
# minilm, this about two hours.
MAX_PROFILE_EXAMPLES = 30_000


def check_examples(epochs: str, records: int, whose: str = "--epochs") -> None:
    """Refuse a profile whose timings would train for hours: `records` x `epochs` (the
    run's, with --run) training examples."""
    examples = Fraction(epochs) * records
    if examples > MAX_PROFILE_EXAMPLES:
        raise OptionError("--records", f"{records} records x {whose} {epochs} is {float(examples):g} training examples "
                                       f"a timing; at most {MAX_PROFILE_EXAMPLES:,} (fewer --records)")


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _examples(config: SisaConfig, n: int) -> int:
    return sum(stage_pass_sizes(config.epochs_fraction, config.slices, n))


def measure_training(config: SisaConfig, records: Sequence[Record], repeats: int = 2) -> dict:
    """Seconds per example and per stage, checkpoint save, and per-query costs."""
    from sisa.checkpoint import dump_state
    from sisa.shard import get_trainer
    from core.determinism import deterministic

    if len(records) < 16:
        raise UnlearnError(f"--records {len(records)}: profiling needs at least 16 records")
    # the same records at two epoch counts: text lengths cancel, only the passes differ
    short = replace(config, epochs=str(Fraction(config.epochs) / 4))
    trainer, quick = get_trainer(config), get_trainer(short)  # one loaded model, two epoch counts
    state = trainer.initial_state(0)
    batch = list(records)
    for t in (trainer, quick):
        t.train_stage(state, batch, 0, 0)  # warm-up: tokenizes every record once
    t_big = _best(lambda: trainer.train_stage(state, batch, 0, 0), repeats)
    t_small = _best(lambda: quick.train_stage(state, batch, 0, 0), repeats)
    e_big, e_small = _examples(config, len(batch)), _examples(short, len(batch))
    per_example = max((t_big - t_small) / (e_big - e_small), t_big / e_big / 10)
    intercept = max(0.0, t_small - per_example * e_small)
    trained = trainer.train_stage(state, batch[: max(4, len(batch) // 4)], 0, 0)
    save = _best(lambda: dump_state(trained, {"profile": "1"}), repeats)
    texts = [r.text for r in batch]
    with deterministic():
        per_query = _best(lambda: trainer.predict_proba(trained, texts), repeats) / len(texts)
    return {"train_s_per_example": per_example, "stage_intercept_s": intercept, "save_s": save,
            "query_s_per_shard": per_query, "trainer": trainer}


def measure_prompt_query(trainer, config: SisaConfig, k: int, repeats: int = 3) -> float:
    """One forward pass of the profiled model over a prompt of k examples and a query
    (k + 1 texts of max_length tokens): what ERASE pays per query, when the profiled
    model is the in-context learner (profile smollm2-135m for that)."""
    import torch

    from core.determinism import deterministic

    model = trainer.clf.model
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    length = min((k + 1) * config.max_length, limit)
    gen = torch.Generator().manual_seed(0)
    vocab = trainer.clf.tokenizer.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=gen)
    model.eval()
    with deterministic(), torch.no_grad():
        return _best(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)), repeats)


def _victims(manifest, shards: Sequence[int], skip: set[str]) -> list[str]:
    """One record from the last slice of each given shard (a one-stage retrain)."""
    out = []
    for k in shards:
        ids = [i for i in manifest.shards[k].slices[-1].ids if i not in skip]
        if not ids:
            raise UnlearnError("profiling run: a shard's last slice is empty; use more --records")
        out.append(ids[0])
    return out


def measure_deletion(config: SisaConfig, records: Sequence[Record], save_s: float, repeats: int = 2) -> dict:
    """Fixed costs of a deletion from real deletions on a scratch store (S=2, R=2): what a
    deletion took beyond the time spent inside stage training (timed around the trainer
    itself). Deleting from one shard and then from two in one batch separates the part
    paid per batch from the part paid per retrained shard."""
    from sisa.run import SisaRun
    from sisa.shard import LocalExecutor
    from core.store import LocalStore

    cfg = replace(config, shards=2, slices=2)
    with tempfile.TemporaryDirectory(prefix="unlearn-profile-") as tmp:
        store = LocalStore(tmp)
        run = SisaRun.train(store, "profile", list(records), cfg)
        executor = LocalExecutor(store, "profile", run.config)
        trainer = executor.worker.trainer
        inner, spent = trainer.train_stage, [0.0]

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        trainer.train_stage = timed
        run.executor = executor
        used: set[str] = set()
        beyond: dict[int, float] = {1: float("inf"), 2: float("inf")}
        for _ in range(repeats):
            for n_shards in (1, 2):
                victims = _victims(run.manifest, range(n_shards), used)
                used.update(victims)
                spent[0] = 0.0
                t0 = time.perf_counter()
                run.delete(ids=victims)
                beyond[n_shards] = min(beyond[n_shards], time.perf_counter() - t0 - spent[0])
    per_shard = max(0.0, beyond[2] - beyond[1])  # includes saving the one stage redone
    return {"shard_fixed_s": max(0.0, per_shard - save_s), "batch_fixed_s": max(0.0, beyond[1] - per_shard)}


def measure(config: SisaConfig, records: Sequence[Record], erase: dict, layout: list | None = None,
            repeats: int = 2, k: int = 4, progress: Callable[[str], None] = lambda _m: None) -> Profile:
    """A full profile of `config.model` on this machine; ERASE fields from `erase`
    (measured values read by the caller) or placeholders."""
    progress(f"timing stages of {config.model} on {len(records)} records")
    t = measure_training(config, records, repeats)
    stage_fixed = t["stage_intercept_s"] + t["save_s"]
    progress("timing real deletions on a scratch store")
    d = measure_deletion(config, records, t["save_s"], repeats)
    progress("timing one prompt of k examples")
    prompt = measure_prompt_query(t["trainer"], config, k)
    how = f"measured here ({len(records)} records, 1 torch thread)"
    sources = {"train_s_per_example": how, "stage_fixed_s": how + ": stage intercept + checkpoint save",
               "shard_fixed_s": how + ": real deletions on a scratch store, beyond stage training",
               "batch_fixed_s": how + ": real deletions on a scratch store, beyond stage training",
               "query_s_per_shard": how + ": batched predict_proba",
               "erase_query_s": f"measured here: one forward pass of {config.model} over {k + 1} x "
                                f"{config.max_length} tokens"}
    values = {**ERASE_PLACEHOLDERS, "erase_query_s": prompt, "erase_k": k, "erase_fallback_by_leaf": None}
    for name in ERASE_PLACEHOLDERS:
        sources[name] = "placeholder (no ERASE measurement available)"
    for name, (value, source) in erase.items():  # measured ERASE values replace both
        values[name] = value
        sources[name] = source
    return Profile(
        model=config.model, machine=f"{platform.machine()}, {_cores()} cores", date=_today(),
        epochs=float(Fraction(config.epochs)), train_s_per_example=t["train_s_per_example"],
        stage_fixed_s=stage_fixed, shard_fixed_s=d["shard_fixed_s"], batch_fixed_s=d["batch_fixed_s"],
        query_s_per_shard=t["query_s_per_shard"], sources=sources, layout=layout,
        notes=f"batch size {config.batch_size}, max length {config.max_length}, LoRA r {config.lora_r}",
        **values)


def calibrate_run(store, run_name: str, erase: dict, sample: int = 96, repeats: int = 2,
                  progress: Callable[[str], None] = lambda _m: None) -> Profile:
    """A profile for an existing run: its model and configuration, a sample of its
    records (read from the store, never modified), and its real layout."""
    from core.keys import keyed_hash
    from sisa.run import SisaRun
    from sisa.shard import ShardWorker

    run = SisaRun.open(store, run_name)
    check_examples(run.config.epochs, min(sample, sum(len(sl.ids) for s in run.manifest.shards for sl in s.slices)),
                   "the run's epochs")
    worker = ShardWorker(store, run_name, run.config)
    records = [r for s in run.manifest.shards for sl in s.slices for r in worker.load_slice(sl.data)]
    records.sort(key=lambda r: keyed_hash(0, "profile-sample", r.id))
    layout = [[len(sl.ids) for sl in s.slices] for s in run.manifest.shards]
    return measure(run.config, records[:sample], erase, layout=layout, repeats=repeats, progress=progress)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _today() -> str:
    return datetime.now(timezone.utc).date().isoformat()
