"""The front door of a deletion pipeline: many POST /delete against `unlearn serve`.

    python bench/pipeline_bench.py                         # 10,000 requests, 16 at a time, then with a kill
    python bench/pipeline_bench.py --requests 2000 --no-kill --label before

Each pass trains a small run (`tiny`, one record per owner, a record per request and some
to spare), starts `unlearn serve` on loopback (Ray runtime: the coordinator is a Ray
actor) and sends every request as a POST /delete of one record id (or bulks of them,
`--per-post`) from `--concurrency` client threads over keep-alive connections, to one of
two front doors (`--front`): Ray Serve's proxy, or the intake port of the same server
(`serve --intake-port`, without Serve). It measures:

- acknowledgement latency (request sent -> 202 received) p50/p99, and requests
  acknowledged per second over the whole intake;
- group commits formed: request ids of one group are consecutive nanosecond stamps
  (`coordinator.py`), so runs of consecutive stamps are the groups;
- deletion batches applied (distinct `batch_id` in the receipts) and the time until
  every acknowledged request is done, read from the store;
- none lost: every acknowledged id has a receipt with its record deleted, and no
  acknowledged record is left in the committed manifest;
- the server's peak memory (RSS of its whole process session, sampled);
- the request log's size in the store once everything is done.

With a kill (`--kill`; by default Serve with bulks of 100 and the intake with one request
per POST), a pass does the same while the coordinator actor's
process is killed (`kill -9`) when half the requests are acknowledged: Ray restarts
it, it replays the log; clients retry a request that failed (a 5xx or a dropped
connection) up to five times, as a pipeline's client would. Bounded by `--requests`
and `--time-limit`. Results: bench/results/pipeline.{json,md} (or `--out`).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.requestlog import RequestLog  # noqa: E402
from core.records import Record  # noqa: E402
from core.store import open_store  # noqa: E402

BIN = os.path.dirname(sys.executable)
WORDS = "good bad fine dull great awful plot cast scene music pace story ending light dark".split()


def records(n: int, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    return [Record(f"r{i:06d}", " ".join(rng.choices(WORDS, k=8)) + f" #{i}", rng.choice(["neg", "pos"]),
                   f"o{i:06d}") for i in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_rss(pid: int) -> int:
    """Bytes resident in every process of the server's session (its Ray workers too)."""
    import psutil

    total = 0
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid:
                total += p.memory_info().rss
        except (OSError, psutil.Error):
            continue
    return total


def kill_session(pid: int) -> None:
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == pid:
                procs.append(p)
        except OSError:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def coordinator_pid(session: int) -> int | None:
    """The coordinator actor's worker process (Ray names it in its process title)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == session and "CoordinatorActor" in " ".join(p.info["cmdline"] or []):
                return p.pid
        except OSError:
            continue
    return None


class Server:
    def __init__(self, store: str, run: str, log_dir: str, window_s: float = 0.0, front: str = "serve"):
        """`front`: "serve" (Ray Serve's proxy) or "intake" (`--intake-port`: the same
        routes from the serve process, without Serve); `port` is the one the clients use."""
        serve_port = free_port()
        self.port = serve_port
        while front == "intake" and self.port == serve_port:  # nothing holds the first one yet
            self.port = free_port()
        extra = ["--intake-port", str(self.port)] if front == "intake" else []
        env = {**os.environ, "UNLEARN_RUNTIME": "ray"}
        self.proc = subprocess.Popen([os.path.join(BIN, "unlearn"), "serve", "--run", run, "--store", store,
                                      "--port", str(serve_port), *extra, "--window", str(window_s), "--quiet"], env=env,
                                     start_new_session=True,
                                     stdout=open(os.path.join(log_dir, "serve.out"), "w"),
                                     stderr=open(os.path.join(log_dir, "serve.err"), "w"))
        self.err = os.path.join(log_dir, "serve.err")
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # a server that never became ready must not outlive the bench
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while True:  # ready once it answers a lookup (404 for an id that names nothing)
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/requests/00000000000000000000-00000000")
                resp = c.getresponse()
                if resp.status == 404 and b"no request" in resp.read():  # ours, not Serve's "no route" 404
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{open(self.err).read()[-2000:]}")
            time.sleep(0.5)
        # and warm: every shard model loaded (the first minute after a start would measure that)
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        c.request("POST", "/predict", json.dumps({"texts": ["warm"], "wait": True}))
        resp = c.getresponse()
        if resp.status != 200:
            raise SystemExit(f"serve does not answer /predict ({resp.status} {resp.read()[:300]!r}):\n"
                             f"{open(self.err).read()[-2000:]}")

    def stop(self) -> None:
        kill_session(self.proc.pid)
        self.proc.wait(timeout=30)


def intake(port: int, ids: list[str], concurrency: int, deadline: float, on_ack=None, bulk: int = 1) -> dict:
    """POST /delete for every id from `concurrency` threads: one request per POST
    ({"ids": [id]}), or `bulk` of them per POST ({"requests": [...]}, one request id each).
    Per id: its request id, latency to the 202 of its POST, attempts."""
    work: queue.Queue = queue.Queue()
    for i in range(0, len(ids), bulk):
        work.put(ids[i:i + bulk])
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            try:
                chunk = work.get_nowait()
            except queue.Empty:
                return
            body = json.dumps({"ids": chunk} if bulk == 1 else {"requests": [{"ids": [i]} for i in chunk]})
            for attempt in range(1, 6):
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/delete", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    time.sleep(0.2 * attempt)
                    continue
                if resp.status == 202:
                    answer = json.loads(data)
                    rids = answer["request_ids"] if bulk > 1 else [answer["request_id"]]
                    seconds, now = time.perf_counter() - t0, time.time()
                    with lock:
                        for rid, request_id in zip(chunk, rids):
                            results[rid] = {"request_id": request_id, "seconds": seconds, "attempts": attempt,
                                            "at": now}
                        n = len(results)
                    if on_ack is not None:
                        on_ack(n)
                    break
                time.sleep(0.2 * attempt)  # a 5xx while the coordinator restarts; a 4xx is a bug here
            else:
                with lock:
                    for rid in chunk:
                        results[rid] = {"request_id": None, "attempts": 5}

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "started": t0, "ended": time.time()}


def groups_of(request_ids: list[str]) -> list[int]:
    """Sizes of the group commits, from runs of consecutive nanosecond stamps."""
    stamps = sorted(int(r[:20]) for r in request_ids)
    sizes, run = [], 1
    for a, b in zip(stamps, stamps[1:]):
        if b == a + 1:
            run += 1
        else:
            sizes.append(run)
            run = 1
    return sizes + [run] if stamps else []


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def log_bytes(store_root: str, run: str) -> int:
    total = 0
    for sub in ("queue", "requests"):
        for dirpath, _dirs, files in os.walk(os.path.join(store_root, run, sub)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def one_pass(store_root: str, run: str, victims: list[str], concurrency: int, kill: bool, time_limit: float,
             log_dir: str, window_s: float = 0.0, bulk: int = 1, front: str = "serve") -> dict:
    store = open_store(store_root)
    server = Server(store_root, run, log_dir, window_s, front)
    peak = [session_rss(server.proc.pid)]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(1.0):
            peak[0] = max(peak[0], session_rss(server.proc.pid))

    threading.Thread(target=sample, daemon=True).start()
    killed = {}

    def on_ack(n: int) -> None:
        if kill and not killed and n >= len(victims) // 2:
            killed["pid"] = coordinator_pid(server.proc.pid) or -1
            if killed["pid"] > 0:
                os.kill(killed["pid"], signal.SIGKILL)
                killed["at"] = time.time()

    try:
        t0 = time.time()
        out = intake(server.port, victims, concurrency, time.monotonic() + time_limit, on_ack, bulk)
        acked = {rid: r for rid, r in out["results"].items() if r.get("request_id")}
        request_ids = [r["request_id"] for r in acked.values()]
        log = RequestLog(store, run)
        deadline = time.monotonic() + time_limit
        while log.queued_keys() and time.monotonic() < deadline:
            time.sleep(1.0)
        all_done_at = time.time()
        settle = time.monotonic() + 120  # the server folds old receipts into the day index after its last batch
        while len(log.receipt_keys()) > 1100 and time.monotonic() < settle:
            time.sleep(1.0)
        entries = {r.request_id: r for r in log.entries()[0]}
    finally:
        stop_sampling.set()
        server.stop()
    from sisa.run import SisaRun

    held = SisaRun.open(store, run).manifest.owners()
    lost = [rid for rid, r in acked.items() if entries.get(r["request_id"]) is None
            or entries[r["request_id"]].status != "done" or rid in held]
    latencies = [r["seconds"] for r in acked.values()]
    intake_s = max(r["at"] for r in acked.values()) - out["started"] if acked else float("nan")
    groups = groups_of(request_ids)
    mine = set(request_ids)
    batches = {getattr(e, "batch_id", None) or tuple(e.batch) for e in entries.values() if e.request_id in mine}
    return {
        "front": front, "per_post": bulk, "requests": len(victims), "acknowledged": len(acked), "not_acknowledged": len(victims) - len(acked),
        "retried": sum(1 for r in acked.values() if r["attempts"] > 1),
        "ack_p50_s": round(pct(latencies, 50), 4), "ack_p99_s": round(pct(latencies, 99), 4),
        "ack_max_s": round(max(latencies), 3) if latencies else None,
        "accepted_per_s": round(len(acked) / intake_s, 1) if acked else 0.0, "intake_s": round(intake_s, 2),
        "group_commits": len(groups), "mean_group": round(sum(groups) / len(groups), 2) if groups else 0,
        "largest_group": max(groups) if groups else 0, "deletion_batches": len(batches),
        "all_done_s": round(all_done_at - t0, 1), "lost": len(lost), "lost_examples": lost[:5],
        "server_peak_rss_mb": round(peak[0] / 2**20, 1), "log_bytes_after": log_bytes(store_root, run),
        "log_bytes_per_request": round(log_bytes(store_root, run) / max(1, len(acked)), 1),
        "coordinator_killed": bool(killed.get("at")),
        "killed_after_s": round(killed["at"] - t0, 2) if killed.get("at") else None,
    }


def train(store_root: str, run: str, n: int, shards: int, log_dir: str) -> float:
    data = os.path.join(log_dir, f"{run}.jsonl")
    with open(data, "w") as f:
        for r in records(n):
            f.write(json.dumps(r.to_json()) + "\n")
    t0 = time.perf_counter()
    subprocess.run([os.path.join(BIN, "unlearn"), "train", "--data", data, "--run", run, "--store", store_root,
                    "--model", "tiny", "--shards", str(shards), "--slices", "2", "--max-length", "16",
                    "--labels", "neg,pos", "--runtime", "local", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def serve_ceiling(requests: int, concurrency: int) -> dict:
    """The same clients against a Ray Serve app that answers 202 at once (no store, no
    coordinator): what Ray Serve's HTTP path itself costs per POST on this machine."""
    import cluster  # noqa: F401  (Ray environment defaults)
    from cluster.runtime import init_ray

    init_ray()
    import ray
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    class Empty:
        async def __call__(self, request):
            await request.body()
            return JSONResponse({"request_id": "x"}, status_code=202)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Empty.bind(), name="empty", route_prefix="/")
    try:
        out = intake(port, [f"x{i}" for i in range(requests)], concurrency, time.monotonic() + 300)
    finally:
        serve.shutdown()
        ray.shutdown()
    lat = [r["seconds"] for r in out["results"].values() if r.get("request_id")]
    return {"requests": requests, "answered": len(lat), "per_s": round(len(lat) / (out["ended"] - out["started"]), 1),
            "p50_s": round(pct(lat, 50), 4), "p99_s": round(pct(lat, 99), 4)}


def markdown(result: dict) -> str:
    cols = [("front", "front door"), ("per_post", "requests / POST"), ("acknowledged", "acknowledged"), ("accepted_per_s", "accepted / s"),
            ("ack_p50_s", "ack p50 s"), ("ack_p99_s", "ack p99 s"), ("group_commits", "group commits"),
            ("mean_group", "mean group"), ("deletion_batches", "deletion batches"), ("all_done_s", "all done s"),
            ("lost", "lost"), ("server_peak_rss_mb", "server peak MB"), ("log_bytes_per_request", "log B / request"),
            ("retried", "retried")]
    lines = [f"# Deletion pipeline bench ({result['label']})", "",
             f"POST /delete of one record id per deletion request, {result['concurrency']} concurrent clients, "
             f"run of {result['records']} records (`tiny`, S={result['shards']}, R=2), store {result['store']}; "
             f"{result['machine']}. Command: `{result['command']}`", "",
             "| pass | " + " | ".join(c[1] for c in cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for name, p in result["passes"].items():
        lines.append(f"| {name} | " + " | ".join(str(p.get(c[0], "serve")) for c in cols) + " |")
    if result.get("serve_ceiling"):
        c = result["serve_ceiling"]
        lines += ["", f"Ray Serve alone (an app that answers 202 at once, same clients, {c['requests']} POSTs): "
                      f"{c['per_s']} POSTs/s, p50 {c['p50_s']} s, p99 {c['p99_s']} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="deletion requests per pass (default 10000)")
    ap.add_argument("--per-post", default="1,100",
                    help="requests per POST, one pass each, comma-separated (default 1,100: one request per POST, "
                         "then bulks of 100)")
    ap.add_argument("--front", default="serve,intake",
                    help="front doors, one pass each per --per-post: serve (Ray Serve's proxy) and/or intake "
                         "(`serve --intake-port`, without Serve); default serve,intake")
    ap.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    ap.add_argument("--shards", type=int, default=8, help="shards of the run (default 8)")
    ap.add_argument("--window", type=float, default=0.0,
                    help="the server's batching window in seconds (default 0: apply at once)")
    ap.add_argument("--kill", default="serve:100,intake:1",
                    help="passes with the coordinator killed midway, FRONT:REQUESTS_PER_POST, comma-separated "
                         "(default %(default)s)")
    ap.add_argument("--no-kill", action="store_true", help="no pass with the coordinator killed")
    ap.add_argument("--no-ceiling", action="store_true", help="skip measuring Ray Serve alone")
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per phase of a pass (default 900)")
    ap.add_argument("--label", default="group commit", help="what this run measures (a heading)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pipeline"),
                    help="results path without extension (default bench/results/pipeline)")
    args = ap.parse_args(argv)
    try:
        per_post = [int(x) for x in args.per_post.split(",")]
    except ValueError:
        ap.error(f"--per-post {args.per_post!r}: whole numbers separated by commas")
    if args.requests < 1 or args.concurrency < 1 or not per_post or not all(1 <= b <= 1000 for b in per_post):
        ap.error("--requests and --concurrency must be at least 1, --per-post in 1..1000")
    work = tempfile.mkdtemp(prefix="pipeline-")
    n = args.requests + max(200, args.requests // 10)
    result = {"label": args.label, "requests": args.requests, "concurrency": args.concurrency, "records": n,
              "shards": args.shards, "window_s": args.window, "store": "local directory",
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
              "command": "python bench/pipeline_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "passes": {}}
    fronts = [f for f in args.front.split(",") if f]
    if not fronts or not set(fronts) <= {"serve", "intake"}:
        ap.error(f"--front {args.front!r}: serve and/or intake, separated by commas")
    passes = [(f"{f}, {b} per POST", b, False, f) for f in fronts for b in per_post]
    if not args.no_kill:
        for spec in (k for k in args.kill.split(",") if k):
            front, _, n_ = spec.partition(":")
            if front not in ("serve", "intake") or not n_.isdigit() or not 1 <= int(n_) <= 1000:
                ap.error(f"--kill {spec!r}: FRONT:N with FRONT serve or intake and N in 1..1000")
            passes.append((f"{front}, {int(n_)} per POST, coordinator killed midway", int(n_), True, front))
    for i, (name, bulk, kill, front) in enumerate(passes):
        run = f"p{i}"
        root = os.path.join(work, "store")
        result[f"train_s_{run}"] = round(train(root, run, n, args.shards, work), 1)
        victims = [r.id for r in records(n)]
        random.Random(1).shuffle(victims)
        print(f"{name}: {args.requests} requests ...", file=sys.stderr, flush=True)
        result["passes"][name] = one_pass(root, run, victims[:args.requests], args.concurrency, kill,
                                          args.time_limit, work, args.window, bulk, front)
        print(json.dumps(result["passes"][name]), file=sys.stderr, flush=True)
    if not args.no_ceiling:
        result["serve_ceiling"] = serve_ceiling(min(args.requests, 2000), args.concurrency)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0 if all(p["lost"] == 0 for p in result["passes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
