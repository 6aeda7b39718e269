"""ERASE vs SISA-LM on the same frozen LLM: the comparison the ERASE paper makes.

Both methods start from the same causal LM (SmolLM2-135M-Instruct by default), the same
labelled training records and the same held-out queries of each BIG-bench
multiple-choice task, and both answer by scoring every label's tokens by their
log-likelihood after "Text: ...\\nLabel:". They differ in what unlearning costs:

- 0-shot: the instruction and the query, no examples (erase.icl.InContextClassifier with
  an empty example list: an ERASE run cannot have k = 0);
- ERASE, k in {2, 4, 8}: `EraseRun.train` on the training records (MiniLM embeddings,
  quantized k-means; each label clustered apart when k >= #labels, which is EraseConfig's
  default, else all records together, since per-label needs a shot per label), its k
  examples in the prompt, the LM frozen;
- random k-shot: the same k, a keyed random draw of the training records (per label the
  counts ERASE shows when ERASE clusters per label, else k from the whole pool), in the
  same keyed prompt order;
- SISA-LM, S in {1, 2, 4} shards of R slices: `SisaRun.train` with the lm objective (a LoRA
  adapter per shard, loss on the label's tokens), accuracy by `run.evaluate(test, "mean")`
  (mean of the shards' label probabilities).

Measured per task and method: accuracy; the normalized score the paper uses, 0 = random
guessing (accuracy 1/#labels), 100 = the task's best (accuracy 1.0):
100 (acc - 1/L) / (1 - 1/L); the cost of deleting one record; the cost per query; and the
holistic-cost crossover, the number of queries per deletion above which SISA-LM costs less
than ERASE overall (`holistic` of bench/erase_accuracy_bench.py, the project's
definition: U x deletions + I x queries, see bench/results/holistic.md).

Deletion cost, ERASE: wall time of `run.delete` of one record (store writes and commit
included) on a LocalStore; keyed-random non-selected records and selected prompt examples
are timed apart and weighted as a uniformly random deletion (1 - k/N, k/N), as the
holistic bench does; each run is then verified against a from-scratch fit. SISA-LM: wall
time of `run.delete` of one record from a middle slice (slices 1..R-2, one request each),
averaged; that retrains the shard holding it from that slice on.
Cost per query: ERASE, random and 0-shot, one `predict_proba` call over all the test
queries with the prefix cache (the prefix computed once per call, amortised) plus the
three content-free queries of contextual calibration; SISA-LM, `run.evaluate` over the
same queries (every shard's stored adapter loaded and run). In-context accuracy is
reported raw and calibrated from the same scores; the headline is the calibrated one,
what `unlearn eval` gives on an ERASE run (EraseConfig.calibrate defaults to true).

Everything runs in this process (no Ray), offline, with fixed seeds; progress on stderr.

    python bench/paper_bench.py            # the full bench (27 minutes on 2 shared cores)
    python bench/paper_bench.py --quick    # tiny-lm, a few records, one task: under a minute
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

from core.keys import keyed_hash  # noqa: E402
from core.records import Record  # noqa: E402
from core.sources import load_records  # noqa: E402
from core.store import LocalStore  # noqa: E402
from erase.config import EraseConfig  # noqa: E402
from erase.icl import CONTENT_FREE, InContextClassifier  # noqa: E402
from erase.run import EraseRun, prompt_order  # noqa: E402
from sisa.config import SisaConfig  # noqa: E402
from sisa.run import SisaRun, get_trainer  # noqa: E402
from erase_accuracy_bench import RATIOS, holistic  # noqa: E402  (the project's holistic-cost definition)

# short texts (a SISA-LM query costs #labels x S forward passes of it): the bench must fit ~30 min on 2 cores
TASKS = ("intent_recognition", "sports_understanding", "strategyqa", "implicatures")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def log(msg: str) -> None:
    print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def normalized(acc: float, n_labels: int) -> float:
    """The paper's normalized score: 0 = random guessing, 100 = every query right."""
    chance = 1.0 / n_labels
    return round(100.0 * (acc - chance) / (1.0 - chance), 1)


class BenchEraseRun(EraseRun):
    """EraseRun with one embedder loaded per process (EraseRun.train loads its own each
    time); the embeddings, and so the clustering, are the same."""
    embedder = None

    @staticmethod
    def fit(records, config, progress=False, pool=None, embedder=None):
        return EraseRun.fit(records, config, progress, pool, embedder or BenchEraseRun.embedder)


def random_shots(pool: list[Record], per_label: dict[str, int], seed: int) -> list[str]:
    """Keyed random examples: per label as many as ERASE shows of it, or k from the whole
    pool ({"all": k}), in keyed order (the draw depends on the seed and ids only)."""
    out = []
    for label, n in sorted(per_label.items()):
        ranked = sorted((r.id for r in pool if label == "all" or r.label == label),
                        key=lambda i: (keyed_hash(seed, "random-shot", i), i))
        out += ranked[:n]
    return out


def score(clf: InContextClassifier, examples, texts: list[str], gold: np.ndarray, batch_size: int) -> dict:
    """One call over the queries and the content-free inputs: raw and calibrated accuracy
    from the same scores (what calibrate=True computes), seconds per query."""
    n = len(texts)
    t0 = time.perf_counter()
    probs = clf.predict_proba(examples, texts + list(CONTENT_FREE), use_cache=True, batch_size=batch_size)
    secs = time.perf_counter() - t0
    calibrated = probs[:n] / probs[n:].mean(axis=0)
    L = probs.shape[1]
    acc_raw = float((probs[:n].argmax(axis=1) == gold).mean())
    acc = float((calibrated.argmax(axis=1) == gold).mean())
    return {"accuracy": round(acc, 4), "normalized": normalized(acc, L),
            "accuracy_raw": round(acc_raw, 4), "normalized_raw": normalized(acc_raw, L),
            "predicted_label_counts": np.bincount(calibrated.argmax(axis=1), minlength=L).tolist(),
            "query_s": round(secs / (n + len(CONTENT_FREE)), 5), "prompt_tokens": len(clf.prefix_ids(examples))}


def erase_deletions(run: EraseRun, train: list[Record], n: int, n_selected: int, seed: int) -> dict:
    """n keyed-random non-selected records, then n_selected selected examples, one
    `run.delete` each (wall time); the expected cost of a uniformly random deletion;
    then `run.verify` (re-embed, re-cluster from scratch, compare)."""
    ranked = sorted((r.id for r in train), key=lambda i: (keyed_hash(seed, "paper-erase-victim", i), i))
    rows: dict[str, list[dict]] = {"non_selected": [], "selected": []}
    gone: list[str] = []
    k = len(run.manifest.selected_ids)
    N = run.manifest.records
    for j in range(n + n_selected):
        kind = "non_selected" if j < n else "selected"
        selected = run.manifest.selected_ids
        if kind == "selected":
            victim = prompt_order(seed + j, selected)[0]
        else:
            victim = next(i for i in ranked if i not in gone and i not in selected)
        gone.append(victim)
        t0 = time.perf_counter()
        receipt = run.delete(ids=[victim])
        secs = time.perf_counter() - t0
        rows[kind].append({"seconds": round(secs, 5), "changed": bool(receipt.details["selection_changed"]),
                           "reclustered": len(receipt.details["reclustered_partitions"])})
    t0 = time.perf_counter()
    verified = run.verify()
    verify_s = time.perf_counter() - t0

    def mean(rs: list[dict]) -> float | None:
        return round(sum(r["seconds"] for r in rs) / len(rs), 5) if rs else None

    non, sel = mean(rows["non_selected"]), mean(rows["selected"])
    share = k / N
    expected = (1 - share) * (non or 0.0) + share * (sel if sel is not None else (non or 0.0))
    return {"non_selected_mean_s": non, "selected_mean_s": sel, "selected_share": round(share, 5),
            "expected_s": round(expected, 5), "deletions": rows,
            "exact_after_deletions": verified["exact"], "verify_s": round(verify_s, 2)}


def run_erase(task: str, train: list[Record], test: list[Record], labels: list[str], clf: InContextClassifier,
              args, tmp: str) -> dict:
    texts = [r.text for r in test]
    gold = np.array([labels.index(r.label) for r in test])
    by_id = {r.id: r for r in train}
    out: dict = {"zero_shot": score(clf, [], texts, gold, args.batch_size), "erase": {}, "random": {}}
    log(f"{task} 0-shot: {out['zero_shot']}")
    for k in args.shots:
        per_label = k >= len(labels)
        cfg = EraseConfig(shots=k, per_label=per_label, seed=args.seed, embedder=args.embedder, lm=args.lm,
                          labels=tuple(labels))
        t0 = time.perf_counter()
        run = BenchEraseRun.train(LocalStore(os.path.join(tmp, f"erase-{task}-k{k}")), "erase", train, cfg)
        train_s = time.perf_counter() - t0
        res = score(clf, run.examples(), texts, gold, args.batch_size)
        res.update({"per_label": per_label, "train_s": round(train_s, 2),
                    "selected_ids": list(run.manifest.selected_ids)})
        log(f"{task} ERASE k={k}: acc {res['accuracy']} (raw {res['accuracy_raw']}), {res['query_s']} s/query")
        group = cfg.clustering().group_shots(labels)
        rand_ids = prompt_order(args.seed, random_shots(train, group, args.seed))
        rnd = score(clf, [(by_id[i].text, by_id[i].label) for i in rand_ids], texts, gold, args.batch_size)
        rnd["selected_ids"] = rand_ids
        log(f"{task} random k={k}: acc {rnd['accuracy']} (raw {rnd['accuracy_raw']})")
        res["deletion"] = erase_deletions(run, train, args.erase_deletions, args.erase_selected_deletions, args.seed)
        d = res["deletion"]
        log(f"{task} ERASE k={k} deletion: expected {d['expected_s']} s (non-selected {d['non_selected_mean_s']}, "
            f"selected {d['selected_mean_s']}), exact {d['exact_after_deletions']}")
        out["erase"][str(k)], out["random"][str(k)] = res, rnd
    return out


def middle_victims(layout: list[list[list[str]]], n: int, seed: int) -> list[tuple[str, int, int]]:
    """n (id, shard, slice): the i-th from middle slice position 1 + i mod (R - 2) (the last
    slice when R <= 2), the keyed-first record of that position across all shards."""
    R = len(layout[0])
    middle = list(range(1, R - 1)) or [R - 1]
    out: list[tuple[str, int, int]] = []
    for i in range(n):
        j = middle[i % len(middle)]
        pool = sorted(((rid, k) for k, shard in enumerate(layout) for rid in shard[j] if rid not in {o[0] for o in out}),
                      key=lambda p: (keyed_hash(seed, "paper-sisa-victim", i, p[0]), p[0]))
        if pool:
            out.append((pool[0][0], pool[0][1], j))
    return out


def run_sisa(task: str, train: list[Record], test: list[Record], labels: list[str], max_length: int, args,
             tmp: str) -> dict:
    out = {}
    for S in args.shards:
        cfg = SisaConfig(shards=S, slices=args.slices, epochs=args.epochs, seed=args.seed, model=args.lm,
                         labels=tuple(labels), batch_size=args.train_batch_size, max_length=max_length,
                         extra={"objective": "lm"})
        get_trainer(cfg)  # the base LM loaded outside every timing
        t0 = time.perf_counter()
        run = SisaRun.train(LocalStore(os.path.join(tmp, f"sisa-{task}-s{S}")), "sisa", train, cfg)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = run.evaluate(test, "mean")
        eval_s = time.perf_counter() - t0
        acc = ev["accuracy"]
        res = {"shards": S, "slices": args.slices, "train_s": round(train_s, 2), "accuracy": round(acc, 4),
               "normalized": normalized(acc, len(labels)), "shard_accuracy": [s["accuracy"] for s in ev["shards"]],
               "shard_records": [s.records for s in run.manifest.shards], "query_s": round(eval_s / len(test), 5)}
        log(f"{task} SISA-LM S={S}: train {res['train_s']} s, acc {res['accuracy']}, {res['query_s']} s/query")
        deletions = []
        for victim, shard, j in middle_victims(run.manifest.layout(), args.sisa_deletions, args.seed):
            t0 = time.perf_counter()
            receipt = run.delete(ids=[victim])
            secs = time.perf_counter() - t0
            deletions.append({"shard": shard, "slice": j, "seconds": round(secs, 3),
                              "retrain_fraction": receipt.retrain_fraction})
            log(f"{task} SISA-LM S={S}: deleted one record of shard {shard} slice {j} in {secs:.2f} s")
        res["deletions"] = deletions
        res["delete_mean_s"] = round(sum(d["seconds"] for d in deletions) / len(deletions), 3) if deletions else None
        out[str(S)] = res
    return out


def sized_max_length(records: list[Record], clf: InContextClassifier, cap: int) -> int:
    """SISA-LM's max_length: the longest rendered record ("Text: ...\\nLabel: <label>") of
    the task's train and test records, rounded up to 8 tokens, at most `cap`."""
    longest = 2 + max(len(clf.tokenizer("Text: " + r.text + "\nLabel: " + r.label)["input_ids"]) for r in records)
    return min(cap, max(16, -(-longest // 8) * 8))


def crossovers(task: dict) -> list[dict]:
    rows = []
    for k, e in task["erase"].items():
        for S, s in task["sisa"].items():
            if s["delete_mean_s"] is None:
                continue
            U = {"sisa": s["delete_mean_s"], "erase": e["deletion"]["expected_s"]}
            I = {"sisa": s["query_s"], "erase": e["query_s"]}
            rows.append({"erase_k": int(k), "sisa_shards": int(S), **holistic(U, I)})
    return rows


def fmt_cross(h: dict) -> str:
    c = h["crossover_queries_per_deletion"]
    if c is None:
        return f"none ({h['cheaper_below_crossover'].upper()} always)"
    return f"{c:,} ({h['cheaper_below_crossover'].upper()} below)"


def write_results(out: str, result: dict, echo: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "paper.json"), "w") as f:
        json.dump(result, f, indent=2)
    ks, Ss = result["shots"], result["shards"]
    head = (f"ERASE vs SISA-LM on the same frozen LM ({result['lm']}); train {result['train']} / test "
            f"{result['test']} records per task, SISA-LM R={result['slices']}, epochs {result['epochs']}, batch "
            f"{result['train_batch_size']}, LoRA r=8; seed {result['seed']}; {result['machine']}, torch threads "
            f"{result['threads']} (SISA training: 1); {result['date']}")
    cols = ["0-shot"] + [f"ERASE k={k}" for k in ks] + [f"random k={k}" for k in ks] + [f"SISA-LM S={S}" for S in Ss]
    lines = [head, "", "Accuracy (normalized score: 0 = random guessing, 100 = all right). In-context columns are "
             "calibrated (raw accuracy in paper.json); SISA-LM is the mean of the shards' probabilities.", "",
             "| task | labels | train | test | majority | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(cols)]
    norm_sums = [0.0] * len(cols)
    for t in result["tasks"]:
        cells = [t["zero_shot"]] + [t["erase"][str(k)] for k in ks] + [t["random"][str(k)] for k in ks] + \
                [t["sisa"][str(S)] for S in Ss]
        for i, c in enumerate(cells):
            norm_sums[i] += c["normalized"]
        lines.append(f"| {t['task']} | {len(t['labels'])} | {t['train']} | {t['test']} | {t['majority_accuracy']} | "
                     + " | ".join(f"{c['accuracy']:.3f} ({c['normalized']:+.1f})" for c in cells) + " |")
    n = len(result["tasks"])
    lines.append("| mean normalized | | | | | " + " | ".join(f"{s / n:+.1f}" for s in norm_sums) + " |")
    lines += ["", "Cost (seconds): deletion of one record (ERASE: expected over a uniformly random record, "
              "`run.delete`; SISA-LM: mean over records of middle slices) / per query.", "",
              "| task | " + " | ".join(f"ERASE k={k}" for k in ks) + " | " + " | ".join(f"SISA-LM S={S}" for S in Ss)
              + " | 0-shot query |", "|---|" + "---|" * (len(ks) + len(Ss) + 1)]
    for t in result["tasks"]:
        e = [f"{t['erase'][str(k)]['deletion']['expected_s']:.4f} / {t['erase'][str(k)]['query_s']:.4f}" for k in ks]
        s = [f"{t['sisa'][str(S)]['delete_mean_s']} / {t['sisa'][str(S)]['query_s']:.4f}" for S in Ss]
        lines.append(f"| {t['task']} | " + " | ".join(e + s) + f" | {t['zero_shot']['query_s']:.4f} |")
    lines += ["", "Holistic-cost crossover (U x deletions + I x queries): queries per deletion at which ERASE "
              "and SISA-LM cost the same; below it the named method is cheaper.", "",
              "| task | ERASE k | " + " | ".join(f"vs SISA-LM S={S}" for S in Ss) + " |", "|---|---|" + "---|" * len(Ss)]
    for t in result["tasks"]:
        for k in ks:
            row = {c["sisa_shards"]: c for c in t["holistic"] if c["erase_k"] == k}
            lines.append(f"| {t['task']} | {k} | " + " | ".join(fmt_cross(row[S]) if S in row else "-" for S in Ss) + " |")
    pairs = [(t["erase"][str(k)]["accuracy"], t["sisa"][str(S)]["accuracy"]) for t in result["tasks"]
             for k in ks for S in Ss]
    better, equal = sum(e > s for e, s in pairs), sum(e == s for e, s in pairs)
    exact = all(t["erase"][str(k)]["deletion"]["exact_after_deletions"] for t in result["tasks"] for k in ks)
    lines += ["", f"ERASE is more accurate than SISA-LM in {better} of {len(pairs)} (task, k, S) pairs, as accurate "
              f"in {equal}, less accurate in {len(pairs) - better - equal}. Best of each per task:"]
    for t in result["tasks"]:
        ek = max(ks, key=lambda k: (t["erase"][str(k)]["accuracy"], -k))
        sS = max(Ss, key=lambda S: (t["sisa"][str(S)]["accuracy"], -S))
        e, s = t["erase"][str(ek)]["accuracy"], t["sisa"][str(sS)]["accuracy"]
        verdict = "ERASE ahead" if e > s else ("tie" if e == s else "SISA-LM ahead")
        lines.append(f"- {t['task']}: ERASE {e:.3f} (k={ek}) vs SISA-LM {s:.3f} (S={sS}): {verdict}")
    lines += ["", f"Every ERASE run verified exact after its deletions: {exact}. Wall time {result['wall_s']} s"
              + ("." if result["complete"] else " (INCOMPLETE: written after each task, the run did not finish).")]
    with open(os.path.join(out, "paper.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


def summary(args, tasks: list[dict], t_start: float, complete: bool) -> dict:
    return {"bench": "paper", "lm": args.lm, "embedder": args.embedder, "train": args.train, "test": args.test,
            "shots": args.shots, "shards": args.shards, "slices": args.slices, "epochs": args.epochs,
            "train_batch_size": args.train_batch_size, "seed": args.seed, "threads": args.threads,
            "quick": args.quick, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "ratios_queries_per_deletion": RATIOS,
            "wall_s": round(time.perf_counter() - t_start, 1), "complete": complete, "tasks": tasks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny-lm and tiny embedder, 1 task, few records")
    ap.add_argument("--tasks", type=names, default=list(TASKS), help="comma-separated BIG-bench tasks")
    ap.add_argument("--lm", default="smollm2-135m", help="the frozen causal LM both methods use (preset or folder)")
    ap.add_argument("--embedder", default="minilm", help="ERASE's sentence encoder for clustering")
    ap.add_argument("--train", type=int, default=48, help="training records per task (train split, keyed subset)")
    ap.add_argument("--test", type=int, default=24, help="held-out queries per task (test split, keyed subset)")
    ap.add_argument("--shots", type=ints, default=[2, 4, 8], help="ERASE and random k values, comma-separated")
    ap.add_argument("--shards", type=ints, default=[1, 2, 4], help="SISA-LM shard counts S, comma-separated")
    ap.add_argument("--slices", type=int, default=4, help="SISA-LM slices R per shard")
    ap.add_argument("--epochs", default="1", help="SISA-LM epochs over each shard (all stages together)")
    ap.add_argument("--train-batch-size", type=int, default=8, help="SISA-LM training batch size")
    ap.add_argument("--max-length-cap", type=int, default=128, help="upper bound of SISA-LM's per-task max_length")
    ap.add_argument("--sisa-deletions", type=int, default=2, help="timed SISA-LM deletions per S (middle slices)")
    ap.add_argument("--erase-deletions", type=int, default=3, help="timed ERASE deletions of non-selected records per k")
    ap.add_argument("--erase-selected-deletions", type=int, default=1, help="timed ERASE deletions of prompt examples per k")
    ap.add_argument("--batch-size", type=int, default=8, help="in-context queries per forward pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for inference (training always uses 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every keyed choice (subsets, draws, runs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for paper.json and paper.md")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.lm, args.embedder = args.tasks[:1], "tiny-lm", "tiny"
        args.train, args.test, args.sisa_deletions, args.erase_deletions = 24, 8, 1, 1
        if args.out == os.path.join(HERE, "results"):
            args.out = os.path.join(tempfile.gettempdir(), "paper-bench-quick")

    import torch

    from erase.embed import Embedder

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    BenchEraseRun.embedder = Embedder(args.embedder)
    tasks = []
    with tempfile.TemporaryDirectory(prefix="unlearn-paper-bench-") as tmp:
        for task in args.tasks:
            labels = sorted({r.label for r in load_records(f"dataset:bigbench/{task}")})
            train = load_records(f"dataset:bigbench/{task}?split=train&limit={args.train}")
            test = load_records(f"dataset:bigbench/{task}?split=test&limit={args.test}")
            gold = np.array([labels.index(r.label) for r in test])
            log(f"{task}: {len(labels)} labels, {len(train)} train, {len(test)} test records")
            clf = InContextClassifier(args.lm, labels=labels)
            max_length = sized_max_length(train + test, clf, args.max_length_cap)
            icl = run_erase(task, train, test, labels, clf, args, tmp)
            del clf
            sisa = run_sisa(task, train, test, labels, max_length, args, tmp)
            t = {"task": task, "labels": labels, "train": len(train), "test": len(test),
                 "majority_accuracy": round(float(np.bincount(gold, minlength=len(labels)).max() / len(gold)), 4),
                 "chance_accuracy": round(1 / len(labels), 4), "sisa_max_length": max_length, **icl, "sisa": sisa}
            t["holistic"] = crossovers(t)
            tasks.append(t)
            # written after every task, so an interrupted run keeps what it measured
            write_results(args.out, summary(args, tasks, t_start, complete=False), echo=False)
    write_results(args.out, summary(args, tasks, t_start, complete=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
