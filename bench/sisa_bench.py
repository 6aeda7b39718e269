"""SISA benchmark: full retraining vs deletion, and ensemble accuracy, over S and R.

For every (S, R): train on the same data (the same e epochs of compute whatever S and
R are), measure accuracy on held-out movies, then delete single records one request
at a time and time each deletion. Victims are stratified by slice (one record from
each slice position, max(R, 2) in all), so the mean covers slice positions uniformly,
as the analytic expectation (1/S)(2R+1)/(3R) assumes. The baseline is the S=1, R=1 run's training time:
one model trained on all the data, which is what a deletion costs without SISA.
All ratios come from one process in one run.

    python bench/sisa_bench.py                      # what `make bench` runs
    python bench/sisa_bench.py --records 300 --shards 1,4 --slices 1,4   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sisa.config import SisaConfig  # noqa: E402
from core.keys import keyed_hash  # noqa: E402
from sisa.plan import expected_retrain_fraction  # noqa: E402
from core.sources import load_records  # noqa: E402
from sisa.run import SisaRun, get_trainer  # noqa: E402
from core.store import LocalStore  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def stratified_victims(layout: list[list[list[str]]], n: int) -> list[str]:
    """n record ids, the i-th from slice i mod R, each the keyed-first of that slice
    position across all shards."""
    R = len(layout[0])
    out = []
    for i in range(n):
        pool = sorted((rid for shard in layout for rid in shard[i % R] if rid not in out),
                      key=lambda rid: keyed_hash(99, "bench-victim", i, rid))
        if pool:  # a slice position empty in every shard has nothing to delete
            out.append(pool[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--records", type=int, default=600, help="training records (rotten_tomatoes train split)")
    ap.add_argument("--test", type=int, default=400, help="held-out records for accuracy")
    ap.add_argument("--epochs", default="3")
    ap.add_argument("--shards", type=ints, default=[1, 4, 8])
    ap.add_argument("--slices", type=ints, default=[1, 4, 8])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    train = load_records(f"dataset:rotten_tomatoes?split=train&limit={args.records}")
    test = load_records(f"dataset:rotten_tomatoes?split=test&limit={args.test}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="unlearn-bench-") as tmp:
        store = LocalStore(tmp)
        base = SisaConfig(model=args.model, epochs=args.epochs, labels=tuple(sorted({r.label for r in train})))
        get_trainer(base)  # load the base model once, outside every timing
        for S in args.shards:
            for R in args.slices:
                cfg = SisaConfig.from_json({**base.to_json(), "shards": S, "slices": R})
                name = f"s{S}-r{R}"
                t0 = time.perf_counter()
                run = SisaRun.train(store, name, train, cfg)
                train_s = time.perf_counter() - t0
                acc = run.evaluate(test, "vote")
                times, fractions = [], []
                for victim in stratified_victims(run.manifest.layout(), max(R, 2)):
                    t0 = time.perf_counter()
                    receipt = run.delete(ids=[victim])
                    times.append(time.perf_counter() - t0)
                    fractions.append(receipt.retrain_fraction)
                row = {
                    "shards": S, "slices": R, "train_s": round(train_s, 2),
                    "delete_mean_s": round(sum(times) / len(times), 3), "delete_s": [round(t, 3) for t in times],
                    "retrain_fraction_mean": round(sum(fractions) / len(fractions), 4),
                    "analytic_fraction": round(expected_retrain_fraction(S, R), 4),
                    "accuracy_vote": acc["accuracy"],
                    "shard_accuracy_mean": round(sum(s["accuracy"] for s in acc["shards"]) / len(acc["shards"]), 4),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                SisaRun.drop(store, name)
    full = next((r["train_s"] for r in rows if r["shards"] == 1 and r["slices"] == 1), None)
    single_acc = next((r["accuracy_vote"] for r in rows if r["shards"] == 1 and r["slices"] == 1), None)
    for r in rows:
        r["speedup_measured"] = round(full / r["delete_mean_s"], 2) if full else None
        r["speedup_analytic"] = round(1 / r["analytic_fraction"], 2)
    result = {
        "bench": "sisa", "model": args.model, "records": len(train), "test_records": len(test),
        "epochs": args.epochs, "full_training_s": full, "single_model_accuracy": single_acc,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads per trainer: 1",
        "date": time.strftime("%Y-%m-%d"), "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sisa.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"SISA on rotten_tomatoes ({len(train)} train / {len(test)} held-out records), model {args.model}, "
        f"{args.epochs} epochs; full single-model training: {full} s, accuracy {single_acc}",
        "",
        "| S | R | train s | mean delete s | speedup measured | speedup analytic | retrain fraction (mean / analytic) | ensemble acc (vote) | mean shard acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shards']} | {r['slices']} | {r['train_s']} | {r['delete_mean_s']} | {r['speedup_measured']}x "
                     f"| {r['speedup_analytic']}x | {r['retrain_fraction_mean']} / {r['analytic_fraction']} "
                     f"| {r['accuracy_vote']} | {r['shard_accuracy_mean']} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "sisa.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
