"""ERASE accuracy and the holistic unlearning cost, against random k-shot, 0-shot and SISA.

For each task (rotten_tomatoes, 2-way; BIG-bench intent_recognition, 7-way) the example
pool is the task's train split and the held-out queries its test split (keyed by owner,
as `dataset:` does). Every prompt method uses the same frozen SmolLM2-135M and the same
template; they differ only in which k examples they show:

- ERASE: MiniLM embeddings of the pool, `EraseModel.fit(ClusteringConfig(shots=k,
  per_label=True))`, the selected ids ordered by keyed_hash(seed, "erase-prompt-order", id);
- random: per label the same number of examples as ERASE, the keyed-first records of that
  label (keyed_hash(seed, "random-shot", id)), in the same keyed prompt order;
- 0-shot: the instruction only.

SISA (S=4, R=4, LoRA on MiniLM): rotten_tomatoes accuracy and deletion time are read from
bench/results/sisa.json; on intent_recognition a run is trained here in-process. SISA's
cost per query is measured with that run's `predict` on each task's queries (the cost of S
shard forward passes depends on S, the model and the text lengths, not on the weights).

Cost per query, ERASE: all test queries in one call with the prefix cache (the example
prefix is computed once, amortised over the queries) and, on a subset, without it (the
whole prompt per query); the two must agree. Cost per deletion, ERASE: timed single-record
deletions on the bench pool, non-selected records and selected examples apart, each plus a
prefix recomputation when it changed the selected examples (helper A's
erase_deletion.json, if present, is copied into holistic.json for reference). At the end
the model after deletions must have the digest of a fit on the retained records.

Accuracy is reported raw and with contextual calibration (erase.icl, calibrate=True),
computed from the same scores.

    python bench/erase_accuracy_bench.py            # about 10 minutes on 2 cores
    python bench/erase_accuracy_bench.py --quick    # smoke run, about 2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from erase.clustering import ClusteringConfig  # noqa: E402
from erase.embed import Embedder  # noqa: E402
from erase.icl import CONTENT_FREE, InContextClassifier  # noqa: E402
from erase.model import EraseModel  # noqa: E402
from sisa.config import SisaConfig  # noqa: E402
from core.keys import keyed_hash  # noqa: E402
from core.label_scoring import prefix_cache  # noqa: E402
from core.records import Record
from core.sources import load_records  # noqa: E402

RATIOS = [1, 100, 10_000, 1_000_000]  # queries per deletion
TASKS = ("rotten_tomatoes", "intent_recognition")


def prompt_order(seed: int, ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda i: (keyed_hash(seed, "erase-prompt-order", i), i))


def random_shots(pool: list[Record], per_label: dict[str, int], seed: int) -> list[str]:
    """The keyed-first records of each label, as many as ERASE shows of that label."""
    out = []
    for label, n in sorted(per_label.items()):
        ranked = sorted((r.id for r in pool if r.label == label), key=lambda i: (keyed_hash(seed, "random-shot", i), i))
        out += ranked[:n]
    return out


def holistic(U: dict[str, float], I: dict[str, float]) -> dict:
    """Totals U*D + I*Q per method for D = 1 deletion and Q = ratio queries, and the ratio
    Q/D at which SISA and ERASE cost the same: (U_sisa - U_erase) / (I_erase - I_sisa)."""
    rows = [{"queries_per_deletion": q, **{m: round(U[m] + I[m] * q, 4) for m in U}} for q in RATIOS]
    dI = I["erase"] - I["sisa"]
    dU = U["sisa"] - U["erase"]
    cross = dU / dI if dI != 0 else None
    if cross is not None and cross <= 0:
        cross = None  # one method is cheaper at every ratio
    cheaper_below = "erase" if dI > 0 else "sisa"
    return {"U_s": U, "I_s": I, "totals": rows, "crossover_queries_per_deletion": None if cross is None else round(cross, 1),
            "cheaper_below_crossover": cheaper_below if cross is not None else min(U, key=lambda m: U[m] + I[m] * 1000)}


def time_predict(clf: InContextClassifier, examples, texts, use_cache: bool, batch_size: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    probs = clf.predict_proba(examples, texts, use_cache=use_cache, batch_size=batch_size)
    return probs, time.perf_counter() - t0


def prefix_seconds(clf: InContextClassifier, examples) -> float:
    import torch

    ids = clf.prefix_ids(examples)
    t0 = time.perf_counter()
    with torch.inference_mode():
        prefix_cache(clf.model, ids)
    return time.perf_counter() - t0


def erase_deletions(pool: list[Record], X: np.ndarray, config: ClusteringConfig, n: int, n_selected: int, seed: int,
                    examples_of, clf) -> dict:
    """n single-record deletions of keyed-random non-selected records, then n_selected
    deletions of selected examples (the case that must change the prompt), each followed by
    a prefix recomputation when the selection changed; then an exactness check against a
    fresh fit on the retained records. Expected cost of a uniformly random deletion:
    (1 - k/N) x mean(non-selected) + k/N x mean(selected), each including its prefix time."""
    ids, labels = [r.id for r in pool], [r.label for r in pool]
    label_set = sorted(set(labels))
    model = EraseModel.fit(ids, labels, X, config, label_set=label_set)
    ranked = sorted(ids, key=lambda i: (keyed_hash(seed, "bench-erase-victim", i), i))
    victims: list[str] = []
    rows = {"non_selected": [], "selected": []}
    for j in range(n + n_selected):
        kind = "non_selected" if j < n else "selected"
        if kind == "selected":
            victim = prompt_order(seed + j, model.selected_ids)[0]
        else:
            victim = next(i for i in ranked if i not in victims and i not in model.selected_ids)
        victims.append(victim)
        report = model.delete([victim])
        prefix = prefix_seconds(clf, examples_of(model.selected_ids)) if report.selection_changed else 0.0
        rows[kind].append({"seconds": report.seconds, "prefix_s": prefix, "changed": report.selection_changed,
                           "reclustered": len(report.reclustered_partitions)})
    gone = set(victims)
    keep = [i for i, rid in enumerate(ids) if rid not in gone]
    fresh = EraseModel.fit([ids[i] for i in keep], [labels[i] for i in keep], X[keep], config, label_set=label_set)

    def summary(rs: list[dict]) -> dict:
        secs = sorted(r["seconds"] for r in rs)
        total = [r["seconds"] + r["prefix_s"] for r in rs]
        return {"deletions": len(rs), "p50_s": round(secs[len(secs) // 2], 6), "mean_s": round(sum(secs) / len(secs), 6),
                "max_s": round(secs[-1], 6), "selection_changed": sum(r["changed"] for r in rs),
                "reclustered_leaves": sum(r["reclustered"] for r in rs),
                "mean_with_prefix_s": round(sum(total) / len(total), 6)}

    non, sel = summary(rows["non_selected"]), summary(rows["selected"])
    share = config.shots / len(ids)
    return {"non_selected": non, "selected": sel, "selected_share": round(share, 5),
            "expected_s": round((1 - share) * non["mean_with_prefix_s"] + share * sel["mean_with_prefix_s"], 6),
            "exact_after_deletions": fresh.digest() == model.digest() and fresh.selected_ids == model.selected_ids}


def sisa_intent(train: list[Record], test: list[Record], rt_texts: list[str], seed: int, epochs: str) -> dict:
    """Train SISA S=4, R=4 in-process; accuracy, deletions (one per slice position) and the
    cost per query of its ensemble on both tasks' queries."""
    from sisa.run import SisaRun, get_trainer
    from core.store import LocalStore
    from sisa_bench import stratified_victims

    cfg = SisaConfig(model="minilm", shards=4, slices=4, epochs=epochs, seed=seed,
                     labels=tuple(sorted({r.label for r in train})))
    get_trainer(cfg)  # base model loaded outside every timing
    with tempfile.TemporaryDirectory(prefix="unlearn-erase-bench-") as tmp:
        store = LocalStore(tmp)
        t0 = time.perf_counter()
        run = SisaRun.train(store, "intent", train, cfg)
        train_s = time.perf_counter() - t0
        acc = run.evaluate(test, "vote")["accuracy"]
        per_query = {}
        for name, texts in (("intent_recognition", [r.text for r in test]), ("rotten_tomatoes", rt_texts)):
            t0 = time.perf_counter()
            run.predict(texts)
            per_query[name] = (time.perf_counter() - t0) / len(texts)
        times = []
        for victim in stratified_victims(run.manifest.layout(), 4):
            t0 = time.perf_counter()
            run.delete(ids=[victim])
            times.append(time.perf_counter() - t0)
    return {"shards": 4, "slices": 4, "epochs": epochs, "train_s": round(train_s, 2), "accuracy": acc,
            "delete_mean_s": round(sum(times) / len(times), 3), "delete_s": [round(t, 3) for t in times],
            "query_s": {k: round(v, 5) for k, v in per_query.items()}}


def sisa_rotten_tomatoes() -> dict:
    with open(os.path.join(HERE, "results", "sisa.json")) as f:
        data = json.load(f)
    row = next(r for r in data["rows"] if r["shards"] == 4 and r["slices"] == 4)
    return {"shards": 4, "slices": 4, "accuracy": row["accuracy_vote"], "delete_mean_s": row["delete_mean_s"],
            "source": f"bench/results/sisa.json ({data['records']} train / {data['test_records']} held-out records, "
                      f"{data['date']})"}


def helper_erase_deletion() -> dict | None:
    path = os.path.join(HERE, "results", "erase_deletion.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_task(task: str, args, embedder: Embedder, lm: str) -> tuple[dict, list[Record], list[Record]]:
    pool = load_records(f"dataset:{task}?split=train&limit={args.pool}")
    test = load_records(f"dataset:{task}?split=test&limit={args.test}")
    labels = sorted({r.label for r in pool})
    t0 = time.perf_counter()
    X = embedder.embed([r.text for r in pool])
    embed_s = time.perf_counter() - t0
    config = ClusteringConfig(shots=args.shots, per_label=True, seed=args.seed)
    t0 = time.perf_counter()
    model = EraseModel.fit([r.id for r in pool], [r.label for r in pool], X, config, label_set=labels)
    fit_s = time.perf_counter() - t0
    by_id = {r.id: r for r in pool}

    def examples_of(ids):
        return [(by_id[i].text, by_id[i].label) for i in prompt_order(args.seed, ids)]

    clf = InContextClassifier(lm, labels=labels)
    shots = {
        "erase": examples_of(model.selected_ids),
        "random": examples_of(random_shots(pool, config.group_shots(labels), args.seed)),
        "zero_shot": [],
    }
    texts = [r.text for r in test]
    gold = np.array([labels.index(r.label) for r in test])
    methods = {}
    n = len(texts)
    for name, examples in shots.items():
        # one call for the queries and the content-free inputs: raw and calibrated accuracy from
        # the same scores (what calibrate=True computes, see tests/test_icl.py)
        probs, secs = time_predict(clf, examples, texts + list(CONTENT_FREE), True, args.batch_size)
        calibrated = probs[:n] / probs[n:].mean(axis=0)
        methods[name] = {"accuracy": round(float((probs[:n].argmax(axis=1) == gold).mean()), 4),
                         "accuracy_calibrated": round(float((calibrated.argmax(axis=1) == gold).mean()), 4),
                         "predicted_label_counts": np.bincount(probs[:n].argmax(axis=1), minlength=len(labels)).tolist(),
                         "query_s_cached": round(secs / (n + len(CONTENT_FREE)), 5),
                         "prompt_tokens": len(clf.prefix_ids(examples))}
        print(f"{task} {name}: {methods[name]}", file=sys.stderr, flush=True)
    sub = texts[:args.cost_queries]
    cached, secs_c = time_predict(clf, shots["erase"], sub, True, args.batch_size)
    full, secs_f = time_predict(clf, shots["erase"], sub, False, args.batch_size)
    methods["erase"].update({"query_s_cached_subset": round(secs_c / len(sub), 5),
                             "query_s_no_cache": round(secs_f / len(sub), 5),
                             "cache_speedup": round(secs_f / secs_c, 2),
                             "cache_vs_full_max_abs_diff": float(np.abs(cached - full).max()),
                             "prefix_s": round(prefix_seconds(clf, shots["erase"]), 4)})
    deletion = erase_deletions(pool, X, config, args.deletions, args.selected_deletions, args.seed, examples_of, clf)
    print(f"{task} erase: {methods['erase']}\n{task} deletions: {deletion}", file=sys.stderr, flush=True)
    result = {
        "task": task, "pool": len(pool), "test": len(test), "labels": labels, "shots": args.shots,
        "majority_accuracy": round(float(np.bincount(gold).max() / len(gold)), 4),
        "selected_per_label": config.group_shots(labels), "embed_s": round(embed_s, 2), "fit_s": round(fit_s, 3),
        "methods": methods, "erase_deletion": deletion,
    }
    del clf
    return result, pool, test


def write_results(out: str, acc: dict, hol: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "erase_accuracy.json"), "w") as f:
        json.dump(acc, f, indent=2)
    with open(os.path.join(out, "holistic.json"), "w") as f:
        json.dump(hol, f, indent=2)
    lines = [f"ERASE vs random k-shot vs 0-shot vs SISA; LM {acc['lm']} (frozen), k = {acc['shots']}, seed {acc['seed']}, "
             f"{acc['machine']}, torch threads {acc['threads']}, {acc['date']}", "",
             "Accuracy on held-out queries (raw / with contextual calibration):", "",
             "| task | pool | test | majority class | ERASE k-shot | random k-shot | 0-shot | SISA S=4 R=4 |",
             "|---|---|---|---|---|---|---|---|"]
    for t in acc["tasks"]:
        m = t["methods"]
        cells = " | ".join(f"{m[k]['accuracy']} / {m[k]['accuracy_calibrated']}" for k in ("erase", "random", "zero_shot"))
        lines.append(f"| {t['task']} | {t['pool']} | {t['test']} | {t['majority_accuracy']} | {cells} | {t['sisa']['accuracy']} |")
    lines += ["", "Inference cost per query (seconds):", "",
              "| task | ERASE cached prefix | ERASE full prompt per query | cache speed-up | prompt tokens (ERASE) | 0-shot | SISA (4 shard passes) |",
              "|---|---|---|---|---|---|---|"]
    for t in acc["tasks"]:
        e = t["methods"]["erase"]
        lines.append(f"| {t['task']} | {e['query_s_cached']} | {e['query_s_no_cache']} | {e['cache_speedup']}x "
                     f"| {e['prompt_tokens']} | {t['methods']['zero_shot']['query_s_cached']} | {t['sisa']['query_s']} |")
    lines += ["", "Sources: " + "; ".join(f"{t['task']} SISA: {t['sisa']['source']}" for t in acc["tasks"])]
    with open(os.path.join(out, "erase_accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    hl = [f"Holistic unlearning cost U x deletions + I x queries (seconds), {hol['machine']}, {hol['date']}", ""]
    for t in hol["tasks"]:
        h = t["holistic"]
        hl += [f"**{t['task']}**: U (s per deletion) SISA {h['U_s']['sisa']}, ERASE {h['U_s']['erase']}; "
               f"I (s per query) SISA {h['I_s']['sisa']}, ERASE {h['I_s']['erase']}. {t['note']}", "",
               "| queries per deletion | SISA total s | ERASE total s | cheaper |", "|---|---|---|---|"]
        for row in h["totals"]:
            cheaper = "ERASE" if row["erase"] < row["sisa"] else "SISA"
            hl.append(f"| {row['queries_per_deletion']:,} | {row['sisa']} | {row['erase']} | {cheaper} |")
        cross = h["crossover_queries_per_deletion"]
        hl += ["", (f"Crossover: {cross:,} queries per deletion; below it {h['cheaper_below_crossover'].upper()} is cheaper."
                    if cross is not None else f"No crossover: {h['cheaper_below_crossover'].upper()} is cheaper at every ratio."), ""]
    helper = hol.get("erase_deletion_helper")
    if helper:
        hl += ["For scale, bench/results/erase_deletion.json (synthetic mixture, d=384; p50 ms per deletion, share "
               "of deletions that fell back to re-clustering): " + "; ".join(
                   f"N={r['N']} P={r['P']}: {r['p50_ms']} ms, fallback {r['fallback_rate']}" for r in helper["rows"]), ""]
    with open(os.path.join(out, "holistic.md"), "w") as f:
        f.write("\n".join(hl))
    print("\n".join(lines) + "\n\n" + "\n".join(hl))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small pool and test set, 1 SISA epoch")
    ap.add_argument("--lm", default="smollm2-135m")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=600, help="example pool per task (train split, keyed subset)")
    ap.add_argument("--test", type=int, default=200, help="held-out queries per task (test split, keyed subset)")
    ap.add_argument("--cost-queries", type=int, default=24, help="queries timed without the prefix cache")
    ap.add_argument("--deletions", type=int, default=12, help="timed ERASE deletions of non-selected records per task")
    ap.add_argument("--selected-deletions", type=int, default=3, help="timed ERASE deletions of selected examples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on shared cores)")
    ap.add_argument("--sisa-epochs", default="3")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.quick:
        args.pool, args.test, args.cost_queries, args.deletions, args.sisa_epochs = 120, 24, 8, 4, "1"
        args.selected_deletions = 2
        args.out = os.path.join(tempfile.gettempdir(), "erase-bench-quick")

    import torch

    torch.set_num_threads(args.threads)
    embedder = Embedder("minilm")
    tasks = []
    test_sets = {}
    pools = {}
    for task in TASKS:
        result, pool, test = run_task(task, args, embedder, args.lm)
        tasks.append(result)
        test_sets[task], pools[task] = test, pool
    sisa_ir = sisa_intent(pools["intent_recognition"], test_sets["intent_recognition"],
                          [r.text for r in test_sets["rotten_tomatoes"]], args.seed, args.sisa_epochs)
    print(f"sisa intent: {sisa_ir}", file=sys.stderr, flush=True)
    rt = sisa_rotten_tomatoes()
    tasks[0]["sisa"] = {**rt, "query_s": sisa_ir["query_s"]["rotten_tomatoes"],
                        "source": rt["source"] + "; cost per query measured here with the intent_recognition run's "
                                                 "4 shard models on these rotten_tomatoes queries"}
    tasks[1]["sisa"] = {**{k: v for k, v in sisa_ir.items() if k != "query_s"},
                        "query_s": sisa_ir["query_s"]["intent_recognition"],
                        "source": f"trained here in-process (minilm, S=4, R=4, {args.sisa_epochs} epochs)"}
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    date = time.strftime("%Y-%m-%d")
    helper = helper_erase_deletion()
    hol_tasks = []
    for t in tasks:
        d = t["erase_deletion"]
        U = {"sisa": t["sisa"]["delete_mean_s"], "erase": d["expected_s"]}
        I = {"sisa": t["sisa"]["query_s"], "erase": t["methods"]["erase"]["query_s_cached"]}
        note = (f"ERASE U = expected cost of a uniformly random deletion on this pool: non-selected records "
                f"{d['non_selected']['mean_with_prefix_s']} s, selected examples {d['selected']['mean_with_prefix_s']} s "
                f"(certificate + a prefix recomputation when the prompt changes), weighted by k/N = {d['selected_share']}; "
                f"SISA U = mean deletion, {t['sisa']['source'].split(';')[0]}.")
        hol_tasks.append({"task": t["task"], "holistic": holistic(U, I), "note": note})
    acc = {"bench": "erase_accuracy", "lm": args.lm, "embedder": "minilm", "shots": args.shots, "seed": args.seed,
           "threads": args.threads, "machine": machine, "date": date, "quick": args.quick, "tasks": tasks}
    hol = {"bench": "holistic", "machine": machine, "date": date, "ratios_queries_per_deletion": RATIOS,
           "erase_deletion_helper": helper, "tasks": hol_tasks}
    write_results(args.out, acc, hol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
