"""What the durable quarantine costs a prediction.

Every answering process reads the run's queue of accepted deletions (one LIST, plus one
GET per entry it has not seen) and HEAD (one small GET) before and after each batch of
texts. This measures that check against the number of queued requests, on a local
directory and on a real S3 server (SeaweedFS on loopback), and the whole guarded
prediction against an unguarded one in the same run (in-process, `tiny` model, S = 4).

    python bench/quarantine_bench.py        # results in bench/results/quarantine.{json,md}
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "deploy"), os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUEUED = (0, 10, 100, 1000)
REPEATS = 30


def timed(fn, repeats: int = REPEATS) -> float:
    """Median seconds of `fn()`."""
    fn()  # warm
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def paired(a, b, repeats: int = REPEATS) -> tuple[float, float]:
    """Median seconds of `a()` and of `b()`, run alternately so that drift hits both alike."""
    a(), b()  # warm
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def check_costs(store, run: str) -> list[dict]:
    """Median cost of one check (queue read + HEAD read) with n requests queued; the
    entries are written the way the coordinator writes them."""
    from cluster.coordinator import Coordinator
    from cluster.quarantine import Committed, Quarantine

    coord = Coordinator(store, run)
    ids = sorted(coord.manifest.owners())
    rows = []
    written = 0
    for n in QUEUED:
        while written < n:
            coord.submit(ids=[ids[written % len(ids)]])
            written += 1
        quarantine, committed = Quarantine(store, run), Committed(store, run)
        first = timed(lambda: (Quarantine(store, run).read(), committed.read()), repeats=3)  # cold: reads every entry
        steady = timed(lambda: (quarantine.read(), committed.read()))  # entries cached: LIST + HEAD
        rows.append({"queued": n, "first_check_ms": round(first * 1000, 3), "check_ms": round(steady * 1000, 3)})
    return rows


def main() -> int:
    from conftest import synthetic_records
    from seaweedfs import SeaweedFS

    from cluster.quarantine import Serving
    from sisa.config import SisaConfig
    from sisa.run import SisaRun
    from sisa.shard import LocalExecutor
    from core.store import LocalStore, S3Store

    config = SisaConfig(shards=4, slices=2, model="tiny", epochs="1", batch_size=8, max_length=32, labels=("neg", "pos"))
    records = synthetic_records(200, owners_every=1)
    results: dict = {"config": config.to_json(), "records": len(records), "repeats": REPEATS}
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalStore(os.path.join(tmp, "store"))
        SisaRun.train(local, "q", records, config)
        executor = LocalExecutor(local, "q", config)  # one for both: the same model cache
        run, serving = SisaRun.open(local, "q", executor), Serving(local, "q")
        texts = ["great fun", "dull and flat"] * 8
        plain, guarded = paired(lambda: run.predict(texts), lambda: serving.predict(texts, executor.predict))
        results["predict_16_texts"] = {"unguarded_ms": round(plain * 1000, 2), "guarded_ms": round(guarded * 1000, 2),
                                       "ratio": round(guarded / plain, 3)}
        results["local"] = check_costs(local, "q")

        server = SeaweedFS(os.path.join(tmp, "weed")).start()
        try:
            for k, v in server.env().items():
                os.environ[k] = v
            bucket = f"q-{uuid.uuid4().hex[:8]}"
            server.client().create_bucket(Bucket=bucket)
            server.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            s3 = S3Store(bucket, "runs")
            SisaRun.train(s3, "q", records[:40], SisaConfig(**{**config.to_json(), "shards": 2}))
            results["seaweedfs_s3"] = check_costs(s3, "q")
        finally:
            server.stop()

    out_dir = os.path.join(ROOT, "bench", "results")
    with open(os.path.join(out_dir, "quarantine.json"), "w") as f:
        json.dump(results, f, indent=2)
    p = results["predict_16_texts"]
    lines = ["# Cost of the durable quarantine check", "",
             "`python bench/quarantine_bench.py`; medians of 30 (`first`: a fresh reader, 3 repeats).", "",
             f"Guarded prediction of 16 texts, in-process, tiny model, S = 4: {p['guarded_ms']} ms against "
             f"{p['unguarded_ms']} ms unguarded (ratio {p['ratio']}).", "",
             "| store | queued requests | one check, ms | first check (reads every entry), ms |", "|---|---|---|---|"]
    for name in ("local", "seaweedfs_s3"):
        for row in results[name]:
            lines.append(f"| {name} | {row['queued']} | {row['check_ms']} | {row['first_check_ms']} |")
    with open(os.path.join(out_dir, "quarantine.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
