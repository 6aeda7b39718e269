"""A Ray cluster of several nodes on this one machine, for tests: a head and worker nodes,
each a `ray start` in a session of its own, with a temp dir, a HOME and an UNLEARN_CACHE of
its own (so nothing can lean on a folder that only one node sees), all on loopback and
behind one token. A node is lost the way a machine dies: `kill -9` of every process of its
session (raylet, object store, workers), nothing graceful.

Ray's own `ray.cluster_utils.Cluster` starts its nodes inside the test process and shares
one temp dir between them; separate `ray start`s are what a real cluster runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster import up

OBJECT_STORE_MB = 120

# `ray start --address` of a worker node, with every socket on loopback. Ray refuses to add
# a node while its node-IP mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps a
# machine's Ray on 127.0.0.1), and with it on it rewrites the head's 127.0.0.1 to the
# machine's routable IP, where nothing listens. Machines of a real cluster have routable
# IPs and need neither; here the check is passed and the node's IP stays 127.0.0.1.
_JOIN_ON_LOOPBACK = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


@dataclass
class Node:
    name: str
    folder: str               # mode 700; Ray's temp dir, HOME and UNLEARN_CACHE inside
    session: int = 0          # the session of its `ray start`: every daemon and worker of the node
    env: dict = field(default_factory=dict)

    @property
    def temp_dir(self) -> str:
        return up.ray_temp_dir(self.folder)

    def processes(self) -> list:
        """Every live process of the node: its session, whatever names its temp dir, and
        their descendants (Ray workers)."""
        import psutil

        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if os.getsid(p.pid) == self.session or self.temp_dir in " ".join(p.info["cmdline"] or []):
                    roots.append(p)
            except (OSError, psutil.Error):
                continue
        return up.with_descendants(roots)


class LocalCluster:
    """`head_cpus` on the head, one worker node per entry of `worker_cpus`. `env` is added
    to every node's environment (the S3 settings)."""

    def __init__(self, where: Path, head_cpus: int = 1, worker_cpus: tuple = (1, 1), env: dict | None = None):
        self.where = Path(where)
        self.where.mkdir(parents=True, exist_ok=True)
        self.token_file = self.where / up.TOKEN
        self.port = up.free_port()
        self.head_cpus, self.worker_cpus, self.extra = head_cpus, tuple(worker_cpus), dict(env or {})
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    def client_env(self) -> dict:
        """What a command joining the cluster needs (its own HOME and cache: the driver is
        one more machine)."""
        return {**up.ray_environment(self.token_file), **self.extra, "RAY_ADDRESS": self.address}

    def start(self) -> "LocalCluster":
        import secrets

        up._write_private(self.token_file, secrets.token_hex(32))
        try:
            self._start_node("head", self.head_cpus, head=True)
            for i, cpus in enumerate(self.worker_cpus):
                self._start_node(f"worker{i + 1}", cpus, head=False)
            self.wait_nodes(len(self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, name: str, cpus: int, head: bool) -> Node:
        folder = tempfile.mkdtemp(prefix=f"{up.TEMP_PREFIX}{name}-", dir="/tmp")
        node = Node(name, folder)
        for sub in ("home", "cache", "tmp"):
            os.makedirs(os.path.join(folder, sub), mode=0o700)
        node.env = {**up.ray_environment(self.token_file), **self.extra, "HOME": os.path.join(folder, "home"),
                    "UNLEARN_CACHE": os.path.join(folder, "cache"), "TMPDIR": os.path.join(folder, "tmp")}
        if head:
            cmd = up.ray_start_command(folder, self.port, cpus, OBJECT_STORE_MB)
        else:
            cmd = [*up.ray_start_command(folder, self.port, cpus, OBJECT_STORE_MB)]
            cmd = [a for a in cmd if a != "--head" and not a.startswith(("--port=", "--ray-client-server-port=",
                                                                          "--include-dashboard="))]
            cmd.insert(cmd.index("start") + 1, f"--address={self.address}")
            cmd = [sys.executable, "-c", _JOIN_ON_LOOPBACK, *cmd[cmd.index("start"):]]
        self.nodes.append(node)
        proc = subprocess.Popen(cmd, env=node.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)
        node.session = proc.pid
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start of {name} failed: {out[-2000:]}")
        return node

    def wait_nodes(self, n: int, timeout_s: float = 60.0) -> None:
        """Until the head's GCS counts `n` live nodes (asked from a subprocess: the test
        process may hold a Ray of its own)."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.alive_nodes()
            if alive == n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{alive} live nodes, not {n}, after {timeout_s:.0f} s")
            time.sleep(1.0)

    def alive_nodes(self) -> int:


        code = ("import ray; ray.init(address='auto', log_to_driver=False, configure_logging=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code], env=self.client_env(), capture_output=True, text=True,
                             timeout=120)
        try:
            return int(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"cannot count the cluster's nodes: {out.stderr[-1500:]}") from None

    def kill(self, node: Node) -> int:
        """The node dies: SIGKILL to every process of it, at once, until none is left."""
        return _kill_all(node)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            up.stop_processes(node.processes, deadline_s=60.0, term_wait_s=5.0)
            shutil.rmtree(node.folder, ignore_errors=True)


def _kill_all(node: Node, deadline_s: float = 30.0) -> int:
    import psutil

    killed = set()
    stop_at = time.monotonic() + deadline_s
    while (procs := node.processes()) and time.monotonic() < stop_at:
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
                killed.add(p.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
    return len(killed)


_ACTORS = """
import json, sys, ray
ray.init(address="auto", namespace="unlearn", log_to_driver=False, configure_logging=False)
pause = json.loads(sys.argv[1])
out = {}
for a in ray.util.list_named_actors(all_namespaces=True):
    if a["namespace"] == "unlearn" and "/shard-" in a["name"]:
        actor = ray.get_actor(a["name"], namespace="unlearn")
        if pause and a["name"].endswith("/shard-%d" % pause["shard"]):
            ray.get(actor.pause_at.remote(pause["point"], pause["seconds"]), timeout=120)
        out[int(a["name"].rsplit("-", 1)[1])] = ray.get(actor.pid.remote(), timeout=120)
print(json.dumps(out))
"""


def shard_actors(cluster: LocalCluster, pause: dict | None = None) -> dict[int, int]:
    """{shard: pid} of the live shard actors on the cluster (asked from a driver of its
    own); `pause` ({"shard", "point", "seconds"}) first holds that shard's next job at
    `point` (ShardWorker.pause_at)."""
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", _ACTORS, json.dumps(pause)], env=cluster.client_env(),
                         capture_output=True, text=True, timeout=240)
    try:
        return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    except (ValueError, IndexError):
        raise RuntimeError(f"cannot list the shard actors: {out.stderr[-2000:]}") from None


def node_of(cluster: LocalCluster, pid: int) -> str | None:
    """The name of the node whose process tree holds `pid`."""
    for node in cluster.nodes:
        if pid in {p.pid for p in node.processes()}:
            return node.name
    return None
