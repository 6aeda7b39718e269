"""Scale benchmark: what one deletion costs as the run grows, at fixed records per shard.

For each N (default 10k, 100k, 1M synthetic records), a SISA run with the `tiny` model,
R slices and S = round(N / per-shard) shards (at least 1, at most --max-shards), so each
shard holds about the same number of records whatever N is (default 15,625 = 1M / 64:
10k is then 1 shard of 10k, 100k 6 shards of ~16.7k, 1M 64 shards of ~15.6k). A SISA
deletion retrains one shard, so its training cost is flat in N by construction; what
this bench measures is everything else a deletion does (resolve, plan, manifest,
commit, garbage collection), which must be flat in N too.

Measured per N: training time; the first deletion of a fresh process (no unit indexed in
memory: what a one-shot CLI command pays), then one single-record deletion in each slice
position 0..R-1 (a record's slice decides how many stages are redone, so random victims
would make two N differ by the draw) and one owner deletion in slice 0 (each: wall time,
the executor's retraining time, the rest = "overhead", retrained fraction, objects and
bytes written, bytes read); `status` in this process and in a
fresh process (a cold read of the store); the committed manifest's size (top object,
plus its unit objects where the format has them) and the whole store's size. Then the
same data as an ERASE run (in-process LocalPool) with the `tiny` embedder (a fixed random
2-layer BERT: its embeddings are meaningless, but its cost per text is what a real
encoder's is divided by a constant, and storage and clustering work do not depend on
what the vectors mean): certificate rate, deletion p50/p99, the same storage figures.

Everything runs in this process (LocalExecutor, no Ray) on a LocalStore in a temporary
folder (removed at the end), so it measures the algorithm and the storage, not a cluster.

    python bench/scale_bench.py                          # 10k, 100k, 1M (SISA 1M: ~30 min of training;
                                                         # ERASE 1M: ~80 min, mostly embedding)
    python bench/scale_bench.py --no-erase & python bench/scale_bench.py --no-sisa --name scale-erase
    python bench/scale_bench.py --merge OUT/scale.json,OUT/scale-erase.json   # one core each, then one table
    python bench/scale_bench.py --records 10000,100000   # what fits a shared machine
    python bench/scale_bench.py --records 2000 --per-shard 500 --no-erase --out /tmp/x   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.keys import keyed_hash  # noqa: E402
from core.records import Record  # noqa: E402
from core.store import LocalStore  # noqa: E402
from core.units import clear_cache  # noqa: E402
from sisa.config import SisaConfig  # noqa: E402
from sisa.shard import LocalExecutor  # noqa: E402

WORDS = ("good great fine superb lovely moving bright warm bad dull awful weak flat cold boring grim "
         "the a film plot actor scene story music ending cast script pace tone light dark long short").split()


def synthetic(n: int, per_owner: int, seed: int = 0) -> list[Record]:
    """n labelled records `r0000000`...; every `per_owner` consecutive records share an owner."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if rng.random() < 0.5 else "neg"
        text = " ".join(rng.choice(WORDS) for _ in range(8)) + f" #{i}"
        out.append(Record(f"r{i:07d}", text, label, f"o{i // per_owner:07d}"))
    return out


class CountingStore(LocalStore):
    """A LocalStore that counts what is written and read (objects and bytes)."""

    def reset(self) -> None:
        self.puts, self.put_bytes, self.get_bytes = 0, 0, 0
        self.written: dict[str, int] = {}  # bytes written per folder of the run (data, ckpt, units, ...)

    def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        self.put_bytes += len(data)
        folder = key.split("/")[1]
        self.written[folder] = self.written.get(folder, 0) + len(data)
        super().put(key, data)

    def get(self, key: str) -> bytes:
        data = super().get(key)
        self.get_bytes += len(data)
        return data


class TimedExecutor(LocalExecutor):
    """The in-process executor, timing its retraining (the rest of a deletion is overhead)."""

    retrain_s = 0.0

    def retrain(self, jobs):
        t0 = time.perf_counter()
        try:
            return super().retrain(jobs)
        finally:
            self.retrain_s += time.perf_counter() - t0


def store_bytes(root: str, prefix: str = "") -> tuple[int, int]:
    """(objects, bytes) under `prefix` of a local store."""
    n = size = 0
    base = os.path.join(root, prefix)
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            n += 1
            size += os.path.getsize(os.path.join(dirpath, name))
    return n, size


def manifest_bytes(store: LocalStore, run: str) -> dict:
    """The committed manifest: its top object, and every object it names under a
    manifest-like prefix (the unit objects of a split manifest; none in format 1)."""
    head = json.loads(store.get(f"{run}/HEAD"))["manifest"]
    top = len(store.get(head))
    units = 0
    for sub in ("units",):
        units += store_bytes(store.root, f"{run}/{sub}")[1]
    return {"top": top, "units": units, "total": top + units}


def cold_status_s(root: str, run: str, method: str) -> float:
    """`status` in a fresh process: open the run from the store and summarise it (the
    import time of the process is not counted)."""
    code = (f"import sys, time; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
            "from core.store import LocalStore\n"
            f"from {'erase.run import EraseRun as R' if method == 'erase' else 'sisa.run import SisaRun as R'}\n"
            f"t0 = time.perf_counter(); R.open(LocalStore({root!r}), {run!r}).status()\n"
            "print(time.perf_counter() - t0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.array(xs), q)) if xs else 0.0


def victims(records: list[Record], k: int, seed: int) -> tuple[list[str], str]:
    """k record ids and one owner (not theirs), keyed-random."""
    order = sorted(records, key=lambda r: keyed_hash(seed, "scale-victim", r.id))
    ids = [r.id for r in order[:k]]
    taken = {r.owner for r in order[:k]}
    owner = next(r.owner for r in order[k:] if r.owner not in taken)
    return ids, owner


def sisa_victims(run, records: list[Record], seed: int) -> tuple[str, list[str], str]:
    """At fixed slice positions, so that N is the only thing that changes between runs:
    (a record in the last slice for the cold first deletion, one record in each slice
    0..R-1, an owner whose records sit in slice 0), keyed-random otherwise. A record's
    slice decides how many stages its deletion retrains, so random victims would make
    the per-deletion time of two runs differ by the draw."""
    R = run.config.slices
    by_slice: dict[int, list[str]] = {}
    owner_at_0 = None
    taken: set[str] = set()
    for r in sorted(records, key=lambda r: keyed_hash(seed, "scale-victim", r.id)):
        if r.owner in taken:
            continue
        j = run._plan([r.id])[0].first_stage
        if j == 0 and owner_at_0 is None:
            owner_at_0 = r.owner
            taken.add(r.owner)
        elif len(by_slice.setdefault(j, [])) < (2 if j == R - 1 else 1):
            by_slice[j].append(r.id)
            taken.add(r.owner)
        if owner_at_0 is not None and all(len(by_slice.get(j, [])) == (2 if j == R - 1 else 1) for j in range(R)):
            break
    cold = by_slice[R - 1].pop()
    return cold, [by_slice[j][0] for j in range(R)], owner_at_0


def deletions(run, store: CountingStore, ids: list[str], owner: str | None, timed: TimedExecutor | None,
              log, kind: str = "id") -> list[dict]:
    rows = []
    for what, kwargs in [(kind, {"ids": [i]}) for i in ids] + ([("owner", {"owners": [owner]})] if owner else []):
        store.reset()
        before = timed.retrain_s if timed else 0.0
        t0 = time.perf_counter()
        receipt = run.delete(**kwargs)
        seconds = time.perf_counter() - t0
        retrain = (timed.retrain_s - before) if timed else 0.0
        row = {"kind": what, "records": len(receipt.ids), "s": round(seconds, 4), "retrain_s": round(retrain, 4),
               "overhead_s": round(seconds - retrain, 4), "retrain_fraction": receipt.retrain_fraction,
               "objects_written": store.puts, "bytes_written": store.put_bytes, "bytes_read": store.get_bytes,
               "written": dict(sorted(store.written.items()))}
        stages = getattr(receipt, "stages_redone", None)  # after the deletion: nothing of it runs untimed
        if stages:
            row["from_slice"] = min(v[0] for v in stages.values())
        if getattr(receipt, "details", None):
            row["certified"] = receipt.details.get("certified") == len(receipt.ids)  # every record certified
        rows.append(row)
        log(f"  delete {what}: {json.dumps({k: v for k, v in row.items() if k != 'written'})}")
    return rows


def summarise(rows: list[dict]) -> dict:
    s = [r["s"] for r in rows]
    return {
        "delete_mean_s": round(sum(s) / len(s), 4), "delete_p50_s": round(percentile(s, 50), 4),
        "delete_p99_s": round(percentile(s, 99), 4),
        "overhead_mean_s": round(sum(r["overhead_s"] for r in rows) / len(rows), 4),
        "retrain_fraction_mean": round(sum(r["retrain_fraction"] for r in rows) / len(rows), 6),
        "objects_written_mean": round(sum(r["objects_written"] for r in rows) / len(rows), 2),
        "bytes_written_mean": round(sum(r["bytes_written"] for r in rows) / len(rows)),
        "bytes_read_mean": round(sum(r["bytes_read"] for r in rows) / len(rows)),
    }


def storage(store: CountingStore, run: str, method: str) -> dict:
    from erase.run import EraseRun
    from sisa.run import SisaRun

    cls = EraseRun if method == "erase" else SisaRun
    t0 = time.perf_counter()
    cls.open(store, run).status()
    warm = time.perf_counter() - t0
    objects, size = store_bytes(store.root, run)
    return {"status_s": round(warm, 4), "status_cold_s": round(cold_status_s(store.root, run, method), 4),
            "manifest_bytes": manifest_bytes(store, run), "store_objects": objects, "store_bytes": size}


def sisa_case(store: CountingStore, records: list[Record], args, log) -> dict:
    from sisa.run import SisaRun

    n = len(records)
    S = max(1, min(args.max_shards, round(n / args.per_shard)))
    config = SisaConfig(model=args.model, shards=S, slices=args.slices, epochs=args.epochs, seed=args.seed,
                        labels=("neg", "pos"))
    name = f"sisa-{n}"
    timed = TimedExecutor(store, name, config, progress=args.progress)
    log(f"SISA N={n:,}: S={S}, R={args.slices}, ~{n // S:,} records per shard; training ...")
    store.reset()
    t0 = time.perf_counter()
    run = SisaRun.train(store, name, records, config, progress=args.progress, executor=timed)
    train_s = time.perf_counter() - t0
    log(f"  trained in {train_s:.1f} s ({store.puts} objects, {store.put_bytes:,} bytes)")
    cold, ids, owner = sisa_victims(run, records, args.seed)
    clear_cache()  # the first deletion of a fresh process: no unit index in memory
    run = SisaRun.open(store, name, executor=timed)
    cold_rows = deletions(run, store, [cold], None, timed, log, kind="cold")
    rows = deletions(run, store, ids, owner, timed, log)
    singles = [r for r in rows if r["kind"] == "id"]
    out = {"method": "sisa", "model": args.model, "N": n, "S": S, "R": args.slices, "records_per_shard": round(n / S),
           "train_s": round(train_s, 2), "shard_train_s": round(train_s / S, 2), **summarise(singles),
           "by_slice": [{k: r[k] for k in ("from_slice", "s", "retrain_s", "overhead_s", "retrain_fraction", "objects_written",
                                          "bytes_written")} for r in singles],
           "owner": {k: rows[-1][k] for k in ("records", "from_slice", "s", "overhead_s", "objects_written",
                                             "bytes_written")},
           "cold_overhead_s": cold_rows[0]["overhead_s"],
           **storage(store, name, "sisa"), "deletions": cold_rows + rows}
    SisaRun.drop(store, name)
    return out


def erase_case(store: CountingStore, records: list[Record], args, log) -> dict:
    from erase.config import EraseConfig
    from erase.run import EraseRun

    n = len(records)
    config = EraseConfig(embedder="tiny", partitions=args.partitions, seed=args.seed)
    name = f"erase-{n}"
    log(f"ERASE N={n:,}: P={args.partitions}, embedder tiny; embedding and clustering ...")
    store.reset()
    t0 = time.perf_counter()
    run = EraseRun.train(store, name, records, config, progress=args.progress, embed_workers=args.embed_workers)
    train_s = time.perf_counter() - t0
    log(f"  trained in {train_s:.1f} s ({store.puts} objects, {store.put_bytes:,} bytes)")
    ids, owner = victims(records, args.erase_deletions, args.seed + 1)
    rows = deletions(run, store, ids, owner, None, log)
    out = {"method": "erase", "N": n, "P": args.partitions, "train_s": round(train_s, 2), **summarise(rows),
           "certificate_rate": round(sum(r.get("certified", False) for r in rows) / len(rows), 4),
           **storage(store, name, "erase"), "deletions": rows}
    EraseRun.drop(store, name)
    return out


def kb(b: float) -> str:
    return f"{b / 1024:,.1f} KiB" if b < 1024 ** 2 else f"{b / 1024 ** 2:,.2f} MiB"


def table(rows: list[dict]) -> list[str]:
    lines = []
    sisa = [r for r in rows if r["method"] == "sisa"]
    if sisa:
        R = sisa[0]["R"]
        at = " / ".join(str(j) for j in range(R))
        lines += ["| N | S | records / shard | train s (one shard) | deletion s, record in slice " + at
                  + " | retrained fraction, slice " + at + " | overhead s (warm mean / first of a process) "
                  "| objects written, slice " + at + " | bytes written / deletion | owner deletion s (records, slice) "
                  "| status s (warm / cold) | manifest (top + units) | store |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sisa:
            by = sorted(r["by_slice"], key=lambda x: x["from_slice"])
            o, m = r["owner"], r["manifest_bytes"]
            lines.append(
                f"| {r['N']:,} | {r['S']} | {r['records_per_shard']:,} | {r['train_s']:,} ({r['shard_train_s']}) "
                f"| {' / '.join('%.1f' % x['s'] for x in by)} "
                f"| {' / '.join('%.4f' % x['retrain_fraction'] for x in by)} "
                f"| {r['overhead_mean_s']:.2f} / {r['cold_overhead_s']:.2f} "
                f"| {' / '.join(str(x['objects_written']) for x in by)} | {kb(r['bytes_written_mean'])} "
                f"| {o['s']:.1f} ({o['records']}, {o['from_slice']}) | {r['status_s']} / {r['status_cold_s']} "
                f"| {kb(m['top'])} + {kb(m['units'])} | {kb(r['store_bytes'])} ({r['store_objects']} objects) |")
    erase = [r for r in rows if r["method"] == "erase"]
    if erase:
        lines += ["", "| N | P | train s | deletion s p50 / p99 | certificate rate | objects written / deletion "
                  "| bytes written / deletion | status s (warm / cold) | manifest (top + units) | store |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in erase:
            m = r["manifest_bytes"]
            lines.append(
                f"| {r['N']:,} | {r['P']} | {r['train_s']:,} | {r['delete_p50_s']} / {r['delete_p99_s']} "
                f"| {r['certificate_rate']} | {r['objects_written_mean']} | {kb(r['bytes_written_mean'])} "
                f"| {r['status_s']} / {r['status_cold_s']} | {kb(m['top'])} + {kb(m['units'])} "
                f"| {kb(r['store_bytes'])} ({r['store_objects']} objects) |")
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sisa = [r for r in rows if r["method"] == "sisa"]
    erase = [r for r in rows if r["method"] == "erase"]
    if sisa:
        N = [r["N"] for r in sisa]
        for j in range(sisa[0]["R"]):
            ys = [next(x["s"] for x in r["by_slice"] if x["from_slice"] == j) for r in sisa]
            axes[0].plot(N, ys, marker="o", label=f"sisa: a record in slice {j}")
            axes[2].plot(N, [next(x["objects_written"] for x in r["by_slice"] if x["from_slice"] == j) for r in sisa],
                         marker="o", label=f"sisa: slice {j}")
        axes[0].plot(N, [r["overhead_mean_s"] for r in sisa], marker="o", ls="--", label="sisa: overhead")
        axes[1].plot(N, [r["bytes_written_mean"] for r in sisa], marker="o", label="sisa")
        for r in sisa:
            axes[0].annotate(f"S={r['S']}", (r["N"], r["by_slice"][0]["s"]), textcoords="offset points",
                             xytext=(4, 4), fontsize=8)
    if erase:
        N = [r["N"] for r in erase]
        axes[0].plot(N, [r["delete_p50_s"] for r in erase], marker="s", label="erase: p50")
        axes[0].plot(N, [r["delete_p99_s"] for r in erase], marker="s", ls=":", label="erase: p99")
        axes[1].plot(N, [r["bytes_written_mean"] for r in erase], marker="s", label="erase")
        axes[2].plot(N, [r["objects_written_mean"] for r in erase], marker="s", label="erase: mean")
    for ax, title in zip(axes, ("seconds per deletion (overhead = not retraining)", "bytes written per deletion",
                                "objects written per deletion")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("records N (SISA: S = N / records per shard)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="10000,100000,1000000", help="comma-separated N (default %(default)s)")
    ap.add_argument("--per-shard", type=int, default=15625, help="records per SISA shard: S = round(N / this)")
    ap.add_argument("--max-shards", type=int, default=64)
    ap.add_argument("--slices", type=int, default=4, help="R (default %(default)s)")
    ap.add_argument("--model", default="tiny", help="SISA model: tiny (default) or minilm (a real encoder: slower)")
    ap.add_argument("--epochs", default="1", help="SISA epochs over a shard (default %(default)s)")
    ap.add_argument("--per-owner", type=int, default=4, help="records per owner (an owner deletion removes them)")
    ap.add_argument("--partitions", type=int, default=16, help="ERASE partitions P (default %(default)s)")
    ap.add_argument("--erase-deletions", type=int, default=20, help="single-record ERASE deletions (plus one owner)")
    ap.add_argument("--no-erase", action="store_true", help="SISA only")
    ap.add_argument("--no-sisa", action="store_true", help="ERASE only")
    ap.add_argument("--embed-workers", type=int, default=1, help="ERASE: processes that embed (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary store goes")
    ap.add_argument("--progress", action="store_true", help="progress bars of training")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="scale", help="results file name: OUT/NAME.{json,md,png}")
    ap.add_argument("--merge", default=None, help="comma-separated result JSONs of earlier runs (say, SISA and ERASE "
                    "run side by side, one core each): write their rows together as OUT/NAME, run nothing")
    args = ap.parse_args()
    if args.merge:
        rows = [row for path in args.merge.split(",") for row in json.load(open(path))["rows"]]
        rows.sort(key=lambda r: (r["method"] != "sisa", r["N"]))
        write(rows, args)
        print("\n".join(table(rows)))
        return 0

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    import torch

    torch.set_num_threads(1)
    rows = []
    root = tempfile.mkdtemp(prefix="unlearn-scale-", dir=args.tmp)
    try:
        store = CountingStore(root)
        for n in [int(x) for x in args.records.split(",") if x]:
            records = synthetic(n, args.per_owner, args.seed)
            if not args.no_sisa:
                rows.append(sisa_case(store, records, args, log))
            if not args.no_erase:
                rows.append(erase_case(store, records, args, log))
            write(rows, args)  # after every N: a long run keeps what it measured
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(table(rows)))
    return 0


def write(rows: list[dict], args) -> None:
    from sisa.manifest import FORMAT

    result = {"bench": "scale", "model": args.model, "embedder": "tiny", "per_shard": args.per_shard,
              "slices": args.slices, "epochs": args.epochs, "per_owner": args.per_owner, "manifest_format": FORMAT,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads: 1",
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Scale: SISA ({args.model} model, R={args.slices}, {args.epochs} epoch(s), ~{args.per_shard:,} records per "
             f"shard, S = N / that, at most {args.max_shards}) and ERASE (tiny embedder, P={args.partitions}) on "
             f"synthetic records, {args.per_owner} per owner; in-process, LocalStore; manifest format {FORMAT}. "
             f"SISA: after a cold first deletion (a fresh process, no index in memory), one single-record deletion "
             f"in each slice 0..R-1 and one owner deletion in slice 0; ERASE: {args.erase_deletions} single-record "
             f"deletions and one owner. Overhead = deletion time minus retraining time.", ""]
    lines += table(rows)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(args.out, f"{args.name}.png"))


if __name__ == "__main__":
    sys.exit(main())
