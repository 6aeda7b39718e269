"""What a CLI `unlearn delete` costs on top of its work: cold (a Ray started by the command
itself, as without `unlearn up`) against warm (against the cluster of `unlearn up`).

Each deletion removes one owner's records through the CLI, as a user would type it, and
this times the whole process (wall) next to the seconds its receipt reports (the
coordinator's work: retraining the affected shard from its earliest affected slice,
committing, purging). The run is trained in-process first (not measured). After the first
deletion against `up` the bench pauses 20 s, as a user would between commands: meanwhile
the coordinator loads every other shard's model (it does so after each CLI delete).

    python bench/up_bench.py        # results in bench/results/up.{json,md}
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
UNLEARN = os.path.join(os.path.dirname(sys.executable), "unlearn")

RECORDS, SHARDS, SLICES = 2000, 4, 2
PAUSE_S = 20
COLD, WARM = 3, 6  # deletions timed without and with `unlearn up` (the first of WARM starts the coordinator)


def cli(env: dict, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([UNLEARN, *args], env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"unlearn {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return wall, proc


def delete(env: dict, store: str, owner: str, kind: str) -> dict:
    wall, proc = cli(env, "delete", "--run", "b", "--store", store, "--owners", owner, "--json", "--quiet")
    receipt = json.loads(proc.stdout)
    row = {"kind": kind, "owner": owner, "wall_s": round(wall, 2), "receipt_s": receipt["seconds"],
           "overhead_s": round(wall - receipt["seconds"], 2), "shards": receipt["shards"],
           "records_deleted": receipt["records_deleted"]}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> int:
    from conftest import synthetic_records, write_jsonl

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="upbench-") as tmp:
        env = {**os.environ, "UNLEARN_HOME": os.path.join(tmp, "home"), "UNLEARN_RUNTIME": "ray",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        env.pop("RAY_ADDRESS", None)
        store = os.path.join(tmp, "store")
        data = write_jsonl(os.path.join(tmp, "d.jsonl"), synthetic_records(RECORDS, owners_every=4))
        train_s, _ = cli(env, "train", "--data", data, "--run", "b", "--store", store, "--model", "tiny",
                         "--shards", str(SHARDS), "--slices", str(SLICES), "--runtime", "local", "--quiet")
        owners = iter(f"owner{i:03d}" for i in range(0, 500, 7))
        rows = [delete(env, store, next(owners), "cold (no up: a Ray per command)") for _ in range(COLD)]
        up_s, _ = cli(env, "up")
        try:
            rows.append(delete(env, store, next(owners), "first after up (starts the coordinator)"))
            time.sleep(PAUSE_S)  # a user's pause: the coordinator loads the other shards' models meanwhile
            rows += [delete(env, store, next(owners), "warm (against up)") for _ in range(WARM - 1)]
            status_s, _ = cli(env, "status", "--run", "b", "--store", store, "--quiet")
        finally:
            down_s, _ = cli(env, "down")
    results = {"records": RECORDS, "shards": SHARDS, "slices": SLICES, "model": "tiny", "cpus": os.cpu_count(),
               "train_in_process_s": round(train_s, 1), "up_s": round(up_s, 1), "down_s": round(down_s, 1),
               "status_on_up_s": round(status_s, 2), "deletions": rows,
               "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    out = os.path.join(ROOT, "bench", "results")
    with open(os.path.join(out, "up.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(out, "up.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    lines = [f"`unlearn delete --owners ONE` through the CLI: {r['records']} synthetic records, model tiny, "
             f"S={r['shards']}, R={r['slices']}, {r['cpus']} CPUs, load average {r['load_average'][0]} before and "
             f"{r['load_average'][1]} after (other work on the machine) (`python bench/up_bench.py`)", "",
             "| deletion | CLI wall (s) | receipt seconds | wall - receipt (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {d['kind']} | {d['wall_s']:.1f} | {d['receipt_s']:.1f} | {d['overhead_s']:.1f} |"
              for d in r["deletions"]]
    lines += ["", "Median wall - receipt: " + ", ".join(
        f"{kind.split(' (')[0]} {statistics.median(d['overhead_s'] for d in r['deletions'] if d['kind'] == kind):.1f} s"
        for kind in dict.fromkeys(d["kind"] for d in r["deletions"])) + "."]
    lines += ["", f"`unlearn up` took {r['up_s']} s, `unlearn down` {r['down_s']} s, `unlearn status` against "
                  f"the cluster {r['status_on_up_s']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
