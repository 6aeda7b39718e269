"""Helpers for tests that drive `unlearn` as real processes (start, `kill -9`, HTTP), and
the checks every durability test ends with: no request failed or left queued, every
acknowledged id and text gone from every object in the store, digests equal to a fresh
run on what remains."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

UNLEARN = os.path.join(os.path.dirname(sys.executable), "unlearn")


def cli_env(runtime: str = "local", **extra) -> dict:
    env = {**os.environ, "UNLEARN_RUNTIME": runtime, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def cli_in_process(argv, capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of `unlearn ARGV` run in this process, usage
    errors (argparse's SystemExit) included."""
    from cluster.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def run_cli(*args: str, runtime: str = "local", timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([UNLEARN, *args], env=env or cli_env(runtime), capture_output=True, text=True,
                          timeout=timeout)


def spawn(*args: str, runtime: str = "local", log: str, env: dict | None = None) -> subprocess.Popen:
    """A command in a session of its own (so its whole process group can be killed); its
    stdout and stderr go to `log`.out / `log`.err."""
    return subprocess.Popen([UNLEARN, *args], env=env or cli_env(runtime), stdout=open(f"{log}.out", "w"),
                            stderr=open(f"{log}.err", "w"), start_new_session=True)


def kill9(proc: subprocess.Popen, group: bool = False) -> None:
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def queue(store_dir: str, run: str) -> dict[str, dict]:
    """The run's queued requests as stored: request id -> entry (out of their groups)."""
    out = {}
    folder = os.path.join(store_dir, run, "queue")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    group = json.load(f)
            except (OSError, ValueError):
                continue  # finished (or being replaced) while listed
            for entry in group.get("requests", [group]):
                out[entry.get("request_id", name[:-5])] = entry
    return out


def entries(store_dir: str, run: str) -> list:
    from cluster.requestlog import RequestLog
    from core.store import LocalStore

    found, problems = RequestLog(LocalStore(store_dir), run).entries()
    assert not problems, problems
    return found


def http(base: str, path: str, body=None, timeout: float = 120) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _json(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())


def _json(raw: bytes) -> dict:
    """The body as JSON; Ray Serve's proxy answers plain text while the app deploys."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"text": raw.decode(errors="replace")}


def wait_serving(base: str, proc: subprocess.Popen, log: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = http(base, "/predict", {"texts": ["warm up"]}, timeout=60)
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"serve did not answer: {open(log + '.err').read()[-3000:]}")
        time.sleep(0.5)


def assert_no_trace(store_dir: str, records, deleted: set[str]) -> None:
    """No object (any file of the store: data, checkpoints, manifests, log, locks) holds a
    deleted id or its text."""
    texts = {r.id: r.text for r in records}
    for root, _dirs, files in os.walk(store_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            for rid in deleted:
                assert f'"{rid}"'.encode() not in data, (rid, os.path.join(root, name))
                assert json.dumps(texts[rid]).encode() not in data, (rid, os.path.join(root, name))


def assert_all_applied(store_dir: str, run: str, at_least: int) -> None:
    found = entries(store_dir, run)
    assert len(found) >= at_least, found
    assert all(r.status == "done" for r in found), [(r.request_id, r.status, r.reason, r.last_error) for r in found]
    assert queue(store_dir, run) == {}
    assert not os.path.exists(os.path.join(store_dir, run, "LOCK"))


def assert_sisa_exact(store_dir: str, run: str, records, deleted: set[str], config, scratch: str) -> None:
    from sisa.run import SisaRun
    from core.store import LocalStore

    got = SisaRun.open(LocalStore(store_dir), run)
    retained = [r for r in records if r.id not in deleted]
    assert set(got.manifest.owners()) == {r.id for r in retained}
    fresh = SisaRun.train(LocalStore(scratch), "fresh", retained, config)
    assert [s.digest for s in got.manifest.shards] == [s.digest for s in fresh.manifest.shards]


def shard_of(store_dir: str, run: str, rid: str) -> int:
    from sisa.run import SisaRun
    from core.store import LocalStore

    manifest = SisaRun.open(LocalStore(store_dir), run).manifest
    return next(s.shard for s in manifest.shards for sl in s.slices if rid in sl.ids)


def kill_session(proc) -> None:
    """`kill -9` of the server and every process of its session (its Ray workers too)."""
    import psutil

    victims_ = [p for p in psutil.process_iter() if _sid(p) == proc.pid]
    for p in victims_:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims_, timeout=30)
    proc.wait(timeout=30)


def _sid(p) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def ray_processes(marker: str, session: int | None = None) -> list:
    """Processes of a Ray cluster started in a test: those whose command line names its temp
    dir `marker` or that belong to the session `session` (`ray start` in a session of its
    own: its client server names neither), with their descendants."""
    import psutil

    from cluster.up import with_descendants

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) or (session is not None and os.getsid(p.pid) == session):
                roots.append(p)
        except (OSError, psutil.Error):
            continue
    return with_descendants(roots)


def stop_cluster(marker: str, deadline_s: float = 60) -> None:
    """Stop only what our `ray start` started (never `ray stop`, which kills every Ray), in
    rounds (TERM, then KILL, looking again each time) until none of its processes is left."""
    from cluster.up import stop_processes

    stop_processes(lambda: ray_processes(marker), deadline_s, term_wait_s=10)


def sockets_of(procs) -> dict:
    """{(ip, port, kind): process name} of what the processes listen on (TCP) or are bound to (UDP)."""
    import psutil

    pids = {p.pid: p for p in procs}
    found = {}
    for c in psutil.net_connections("inet"):
        if c.pid in pids and c.laddr and (c.status == psutil.CONN_LISTEN or c.type == 2):
            try:
                found[(c.laddr.ip, c.laddr.port, "tcp" if c.type == 1 else "udp")] = pids[c.pid].name()
            except psutil.Error:
                pass
    return found
