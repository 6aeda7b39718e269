"""Ray runtime benchmark: ensemble inference through Ray vs in-process, deletion
throughput under a request stream with batching windows, and memory per shard actor
with and without shared base weights.

    python bench/ray_bench.py            # what `make bench` runs after sisa_bench.py

All ratios come from one process in one run; results in bench/results/ray.{json,md}.
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

import cluster  # noqa: E402,F401  (Ray environment defaults)
from cluster.runtime import RayExecutor, coordinator_actor, init_ray, ray_get, wait_request  # noqa: E402
from sisa.config import SisaConfig  # noqa: E402
from core.sources import load_records  # noqa: E402
from core.records import with_labels  # noqa: E402
from sisa.run import SisaRun  # noqa: E402
from sisa.shard import LocalExecutor  # noqa: E402
from core.store import LocalStore  # noqa: E402

MB = 2**20


def inference(store, records, texts, shards: int, model: str) -> dict:
    config = with_labels(SisaConfig(shards=shards, slices=2, epochs="1", model=model), records)
    run = SisaRun.train(store, "infer", records, config, executor=RayExecutor(store, "infer", config))
    entries = [s for s in run.manifest.shards if s.records]
    local = LocalExecutor(store, "infer", config)
    ray_exec = RayExecutor(store, "infer", config)
    local.predict(entries, texts[:8])  # warm: model and checkpoints loaded
    ray_exec.predict(entries, texts[:8])
    t0 = time.perf_counter()
    local.predict(entries, texts)
    local_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray_exec.predict(entries, texts)
    ray_s = time.perf_counter() - t0
    return {"shards": len(entries), "texts": len(texts), "in_process_s": round(local_s, 3), "ray_s": round(ray_s, 3),
            "in_process_texts_per_s": round(len(texts) / local_s, 1), "ray_texts_per_s": round(len(texts) / ray_s, 1),
            "ray_speedup": round(local_s / ray_s, 2)}


def stream(store, records, window_s: float, n_requests: int, interval_s: float, model: str) -> dict:
    name = f"stream-w{int(window_s)}"
    config = with_labels(SisaConfig(shards=4, slices=4, epochs="1", model=model), records)
    SisaRun.train(store, name, records, config, executor=RayExecutor(store, name, config))
    handle = coordinator_actor(store, name, window_s=window_s)
    ray_get(handle.pid.remote())  # started, outside the timing
    victims = [r.id for r in records[::max(1, len(records) // n_requests)]][:n_requests]
    t0 = time.perf_counter()
    ids = []
    for rid in victims:
        ids.append(ray_get(handle.submit.remote([rid], [])))
        time.sleep(interval_s)
    done = [wait_request(handle, i, timeout_s=3600) for i in ids]
    total = time.perf_counter() - t0
    batches = {r["batch_id"] for r in done}
    return {"window_s": window_s, "requests": n_requests, "interval_s": interval_s, "total_s": round(total, 2),
            "requests_per_min": round(60 * n_requests / total, 2), "batches": len(batches),
            "all_done": all(r["status"] == "done" for r in done)}


def memory(store, records, model: str, shards: int) -> list[dict]:
    rows = []
    for share in (False, True):
        name = f"mem-{model}-{int(share)}"
        config = with_labels(SisaConfig(shards=shards, slices=1, epochs="1", model=model), records)
        executor = RayExecutor(store, name, config, share_base=share)
        [ray_get(executor.actor(k).memory.remote()) for k in range(shards)]  # every actor loads first
        infos = [ray_get(executor.actor(k).memory.remote()) for k in range(shards)]  # then all are measured
        rows.append({"model": model, "shared_base": share, "actors": shards,
                     "rss_mb_mean": round(sum(i["rss"] for i in infos) / shards / MB, 1),
                     "uss_mb_mean": round(sum(i["uss"] for i in infos) / shards / MB, 1),
                     "pss_mb_mean": round(sum(i["pss"] for i in infos) / shards / MB, 1)})
        import ray

        for k in range(shards):
            ray.kill(executor.actor(k))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between requests of the stream")
    ap.add_argument("--memory-models", default="minilm,smollm2-135m")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    init_ray()
    records = load_records(f"dataset:rotten_tomatoes?split=train&limit={args.records}")
    texts = [r.text for r in load_records(f"dataset:rotten_tomatoes?split=test&limit={args.texts}")]
    with tempfile.TemporaryDirectory(prefix="unlearn-raybench-") as tmp:
        store = LocalStore(tmp)
        inf = inference(store, records, texts, 4, args.model)
        print(json.dumps(inf), file=sys.stderr, flush=True)
        streams = []
        for w in (0.0, 5.0):
            streams.append(stream(store, records, w, args.requests, args.interval, args.model))
            print(json.dumps(streams[-1]), file=sys.stderr, flush=True)
        mem = [row for m in args.memory_models.split(",") if m for row in memory(store, records[:40], m, 4)]
    result = {"bench": "ray", "model": args.model, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "inference": inf, "deletion_stream": streams, "memory": mem}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ray.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"Ray runtime, model {args.model}, {platform.machine()} with {os.cpu_count()} cores",
        "",
        f"Ensemble inference, {inf['shards']} shards x {inf['texts']} texts: in-process loop "
        f"{inf['in_process_texts_per_s']} texts/s, Ray shard actors {inf['ray_texts_per_s']} texts/s "
        f"(ratio {inf['ray_speedup']}x)",
        "",
        "| batching window | requests | every | total s | requests/min | batches |",
        "|---|---|---|---|---|---|",
    ]
    for s in streams:
        lines.append(f"| {s['window_s']} s | {s['requests']} | {s['interval_s']} s | {s['total_s']} "
                     f"| {s['requests_per_min']} | {s['batches']} |")
    lines += ["", "| model | shared base weights | actors | RSS MB/actor | USS MB/actor | PSS MB/actor |",
              "|---|---|---|---|---|---|"]
    for m in mem:
        lines.append(f"| {m['model']} | {m['shared_base']} | {m['actors']} | {m['rss_mb_mean']} "
                     f"| {m['uss_mb_mean']} | {m['pss_mb_mean']} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "ray.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
