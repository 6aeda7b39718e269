"""Nothing of the Ray clusters unlearn starts is open to anyone else: every socket on
loopback, token authentication on, the token in no file, command line or log; Ray's own
log lines stay out of the terminal; a wrong --address fails in seconds; S actors fit.

The process checks share one module fixture: `train`, `delete` and `serve` with the Ray
runtime run at once (each starts its own local Ray), their listening sockets sampled while
they run (about a minute on 2 cores: marked integration)."""
import os
import socket
import sys
import time

import psutil
import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from proc_helpers import cli_env, http, kill_session, spawn

TINY = ["--model", "tiny", "--shards", "2", "--slices", "2", "--max-length", "32", "--batch-size", "4",
        "--labels", "neg,pos"]


# -- pure parts ---------------------------------------------------------------------------

def test_actor_share_rounds_down_so_that_every_actor_fits():
    from cluster.runtime import actor_share

    assert actor_share(2, 3) == 0.6666 and actor_share(2, 7) == 0.2857 and actor_share(2, 1) == 1.0
    assert actor_share(2, 4) == 0.5 and actor_share(1, 3, cap=0.5) == 0.3333
    for total in (0.5, 1, 2, 3, 6, 7, 16, 96):
        for n in range(1, 70):
            share = actor_share(total, n)
            assert n * share <= total + 1e-9, (total, n, share)
            assert share > min(1.0, total / n) - 1e-4, (total, n, share)


def test_default_shares_on_two_cpus_fit_three_and_seven_shards(monkeypatch, tmp_path):
    """Seen: --shards 3 on 2 CPUs asked for 3 x 0.667 = 2.001 CPUs and failed."""
    import ray

    from cluster.runtime import RayExecutor, erase_pool
    from core.store import LocalStore
    from sisa.config import SisaConfig

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr("cluster.runtime.node_resources", lambda: ([{"CPU": 2.0}], [{"CPU": 2.0}]))
    for shards in (3, 7, 9):
        config = SisaConfig(shards=shards, slices=1, model="tiny", labels=("neg", "pos"))
        executor = RayExecutor(LocalStore(str(tmp_path)), "r", config)
        assert shards * executor.actor_cpus <= 2.0, (shards, executor.actor_cpus)

    class Erase:
        partitions = 3

        def digest(self):
            return "0" * 64

    assert 3 * erase_pool(LocalStore(str(tmp_path)), "r", Erase()).actor_cpus <= 1.0


def test_actors_that_can_never_fit_fail_at_once_and_say_why(monkeypatch):
    """A cluster too small in all is not "actors of other runs": say so, with the share that fits."""
    import ray

    from cluster.runtime import ensure_fits
    from core.errors import UnlearnError

    def no_actor(name, namespace=None):
        raise ValueError(name)

    def free(cpus):
        monkeypatch.setattr("cluster.runtime.node_resources", lambda: ([{"CPU": cpus}], [{"CPU": 2.0}]))

    monkeypatch.setattr(ray, "get_actor", no_actor)
    free(2.0)
    t0 = time.monotonic()
    with pytest.raises(UnlearnError) as exc:
        ensure_fits(["a", "b", "c"], 0.7, wait_s=3)
    assert time.monotonic() - t0 < 2  # no wait can help
    assert str(exc.value) == ("3 new actors x 0.7 CPUs do not fit in the Ray cluster's free 2 CPUs: it has 2 CPUs in "
                              "all; pass --actor-cpus 0.6666 or less")
    free(0.5)
    with pytest.raises(UnlearnError, match=r"free 0.5 CPUs: other actors on it hold 1.5 CPUs \(other runs, or "):
        ensure_fits(["a", "b", "c"], 0.6, wait_s=0)
    free(2.0)
    ensure_fits(["a", "b", "c"], 0.6666, wait_s=0)  # fits


def test_on_several_nodes_each_actor_must_fit_on_one_node():
    """Three nodes of 1 CPU hold 3 CPUs but not four actors of 0.75: the fourth would wait
    forever. Shares and fit checks count per node."""
    from cluster.runtime import actor_share, actors_that_fit, fit_problem

    assert actor_share([1, 1, 1], 4) == 0.5 and actor_share(3, 4) == 0.75
    assert actor_share([1, 1, 1], 3) == 1.0 and actor_share([2, 1], 3) == 1.0 and actor_share([2, 0.5], 3) == 0.6666
    assert actor_share([4, 0.25], 2) == 1.0 and actor_share([0.5, 0.5], 4, cap=0.5) == 0.25
    for nodes in ([1, 1, 1], [2, 1], [0.5, 3, 1.5], [16, 16, 8, 1], [0.1]):
        for n in range(1, 70):
            share = actor_share(nodes, n)
            assert actors_that_fit(nodes, share) >= n or share == 0.0001, (nodes, n, share)
            assert actors_that_fit(nodes, share + 0.0002) < n or share == 1.0, (nodes, n, share)
    three = [{"CPU": 1.0}] * 3
    assert fit_problem(3, 0.75, 0.0, three, three) is None
    why, never = fit_problem(4, 0.75, 0.0, three, three)
    assert never and why == ("4 new actors x 0.75 CPUs do not fit in the free 3 CPUs of the Ray cluster's 3 nodes: "
                             "it has 3 CPUs in all; pass --actor-cpus 0.5 or less")
    busy = [{"CPU": 0.25}, {"CPU": 0.75}, {"CPU": 1.0}]  # 2 CPUs free, yet room for 3 actors of 0.5
    why, never = fit_problem(4, 0.5, 0.0, busy, three)
    assert not never and "free 2 CPUs of the Ray cluster's 3 nodes: other actors on it hold 1 CPUs" in why
    gpu = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}]
    assert fit_problem(2, 1.0, 0.5, gpu, gpu) is None and fit_problem(3, 1.0, 0.5, gpu, gpu)[1]


def test_the_hook_rewrites_wildcard_grpc_binds_to_loopback(monkeypatch):
    import ray._common.tls_utils as tls

    from cluster import netguard

    assert netguard.check() is None, "this Ray moved the function the loopback hook wraps"
    seen = []
    monkeypatch.setattr(tls, "add_port_to_grpc_server", lambda server, address: seen.append(address) or 7)
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:  # the hook patches it too: restore it afterwards
        monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    netguard.loopback_grpc()
    netguard.loopback_grpc()  # twice (a worker reused): still one wrapper
    assert tls.add_port_to_grpc_server(None, "[::]:0") == 7
    tls.add_port_to_grpc_server(None, "0.0.0.0:5")
    tls.add_port_to_grpc_server(None, "10.1.2.3:6")
    assert seen == ["127.0.0.1:0", "127.0.0.1:5", "10.1.2.3:6"]


def test_the_coordinator_joins_the_given_address_before_ray_could_start_itself(monkeypatch, tmp_path):
    """Seen: ERASE's delete and serve reached the coordinator with no Ray yet: Ray started
    itself (no token, its dashboard, its log lines) and --address was ignored."""
    from cluster import runtime
    from core.store import LocalStore

    class Joined(Exception):
        pass

    def init_ray(address=None, num_cpus=None):
        raise Joined(address)

    monkeypatch.setattr(runtime, "init_ray", init_ray)
    with pytest.raises(Joined, match="127.0.0.1:6379"):
        runtime.coordinator_actor(LocalStore(str(tmp_path)), "r", address="127.0.0.1:6379")


def test_an_address_where_nothing_listens_fails_in_seconds_with_one_line(tmp_path, capsys, monkeypatch):
    """Seen: `--address 127.0.0.1:1` retried for 150 s, printing Ray's warnings."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(8))
    t0 = time.monotonic()
    code = main(["train", "--data", data, "--run", "r", "--store", str(tmp_path / "s"), *TINY, "--runtime", "ray",
                 "--address", f"127.0.0.1:{port}"])
    assert code == 1 and time.monotonic() - t0 < 10
    err = capsys.readouterr().err.splitlines()
    assert err == [f"unlearn: error: cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there "
                   f"(Connection refused); start it first (`ray start --head`), or check --address / RAY_ADDRESS"]
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.*"))


# -- the processes --------------------------------------------------------------------------

LOOPBACK = ("127.", "::1", "::ffff:127.")


def session_of(proc) -> list:
    """Every live process of the command's session (its Ray processes and workers too)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def describe(p) -> str:
    try:
        name, cmd = p.name(), " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    return name if name.startswith("ray::") else f"{name} {cmd[:120]}"


class Watch:
    """Samples, while commands run, the sockets their processes listen on (TCP) or are bound
    to (UDP), from /proc (psutil), and the command lines of those processes."""

    def __init__(self, procs: dict):
        self.procs = procs
        self.sockets = {name: {} for name in procs}  # name -> {(ip, port, kind): process}
        self.cmdlines = {name: {} for name in procs}  # name -> {pid: cmdline}
        self.samples = 0

    def sample(self) -> None:
        members = {}
        for name, proc in self.procs.items():
            for p in session_of(proc):
                members[p.pid] = (name, p)
                try:
                    self.cmdlines[name][p.pid] = " ".join(p.cmdline())
                except psutil.Error:
                    pass
        for c in psutil.net_connections("inet"):
            if c.pid in members and c.laddr and (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM):
                name, p = members[c.pid]
                kind = "tcp" if c.type == socket.SOCK_STREAM else "udp"
                self.sockets[name].setdefault((c.laddr.ip, c.laddr.port, kind), describe(p))
        self.samples += 1


@pytest.fixture(scope="module")
def ray_commands(tmp_path_factory):
    from seaweedfs import free_port

    base = tmp_path_factory.mktemp("exposure")
    home = base / "home"  # Ray would write a token file here (~/.ray/auth_token)
    home.mkdir()
    store = str(base / "store")
    data = write_jsonl(base / "d.jsonl", synthetic_records(24, owners_every=1))
    assert main(["train", "--data", data, "--run", "a", "--store", store, *TINY, "--runtime", "local", "--quiet"]) == 0
    env = cli_env("ray", HOME=str(home))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # as a user's shell: none set
        env.pop(var, None)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = {name: str(base / name) for name in ("train", "delete", "serve")}
    procs = {
        "train": spawn("train", "--data", data, "--run", "b", "--store", store, *TINY, log=logs["train"], env=env),
        "delete": spawn("delete", "--run", "a", "--store", store, "--ids", "r0003", log=logs["delete"], env=env),
        "serve": spawn("serve", "--run", "a", "--store", store, "--port", str(port), log=logs["serve"], env=env),
    }
    watch = Watch(procs)
    try:
        deadline = time.monotonic() + 420
        serving = False
        while True:
            watch.sample()
            if not serving and procs["serve"].poll() is None:
                try:
                    serving = http(url, "/predict", {"texts": ["great fun"]}, timeout=5)[0] == 200
                except OSError:
                    pass
            if serving and procs["train"].poll() is not None and procs["delete"].poll() is not None:
                break
            if procs["serve"].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer: {open(logs['serve'] + '.err').read()[-3000:]}")
            time.sleep(0.3)
        watch.sample()
        yield {"procs": procs, "logs": logs, "watch": watch, "home": home, "url": url}
    finally:
        for proc in procs.values():
            if proc.poll() is None or session_of(proc):
                kill_session(proc)


@pytest.mark.integration
def test_every_socket_of_train_delete_and_serve_is_on_loopback(ray_commands):
    watch = ray_commands["watch"]
    for name in ("train", "delete", "serve"):
        assert ray_commands["procs"][name].returncode in (None, 0), open(ray_commands["logs"][name] + ".err").read()
        found = watch.sockets[name]
        assert any("raylet" in who for who in found.values()), (name, watch.samples, found)  # sampled while Ray ran
        exposed = {addr: who for addr, who in found.items() if not addr[0].startswith(LOOPBACK)}
        assert not exposed, (name, exposed)
    assert any("ServeReplica" in who for who in watch.sockets["serve"].values()), watch.sockets["serve"]


@pytest.mark.integration
def test_ray_prints_nothing_on_the_terminal(ray_commands):
    """Every stderr line is the product's own ("unlearn: ..."): no core_worker.cc, no
    dashboard address, no Serve INFO lines."""
    for name in ("train", "delete", "serve"):
        lines = open(ray_commands["logs"][name] + ".err").read().splitlines()
        assert all(line.startswith("unlearn: ") for line in lines), (name, lines[:5])
    assert "accepted (durable)" in open(ray_commands["logs"]["delete"] + ".err").read()


def _serve_cluster(ray_commands) -> tuple[str, str, list]:
    """(GCS address, token, processes) of the cluster `serve` started."""
    members = session_of(ray_commands["procs"]["serve"])
    gcs = next(p for p in members if "gcs_server" in p.name())
    port = next(c.laddr.port for c in gcs.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
    # the driver sets the token after it started (its /proc environ predates it); the GCS inherits it
    token = gcs.environ().get("RAY_AUTH_TOKEN", "")
    assert gcs.environ().get("RAY_AUTH_MODE") == "token" and len(token) == 64, "serve's cluster runs without a token"
    return f"127.0.0.1:{port}", token, members


@pytest.mark.integration
def test_a_client_without_the_token_is_refused_one_with_it_is_served(ray_commands):
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    gcs, token, _members = _serve_cluster(ray_commands)

    def read_kv(token_or_none):
        meta = [("authorization", f"Bearer {token_or_none}")] if token_or_none else []
        with grpc.insecure_channel(gcs) as channel:
            stub = gcs_service_pb2_grpc.InternalKVGcsServiceStub(channel)
            return stub.InternalKVKeys(gcs_service_pb2.InternalKVKeysRequest(prefix=b"", namespace=b"fun"),
                                       metadata=meta, timeout=10)

    for wrong in (None, "0" * 64):  # what `ray.init(address=...)` asks first, and a reader of the job's code
        with pytest.raises(grpc.RpcError) as exc:
            read_kv(wrong)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert read_kv(token).results  # the job's exported functions: the cluster answers its owner


@pytest.mark.integration
def test_the_token_is_in_no_file_command_line_or_log(ray_commands):
    gcs, token, members = _serve_cluster(ray_commands)
    assert not (ray_commands["home"] / ".ray").exists()  # Ray's default token file, mode 644
    for name, cmdlines in ray_commands["watch"].cmdlines.items():
        assert cmdlines and not any(token in c for c in cmdlines.values()), name
    sessions = {arg.split("=", 1)[1] for p in members for arg in p.cmdline() if arg.startswith("--session_dir=")}
    assert sessions, [p.cmdline()[:3] for p in members]
    for session in sessions:
        for root, _dirs, files in os.walk(session):
            for f in files:
                path = os.path.join(root, f)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as fh:
                        assert token.encode() not in fh.read(), path


def test_joining_a_cluster_off_loopback_gives_ray_back_its_node_ip(monkeypatch):
    """cluster/__init__ keeps a local Ray on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0);
    a driver in a KubeRay pod joining the head at its pod IP would then look for its raylet
    at 127.0.0.1 and find none. Unless the user chose the mode, joining off loopback turns
    Ray's default back on; on loopback it stays off."""
    import ray._private.ray_constants as constants

    import cluster
    from cluster.runtime import _join_mode

    monkeypatch.setattr(cluster, "RAY_CLUSTER_MODE_SET_BY_USER", False)
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", False)
    _join_mode("127.0.0.1:6379")
    _join_mode("localhost:6379")
    assert constants.ENABLE_RAY_CLUSTER is False
    _join_mode("10.0.0.7:6379")
    assert constants.ENABLE_RAY_CLUSTER is True
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setattr(cluster, "RAY_CLUSTER_MODE_SET_BY_USER", True)
    _join_mode("10.0.0.7:6379")
    assert constants.ENABLE_RAY_CLUSTER is False


def test_serve_runs_one_proxy_when_bound_to_loopback_and_one_per_node_otherwise():
    from cluster.serving import proxy_location

    assert proxy_location("127.0.0.1") == proxy_location("localhost") == proxy_location("::1") == "HeadOnly"
    assert proxy_location("0.0.0.0") == proxy_location("10.1.2.3") == "EveryNode"
