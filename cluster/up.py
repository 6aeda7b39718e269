"""`unlearn up` / `unlearn down`: one long-running local Ray for every later command.

Without it each `--runtime ray` command starts a Ray of its own and loads every shard
model again (tens of seconds on a small machine). `up` starts a Ray head on loopback
with `ray start`, in a session and a temp dir of its own, and writes what a command
needs to attach to it into `$UNLEARN_HOME/cluster.json` (default `~/.unlearn`, mode
700; files 600). The token lives only in `$UNLEARN_HOME/ray-token` (mode 600), read by
Ray through RAY_AUTH_TOKEN_PATH: never on a command line, in a log or in the JSON.

`down` stops exactly the processes of that cluster (its session, its temp dir, and
their children), never `ray stop`, which stops every Ray of the machine.

The state file is read strictly (`parse_state`): a state file that does not parse, or
names a cluster that no longer answers with our token, is ignored with a note.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import UnlearnError

STATE = "cluster.json"
TOKEN = "ray-token"
TEMP_PREFIX = "unlearn-ray-"  # a short path under /tmp: Ray's socket paths have a length limit
STATE_VERSION = 1


class StateError(ValueError):
    """The state file is not one `up` wrote (one line: why)."""


@dataclass(frozen=True)
class ClusterState:
    """What `up` records: where the head listens, where its token is, and what to stop."""
    address: str          # 127.0.0.1:PORT of the GCS
    token_file: str       # $UNLEARN_HOME/ray-token
    temp_dir: str         # mode 700, Ray's --temp-dir inside; named in the command line of its daemons
    session: int          # the session id of `ray start` and every daemon it started
    started: float        # epoch seconds: a process of the session started before is not ours
    num_cpus: int
    pids: tuple = ()      # (pid, create time) of the daemons found right after the start

    def to_json(self) -> dict:
        return {"version": STATE_VERSION, **asdict(self), "pids": [list(p) for p in self.pids]}


def home() -> Path:
    """$UNLEARN_HOME, else ~/.unlearn."""
    value = os.environ.get("UNLEARN_HOME")
    return Path(value).expanduser() if value else Path.home() / ".unlearn"


def _number(obj: dict, key: str, kind, low: float) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:
        raise StateError(f"field {key!r} is not a number >= {low:g}")
    return value


def parse_state(text: str, where: Path) -> ClusterState:
    """The state `up` wrote into `where` (its folder), checked field by field: a hand-edited
    or truncated file must not make a command join another address or kill other
    processes. Raises StateError."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise StateError("not JSON") from None
    if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
        raise StateError(f"not a version {STATE_VERSION} state object")
    address = obj.get("address")
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if host != "127.0.0.1" or not port.isdigit() or not 0 < int(port) < 65536:
        raise StateError(f"address {address!r} is not 127.0.0.1:PORT")
    if obj.get("token_file") != str(where / TOKEN):
        raise StateError(f"token_file is not {where / TOKEN}")
    temp = obj.get("temp_dir")
    if not isinstance(temp, str) or not os.path.isabs(temp) or not os.path.basename(temp).startswith(TEMP_PREFIX) \
            or os.path.normpath(temp) != temp:
        raise StateError(f"temp_dir {temp!r} is not a folder {TEMP_PREFIX}* that up makes")
    pids = obj.get("pids")
    if not isinstance(pids, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
            and p[0] > 1 and isinstance(p[1], (int, float)) for p in pids):
        raise StateError("pids is not a list of [pid, start time]")
    return ClusterState(address=address, token_file=obj["token_file"], temp_dir=temp,
                        session=int(_number(obj, "session", int, 2)), started=float(_number(obj, "started", (int, float), 0)),
                        num_cpus=int(_number(obj, "num_cpus", int, 1)), pids=tuple((p[0], float(p[1])) for p in pids))


def read_state(where: Path | None = None) -> tuple[ClusterState | None, str | None]:
    """(state, None); (None, None) if no state file; (None, why) if one is there but unusable."""
    where = where or home()
    path = where / STATE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path} is unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
    try:
        return parse_state(text, where), None
    except StateError as exc:
        return None, f"{path} is not a state file of `unlearn up`: {exc}"


def prepare_home(where: Path) -> None:
    """Create the folder mode 700 (tightened if it is ours and looser); refuse another user's."""
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = where.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnlearnError(f"{where} is not a folder (set UNLEARN_HOME to another)")
    if st.st_uid != os.getuid():
        raise UnlearnError(f"{where} belongs to another user; set UNLEARN_HOME to a folder of your own")
    if st.st_mode & 0o077:
        os.chmod(where, 0o700)


@contextlib.contextmanager
def home_lock(where: Path):
    """One `up` or `down` at a time per $UNLEARN_HOME: two `up` at once would start two
    clusters and record one (the other would run on, unrecorded)."""
    import fcntl

    prepare_home(where)
    fd = os.open(where / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_private(path: Path, data: str) -> None:
    """Write `data` to a new file of mode 600, then rename it into place (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_state(where: Path, state: ClusterState) -> None:
    _write_private(where / STATE, json.dumps(state.to_json()) + "\n")


def clear_state(where: Path) -> None:
    for name in (STATE, TOKEN):
        (where / name).unlink(missing_ok=True)


# -- does it answer ---------------------------------------------------------------------

def read_token(state: ClusterState) -> str:
    with open(state.token_file, encoding="utf-8") as f:
        return f.read().strip()


def why_not_answering(state: ClusterState, timeout_s: float = 3.0) -> str | None:
    """None if the GCS at the recorded address answers to our token, else why not (one
    line). Asks with the token from the file, without touching this process's Ray
    settings: a stale cluster must leave the command exactly as it was."""
    host, _, port = state.address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"nothing answers at {state.address} ({exc.strerror or type(exc).__name__})"
    try:
        token = read_token(state)
    except OSError as exc:
        return f"its token file {state.token_file} is unreadable ({exc.strerror})"
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(state.address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=[("authorization", f"Bearer {token}")],
                timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{state.address} does not answer as that cluster ({exc.code().name.lower()})"
    return None


def use_token(state: ClusterState) -> None:
    """Make this process present the cluster's token (read from its file by Ray itself)."""
    from cluster import netguard

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = state.token_file
    os.environ.pop("RAY_AUTH_TOKEN", None)
    netguard._reload_token()


def running(where: Path | None = None) -> tuple[ClusterState | None, str | None]:
    """(the state of a cluster `up` started that answers, None), else (None, a note on why
    a state file there was ignored, or None when there is none)."""
    state, problem = read_state(where)
    if state is None:
        return None, problem
    why = why_not_answering(state)
    if why:
        return None, (f"the Ray cluster `unlearn up` started is gone ({why}); ignoring {(where or home()) / STATE} "
                      f"(`unlearn down` removes it)")
    return state, None


# -- start and stop -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    """Fail at once when the port is taken (Ray's GCS would retry for most of a minute,
    then point at a log file)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UnlearnError(f"--port {port}: 127.0.0.1:{port} is in use ({exc.strerror}); choose another "
                               f"or leave --port out (a free one)") from None


def ray_start_command(temp: str, port: int, num_cpus: int, object_store_mb: int) -> list[str]:
    """`ray start --head` on loopback. The ports Ray would otherwise fix (its client server's
    10001, its dashboard agent's 52365) are free ones, so that another Ray of the machine
    neither blocks this one nor is blocked by it."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    launcher = [ray_bin] if os.path.exists(ray_bin) else [sys.executable, "-m", "ray.scripts.scripts"]
    return [*launcher, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 2**20}",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_temp_dir(temp)}"]


def ray_temp_dir(temp: str) -> str:
    """Ray's --temp-dir: a folder inside `temp`. Ray makes its temp dir world-writable (every
    driver that connects does it again), so the folder around it (mode 700, made by
    mkdtemp) is what keeps its sockets and logs to the user."""
    return os.path.join(temp, "r")


def ray_environment(token_file: Path) -> dict:
    """The environment of the started Ray: loopback, no usage statistics, token required,
    read from the 600 file; none of the user's own Ray token or address."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(var, None)
    return env


def start(where: Path, num_cpus: int, port: int | None) -> ClusterState:
    """Start the head, record it, and return its state. On any failure nothing is left:
    no process, no temp dir, no token, no state file."""
    prepare_home(where)
    if port is not None:
        check_port_free(port)
    for attempt in range(1, STARTS + 1):
        try:
            return _launch(where, num_cpus, port)
        except SlowStart as exc:
            if attempt == STARTS:
                raise UnlearnError(f"cannot start a Ray cluster: {exc} (tried {STARTS} times; is the machine "
                                   f"overloaded?)") from None
    raise AssertionError("unreachable")


STARTS = 2  # Ray gives its raylet 30 s to register (fixed): on a busy machine a second try often works


class SlowStart(Exception):
    """`ray start` gave up waiting for its own raylet."""


def _launch(where: Path, num_cpus: int, port: int | None) -> ClusterState:
    """One `ray start`; on failure nothing of it is left."""
    import secrets
    import tempfile

    token_file = where / TOKEN
    token_file.unlink(missing_ok=True)
    _write_private(token_file, secrets.token_hex(32))
    temp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp" if os.path.isdir("/tmp") else None)
    port = port or free_port()
    object_store_mb = int(os.environ.get("UNLEARN_OBJECT_STORE_MB", "512"))
    started = time.time() - 1.0  # create times are rounded; a margin keeps `ray start` itself in
    try:
        proc = subprocess.Popen(ray_start_command(temp, port, num_cpus, object_store_mb),
                                env=ray_environment(token_file), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        clear_state(where)
        raise UnlearnError(f"cannot start a Ray cluster: {exc.strerror or exc}") from None
    state = ClusterState(address=f"127.0.0.1:{port}", token_file=str(token_file), temp_dir=temp,
                         session=proc.pid, started=started, num_cpus=num_cpus)
    try:
        _wait_started(proc)
        state = ClusterState(**{**asdict(state), "pids": _identify(processes(state))})
        write_state(where, state)
    except BaseException:  # a failed start, Ctrl-C: leave nothing behind
        stop(state)
        clear_state(where)
        raise
    return state


def _wait_started(proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Wait for `ray start` to return; its last line is the error when it failed."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise UnlearnError(f"cannot start a Ray cluster: ray start took more than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
        last = (lines or ["ray start failed"])[-1]
        if "timed out during startup" in last:
            raise SlowStart(last.removeprefix("Exception: "))
        raise UnlearnError(f"cannot start a Ray cluster: {last}")


def _identify(procs: list) -> tuple:
    """(pid, create time) of each process still there."""
    import psutil

    out = []
    for p in procs:
        try:
            out.append((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return tuple(out)


def processes(state: ClusterState) -> list:
    """The live processes of the cluster: those of its session started after it (Ray's, by
    their command line), those whose command line names its temp dir, the recorded ones
    still the same processes, and every descendant of these (the workers). None after a
    reboot: a session id or pid of then may name another process now."""
    import psutil

    if psutil.boot_time() > state.started:  # the machine rebooted since: nothing of it runs
        return []
    recorded = dict(state.pids)
    roots = {}
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            ours = (os.getsid(p.pid) == state.session and p.info["create_time"] >= state.started
                    and "ray" in cmdline) \
                or state.temp_dir in cmdline \
                or abs(recorded.get(p.pid, -1e9) - (p.info["create_time"] or 0)) < 1e-3
        except (OSError, psutil.Error):
            continue
        if ours and p.pid != os.getpid():
            roots[p.pid] = p
    return with_descendants(list(roots.values()))


def with_descendants(roots: list) -> list:
    """`roots` and all their descendants that still run (an exited child nobody reaped yet
    does not)."""
    import psutil

    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass

    def alive(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in found.values() if alive(p)]


def stop(state: ClusterState, deadline_s: float = 60.0) -> int:
    """Stop every process of the cluster (`stop_processes`), then remove its temp dir
    (sockets, logs). Returns how many processes were signalled."""
    n = stop_processes(lambda: processes(state), deadline_s)
    if os.path.basename(state.temp_dir).startswith(TEMP_PREFIX):
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return n


def stop_processes(find, deadline_s: float = 60.0, term_wait_s: float = 3.0) -> int:
    """TERM, then KILL, in rounds until `find()` finds no process left or the deadline
    passes: a raylet being stopped can still fork a worker after a snapshot, and a KILL is
    not instant. Returns how many processes were signalled."""
    import psutil

    seen: set[int] = set()
    stop_at = time.monotonic() + deadline_s
    sig = signal.SIGTERM
    while (procs := find()) and time.monotonic() < stop_at:
        for p in procs:
            try:
                p.send_signal(sig)
                seen.add(p.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=term_wait_s if sig == signal.SIGTERM else 5)
        sig = signal.SIGKILL
    return len(seen)


# -- warm runs ---------------------------------------------------------------------------------

def warm_run(store, run: str, window_s: float, actor_cpus: float | None, address: str) -> int:
    """Create (or find) the run's coordinator on the cluster, detached, with every shard
    model loaded; returns the coordinator's pid."""
    from cluster.runtime import coordinator_actor, ray_get

    handle = coordinator_actor(store, run, window_s, actor_cpus, address, detached=True)
    ray_get(handle.warm.remote(True))
    return ray_get(handle.pid.remote())
