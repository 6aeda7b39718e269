"""Ray runtime: one actor per SISA shard, and an executor that fans shard jobs out to them.

The shard actors run the very same `ShardWorker` as the in-process engine, so a run
trained or edited through Ray is bit-identical to one trained in-process (one torch
thread per actor, deterministic kernels). Actors only write content-addressed
objects; the driver (or the coordinator) commits the manifest.

Embedded default: a local Ray started for this process, bound to 127.0.0.1. With
`--address` or RAY_ADDRESS the same code joins an existing cluster; every node then
needs the store (a shared directory, or S3 with AWS_* set on the nodes).
"""
from __future__ import annotations

import json
import os
import sys
import threading
from typing import Sequence

import numpy as np

import cluster  # noqa: F401  (sets the loopback environment before ray is imported)
from cluster import netguard
from sisa.config import SisaConfig
from core.errors import UnlearnError, one_line
from sisa.manifest import ShardEntry
from sisa.shard import RetrainJob, ShardWorker, TrainJob
from core.store import Store, open_store

NAMESPACE = "unlearn"


def init_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray on loopback. Idempotent.

    A cluster started here binds every socket to 127.0.0.1 (the Serve replicas' too, through
    `cluster.netguard`) and refuses clients without its token, a fresh random one kept in
    this process's environment. Joining a cluster on loopback (`--address 127.0.0.1:...`)
    keeps the replicas on loopback too; its token is the user's (RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH, with RAY_AUTH_MODE=token, as Ray documents)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    if not address or _on_loopback(address):
        problem = netguard.check()
        if problem:
            print(f"unlearn: warning: Ray Serve replicas may listen on every interface: {problem}",
                  file=sys.stderr, flush=True)
        kwargs["runtime_env"] = {"worker_process_setup_hook": netguard.HOOK}
    if address:
        _join_mode(address)
    try:
        if address:
            probe_cluster(address)
            ray.init(address=address, **kwargs)
        else:
            netguard.use_fresh_token()
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=int(os.environ.get("UNLEARN_OBJECT_STORE_MB", "512")) * 2**20, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UnlearnError(f"cannot start or join {where}: {str(exc).splitlines()[0]}") from None


def _join_mode(address: str) -> None:
    """Ray takes 127.0.0.1 as this process's node IP while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is 0 (set by `cluster/__init__` to keep a local Ray on loopback). A driver joining a
    cluster whose nodes have routable IPs (a KubeRay pod, `ray up`) must take the machine's
    own IP, or it finds no raylet of its node: so unless the user set the variable, joining
    an address that is not on loopback ("auto" read from Ray's address file) switches
    Ray's node-IP mode back to its default."""
    if cluster.RAY_CLUSTER_MODE_SET_BY_USER:
        return
    import ray._private.ray_constants as constants
    from ray._private.services import canonicalize_bootstrap_address

    resolved = address
    if address == "auto":
        try:
            resolved = canonicalize_bootstrap_address(address) or address
        except Exception:  # no cluster to find: ray.init says so
            return
    if not _on_loopback(resolved) and _host_port(resolved) is not None:
        constants.ENABLE_RAY_CLUSTER = True


def _host_port(address: str) -> tuple[str, int] | None:
    """('127.0.0.1', 6379) from '127.0.0.1:6379', 'ray://h:10001' or '[::1]:6379'; None for
    what is not host:port ('auto')."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _on_loopback(address: str) -> bool:
    hp = _host_port(address)
    return hp is not None and (hp[0] == "localhost" or hp[0] == "::1" or hp[0].startswith("127."))


def probe_cluster(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, where ray.init would retry for minutes and fill the
    terminal with its own log lines: nothing listens at `address`, it is not a Ray
    cluster, or it refuses our token."""
    import socket

    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__.replace("Error", " error").lower()
        raise UnlearnError(f"cannot join the Ray cluster at {address}: nothing answers there ({reason}); "
                           f"start it first (`ray start --head`), or check --address / RAY_ADDRESS") from None
    if address.startswith("ray://"):
        return  # Ray Client: no GCS to ask
    try:
        import grpc
        from ray._raylet import AuthenticationTokenLoader
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray: let ray.init find out
        return
    netguard._reload_token()
    loader = AuthenticationTokenLoader.instance()
    metadata = list(loader.get_token_for_http_header().items()) if loader.has_token() else []
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                have = "a token that is not its token" if metadata else "no token"
                raise UnlearnError(f"cannot join the Ray cluster at {address}: it requires token authentication "
                                   f"and this process has {have}: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                                   f"(or RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
            raise UnlearnError(f"cannot join the Ray cluster at {address}: it does not answer as a Ray cluster "
                               f"({code.name.lower()}); check --address / RAY_ADDRESS (the head's GCS port, "
                               f"6379 by default)") from None


RESOURCE_UNIT = 1e-4  # Ray counts resources in steps of 1/10,000
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node, 1 there and nowhere else


def actor_share(total: float | Sequence[float], n: int, cap: float = 1.0) -> float:
    """An equal share of CPUs (or GPUs) for each of `n` actors, at most `cap`, rounded down
    to Ray's resource unit so that all n always fit (2 CPUs, 3 actors: 0.6666 each; 0.667
    would need 2.001). `total` is one amount, or one per node: an actor runs on one node,
    so on three nodes of 1 CPU four actors get 0.5 each, not 0.75 (three would fit, the
    fourth would wait forever)."""
    nodes = [float(total)] if isinstance(total, (int, float)) else [float(t) for t in total]
    n = max(1, n)
    best = 0.0
    for share in sorted({min(cap, c / k) for c in nodes for k in range(1, n + 1)} | {cap}, reverse=True):
        if share > 0 and actors_that_fit(nodes, share) >= n:
            best = share
            break
    steps = int(best / RESOURCE_UNIT + 1e-6)
    while steps > 1 and actors_that_fit(nodes, steps * RESOURCE_UNIT) < n:  # float edge: one unit less
        steps -= 1
    return max(1, steps) / 10_000


def actors_that_fit(nodes: Sequence[float], share: float) -> int:
    """How many actors of `share` each fit on nodes with these free amounts."""
    return sum(int((c + 1e-6) / share) for c in nodes) if share > 0 else 0


def node_resources() -> tuple[list[dict], list[dict]]:
    """(free, total) resources of each live node of the cluster Ray is joined to. Ray's
    per-node view is not public API: where it is missing, the cluster counts as one node."""
    import ray

    try:
        from ray._private.state import state

        total = state.total_resources_per_node()
        free = state.available_resources_per_node()
        ids = sorted(total)
        if ids:
            return [dict(free.get(i, {})) for i in ids], [dict(total[i]) for i in ids]
    except Exception:
        pass
    return [ray.available_resources()], [ray.cluster_resources()]


def node_cpus() -> list[float]:
    """The CPUs of each live node (at least one entry)."""
    return [node.get("CPU", 0.0) for node in node_resources()[1]] or [1.0]


def _node_fits(node: dict, cpus: float, gpus: float) -> int:
    counts = [int((node.get("CPU", 0.0) + 1e-6) / cpus)] if cpus > 0 else []
    if gpus > 0:
        counts.append(int((node.get("GPU", 0.0) + 1e-6) / gpus))
    return min(counts) if counts else 10**9


def fit_problem(n: int, cpus: float, gpus: float, free: list[dict], total: list[dict]) -> tuple[str, bool] | None:
    """None if `n` new actors of `cpus` CPUs and `gpus` GPUs each fit on the nodes' `free`
    resources (each actor on one node), else (why not, whether they never can): more than
    the cluster's nodes hold in all (no wait helps), or more than is free now."""
    if sum(_node_fits(node, cpus, gpus) for node in free) >= n:
        return None
    kinds = ["CPU", "GPU"] if gpus else ["CPU"]

    def summed(nodes: list[dict], k: str) -> float:
        return round(sum(node.get(k, 0.0) for node in nodes), 4)

    want = f"{n} new actors x {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
    have = " and ".join(f"{summed(free, k):g} {k}s" for k in kinds)
    where = f"the Ray cluster's free {have}" if len(total) <= 1 else f"the free {have} of the Ray cluster's {len(total)} nodes"
    if sum(_node_fits(node, cpus, gpus) for node in total) < n:
        k = "CPU" if sum(_node_fits(node, cpus, 0.0) for node in total) < n or not gpus else "GPU"
        option = "--actor-cpus" if k == "CPU" else "--actor-gpus"
        return (f"{want} do not fit in {where}: it has {summed(total, k):g} {k}s in all; "
                f"pass {option} {actor_share([node.get(k, 0.0) for node in total], n):g} or less"), True
    held = " and ".join(f"{round(summed(total, k) - summed(free, k), 4):g} {k}s" for k in kinds)
    return (f"{want} do not fit in {where}: other actors on it hold {held} "
            f"(other runs, or commands still running): pass a smaller --actor-cpus, or stop them "
            f"(`unlearn down` stops the runs kept warm on the cluster of `unlearn up`)"), False


def ensure_fits(names: Sequence[str], cpus: float, gpus: float = 0.0, wait_s: float = 60.0) -> None:
    """Check, before creating the named actors that do not exist yet, that the cluster has
    the CPUs and GPUs free for them: Ray would leave an actor that does not fit pending
    forever, and the command would hang without a word. Resources of actors that just
    ended take a moment to show as free, so this waits up to `wait_s` before failing
    (not when the cluster is too small in all)."""
    import time

    import ray

    missing = []
    for name in names:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            missing.append(name)
    if not missing:
        return
    deadline = time.monotonic() + wait_s
    while True:
        free, total = node_resources()
        problem = fit_problem(len(missing), cpus, gpus, free, total)
        if problem is None:
            return
        why, never = problem
        if never or time.monotonic() > deadline:
            raise UnlearnError(why)
        time.sleep(0.5)


# Shard, partition and in-context actors are spread over the nodes (Ray's SPREAD strategy,
# best effort): one node lost takes as few shards as it can with it, and the shards' models
# and CPUs are not piled onto the node of whoever created them first. No placement group: a
# group's bundles are reserved all or nothing, and after a node is lost a group waits for
# its missing bundles while plain actors restart on the nodes that remain.
SPREAD = "SPREAD"

SHARD_NICENESS = 4  # added to Ray's worker niceness (15) in shard actors


def _shard_actor_class():
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=-1)
    class ShardActor:
        """One SISA shard. Jobs are idempotent (content-addressed writes, no commit), so
        Ray may re-run a job on a restarted actor and the result is the same."""

        def __init__(self, store_uri: str, run: str, config: dict):
            self.worker = ShardWorker(open_store(store_uri), run, SisaConfig.from_json(config))
            try:  # training is batch work: where CPUs are short, the front door (HTTP, intake) goes first
                os.nice(SHARD_NICENESS)
            except OSError:
                pass

        def share(self, shared_refs: list) -> None:
            """Use the frozen base weights the driver put into the object store (called right
            after creation, before any job). shared_refs wraps the ObjectRef in a list so that
            Ray hands it over unresolved: ray.get maps the node's copy read-only, without
            copying. Not a constructor argument: Ray logs an error for every restartable actor
            created with arguments in the object store. A restarted actor (or one whose owner
            is gone) loads the weights from disk instead."""
            import ray

            if self.worker.shared is None and self.worker._trainer is None:
                try:
                    self.worker.shared = ray.get(shared_refs[0], timeout=120)
                except Exception:  # ObjectLostError, OwnerDiedError, GetTimeoutError
                    pass

        def pid(self) -> int:
            return os.getpid()

        def warm(self) -> None:
            """Load the model now (a server's first answer should not wait for it)."""
            _ = self.worker.trainer

        def crash_at(self, point: str | None) -> None:
            self.worker.crash_at(point)

        def pause_at(self, point: str | None, seconds: float = 0.0, release: str | None = None) -> None:
            self.worker.pause_at(point, seconds, release)

        def memory(self) -> dict:
            """Resident memory of this actor with its model loaded (bytes): rss counts shared
            pages in full, uss only pages private to this process, pss shares them out."""
            import gc

            import psutil

            trainer = self.worker.trainer
            if self.worker.config.objective == "lm":  # fault every page in (an lm run may have no labels)
                trainer.next_token_probs(trainer.initial_state(0), [[1, 2, 3]])
            else:
                trainer.predict_proba(trainer.initial_state(0), ["touch every weight once"])
            gc.collect()
            info = psutil.Process().memory_full_info()
            return {"rss": info.rss, "uss": info.uss, "pss": getattr(info, "pss", info.uss)}

        def train(self, job: TrainJob) -> ShardEntry:
            return self.worker.train(job)

        def retrain(self, job: RetrainJob) -> ShardEntry:
            return self.worker.retrain(job)

        def verify(self, entry: ShardEntry) -> dict:
            return self.worker.verify(entry)

        def predict(self, entry: ShardEntry, texts: Sequence[str]) -> tuple[str, np.ndarray]:
            return self.worker.predict_proba(entry, texts)

        def next_token_probs(self, entry: ShardEntry, sequences: list) -> tuple[str, np.ndarray]:
            return self.worker.next_token_probs(entry, sequences)

    return ShardActor


def actor_scope(store: Store, run: str) -> str:
    """What every actor name of `run` starts with: the run and a tag of its store. Actors
    are found by name (get_if_exists), so without the store two runs of one name in two
    stores on one cluster (a long-lived cluster, `serve`) would share actors: one store's
    deletion applied through the other's coordinator."""
    from core.keys import sha256_hex

    return f"{run}@{sha256_hex(store.uri.encode())[:10]}"


def coordinator_name(store: Store, run: str) -> str:
    return f"{actor_scope(store, run)}/coordinator"


class RayExecutor:
    """Runs each shard's jobs in that shard's actor, all shards in parallel.

    Actors are named `<run>@<store tag>/<config digest>/shard-<k>` in the `unlearn` namespace and
    reused by later commands of the same Ray session (a long-lived cluster keeps its
    models loaded)."""

    def __init__(self, store: Store, run: str, config: SisaConfig, actor_cpus: float | None = None,
                 progress: bool = False, share_base: bool = True, actor_gpus: float | None = None):
        import ray

        self.store, self.run, self.config, self.progress = store, run, config, progress
        self.share_base = share_base
        self._shared_ref = None
        nodes = node_resources()[1] or [ray.cluster_resources()]
        gpu_nodes = [n for n in nodes if n.get("GPU", 0.0) > 0]
        if actor_cpus is None:  # a cuda run's actors go where GPUs are: count those nodes' CPUs
            on = gpu_nodes if config.device != "cpu" and gpu_nodes else nodes
            actor_cpus = actor_share([n.get("CPU", 0.0) for n in on] or [1.0], config.shards)
        self.actor_cpus = actor_cpus
        self.actor_gpus = actor_gpus_for(config, [n.get("GPU", 0.0) for n in nodes], actor_gpus)
        self._actors: dict[int, object] = {}
        # a coordinator actor is threaded (answers while it applies): two threads creating
        # one actor would drop a handle (Ray then destroys the actor), and two threads
        # importing transformers at once break its lazy imports
        self._lock = threading.RLock()

    def _shared(self) -> list:
        """The frozen base weights, loaded once here and put once into the object store;
        every shard actor on a node maps the same copy (zero-copy, read-only)."""
        import ray

        from sisa.shard import base_weights

        if not self.share_base or self.config.model in ("tiny", "tiny-lm"):
            return []  # the test models are built from a seed in each process, never loaded
        with self._lock:
            if self._shared_ref is None:
                self._shared_ref = ray.put(base_weights(self.config))
            return [self._shared_ref]

    def _name(self, shard: int) -> str:
        return f"{actor_scope(self.store, self.run)}/{self.config.digest()[:12]}/shard-{shard}"

    def _ensure(self, shards: Sequence[int]) -> None:
        with self._lock:
            ensure_fits([self._name(k) for k in shards if k not in self._actors], self.actor_cpus, self.actor_gpus)

    def actor(self, shard: int):
        with self._lock:
            return self._actor(shard)

    def _actor(self, shard: int):
        import ray

        if shard not in self._actors:
            name = self._name(shard)
            try:  # a live actor of this run keeps its model: no need to load and share weights again
                self._actors[shard] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                cls = _shard_actor_class()
                actor = cls.options(
                    name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=self.actor_cpus,
                    num_gpus=self.actor_gpus, scheduling_strategy=SPREAD,
                ).remote(self.store.uri, self.run, self.config.to_json())
                shared = self._shared()
                if shared:  # runs before any job this process sends (one caller's calls keep their order)
                    actor.share.remote(shared)
                self._actors[shard] = actor
        return self._actors[shard]

    def _gather(self, refs: list, desc: str) -> list:
        import ray
        from tqdm import tqdm

        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, unit="shard", file=sys.stderr, disable=None if self.progress else True,
                  leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return [ray_get(ref) for ref in refs]

    def train(self, jobs: Sequence[TrainJob]) -> list[ShardEntry]:
        self._ensure([j.shard for j in jobs])
        return self._gather([self.actor(j.shard).train.remote(j) for j in jobs], f"train {self.run}")

    def retrain(self, jobs: Sequence[RetrainJob]) -> list[ShardEntry]:
        self._ensure([j.entry.shard for j in jobs])
        return self._gather([self.actor(j.entry.shard).retrain.remote(j) for j in jobs], f"delete from {self.run}")

    def verify(self, entries: Sequence[ShardEntry]) -> list[dict]:
        self._ensure([e.shard for e in entries])
        return self._gather([self.actor(e.shard).verify.remote(e) for e in entries], f"verify {self.run}")

    def predict(self, entries: Sequence[ShardEntry], texts: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        return self._gather(self._predict_refs(entries, texts), "predict")

    def _predict_refs(self, entries: Sequence[ShardEntry], texts: Sequence[str]) -> list:
        """One predict call per entry's shard actor, the texts put into the object store once."""
        import ray

        self._ensure([e.shard for e in entries])
        texts_ref = ray.put(list(texts))
        return [self.actor(e.shard).predict.remote(e, texts_ref) for e in entries]

    def predict_available(self, entries: Sequence[ShardEntry], texts: Sequence[str],
                          poll_s: float = 0.5) -> list[tuple[str, np.ndarray] | None]:
        """`predict`, for serving: a shard whose actor Ray is restarting (its node was lost,
        or it crashed) is answered None instead of waited for; the ensemble answers from
        the others meanwhile. A shard that is only slow (a cold model, a long batch, an
        actor still being created for the first time) is waited for: only Ray's own word
        that the actor is restarting leaves it out. Until Ray notices a lost node (its
        health checks, seconds), calls to it just wait. A dead actor is not left out: its
        call fails, as `predict`'s does. The call left behind is cancelled, so a long outage
        under load does not pile up stale predictions for the actor's return."""
        import ray

        refs = self._predict_refs(entries, texts)
        out: list = [None] * len(refs)
        pending = {ref: i for i, ref in enumerate(refs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_s)
            for ref in done:
                out[pending.pop(ref)] = ray_get(ref)
            for ref, i in list(pending.items()):
                if actor_state(self.actor(entries[i].shard)) in UNAVAILABLE_STATES:
                    del pending[ref]  # its answer is not used
                    try:
                        ray.cancel(ref)  # not run when the actor is back (Ray retries actor tasks)
                    except Exception:
                        pass
        return out

    def next_token_probs(self, entries: Sequence[ShardEntry], sequences: Sequence[list[int]]) -> list[tuple[str, np.ndarray]]:
        """One generation step: every entry's shard actor at once."""
        import ray

        self._ensure([e.shard for e in entries])
        ref = ray.put([list(s) for s in sequences])
        return [ray_get(r) for r in [self.actor(e.shard).next_token_probs.remote(e, ref) for e in entries]]


# Ray's actor states that leave a shard out of a prediction: the actor existed and Ray is
# bringing it back (a crash, a lost node). Not PENDING_CREATION / DEPENDENCIES_UNREADY: a
# shard actor being created for the first time (a server just started) is waited for, or
# the first answers would silently come from part of the ensemble. Not DEAD: its call fails.
UNAVAILABLE_STATES = frozenset({"RESTARTING"})


def actor_state(handle) -> str:
    """Ray's state of an actor ("ALIVE", "RESTARTING", "DEAD", ...) from the GCS, in about a
    millisecond; "ALIVE" where Ray's (non-public) actor table cannot say."""
    try:
        from ray._private.state import state

        return str(state.actor_table(handle._actor_id.hex()).get("State", "ALIVE"))
    except Exception:
        return "ALIVE"


def actor_gpus_for(config: SisaConfig, cluster_gpus: float | Sequence[float], requested: float | None) -> float:
    """GPUs reserved per shard actor: none for a CPU run; for a `cuda` run the requested
    share, by default an equal share of the GPUs (at most one per actor). `cluster_gpus`
    is one amount, or one per node: an actor's share must fit on one node (two nodes of one
    GPU hold three actors of 0.5, not of 0.6666). Ray places an actor only where its GPU
    share fits, and hands it CUDA_VISIBLE_DEVICES."""
    if config.device == "cpu":
        if requested:
            raise UnlearnError(f"--actor-gpus {requested:g}: this run trains on the CPU; "
                               f"train it with --device cuda to use GPUs")
        return 0.0
    nodes = [float(cluster_gpus)] if isinstance(cluster_gpus, (int, float)) else [float(g) for g in cluster_gpus]
    if sum(nodes) <= 0:
        raise UnlearnError("this run trains on device cuda, but the Ray cluster has no GPUs")
    gpus = requested if requested is not None else actor_share(nodes, config.shards)
    most = max(nodes)
    if not 0 < gpus <= most:
        where = f"the cluster's {most:g} GPUs" if len(nodes) == 1 else f"the {most:g} GPUs of the largest node"
        raise UnlearnError(f"--actor-gpus {gpus:g}: must be > 0 and at most {where}")
    return gpus


def _partition_actor_class():
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=-1)
    class PartitionActor:
        """One ERASE cluster partition p: the divide-and-conquer leaves "<group>/p" of every
        group (one group, or one per label): their records' fixed-point embeddings and
        quantized k-means states, in memory. Light: numpy only, no model. After a restart
        it holds nothing; the next command reloads it from the store."""

        def __init__(self):
            self.parts: dict[str, object] = {}  # partition key "<group>/<p>" -> Partition

        def call(self, key: str, method: str, args: tuple):
            from erase.partition import apply_call

            self.parts[key], result = apply_call(self.parts.get(key), method, args)
            return result

    return PartitionActor


class RayPartitionPool:
    """ERASE's PartitionPool over Ray: one named actor per partition p (holding that leaf
    of every group), calls in parallel.

    Actors are named `<run>@<store tag>/erase/<config digest>/p<p>`; results are small (outputs,
    candidates, deltas), the points never leave their actor except to be stored."""

    def __init__(self, scope: str, config_digest: str, actor_cpus: float):
        self.prefix = f"{scope}/erase/{config_digest[:12]}"
        self.actor_cpus = actor_cpus
        self._actors: dict[str, object] = {}

    def actor(self, key: str):
        p = key.rsplit("/", 1)[1]
        if p not in self._actors:
            cls = _partition_actor_class()
            self._actors[p] = cls.options(name=f"{self.prefix}/p{p}", namespace=NAMESPACE, get_if_exists=True,
                                          num_cpus=self.actor_cpus, scheduling_strategy=SPREAD).remote()
        return self._actors[p]

    def call(self, calls: dict) -> dict:
        new = sorted({key.rsplit("/", 1)[1] for key in calls} - set(self._actors))
        ensure_fits([f"{self.prefix}/p{p}" for p in new], self.actor_cpus)
        refs = {key: self.actor(key).call.remote(key, method, args) for key, (method, args) in calls.items()}
        return {key: ray_get(ref) for key, ref in refs.items()}


def erase_pool(store: Store, run: str, config, actor_cpus: float | None = None) -> RayPartitionPool:
    """The Ray pool for an ERASE run's partitions (Ray must be initialised)."""

    if actor_cpus is None:  # half the cluster at most: the in-context actors take the other half
        actor_cpus = actor_share([c / 2 for c in node_cpus()], config.partitions, cap=0.5)
    return RayPartitionPool(actor_scope(store, run), config.digest(), actor_cpus)


def _icl_actor_class():
    import ray

    @ray.remote(max_restarts=-1, max_task_retries=-1)
    class InContextActor:
        """Holds the frozen language model and answers batches of queries; the key/value
        cache of the example prefix is computed once per prompt and reused."""

        def __init__(self, lm: str, labels: list[str]):
            from erase.icl import InContextClassifier

            self.clf = InContextClassifier(lm=lm, labels=labels)

        def predict(self, examples: list, texts: list, calibrate: bool) -> np.ndarray:
            return self.clf.predict_proba([tuple(e) for e in examples], texts, calibrate=calibrate)

    return InContextActor


class InContextServer:
    """Spreads ERASE queries over a few in-context actors, each with the model loaded once."""

    def __init__(self, run: str, lm: str, labels: Sequence[str], actors: int | None = None,
                 actor_cpus: float | None = None):

        nodes = node_cpus()
        n = actors or max(1, min(4, int(sum(nodes))))
        # half of each node at most, so that partition actors (the other half) can run beside them
        self.actor_cpus = actor_cpus if actor_cpus is not None else actor_share([c / 2 for c in nodes], n, cap=0.5)
        cls = _icl_actor_class()
        names = [f"{run}/icl/{lm.replace('/', '_')}/{i}" for i in range(n)]
        ensure_fits(names, self.actor_cpus)
        self.actors = [cls.options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                   num_cpus=self.actor_cpus, scheduling_strategy=SPREAD).remote(lm, list(labels)) for name in names]

    def predict_proba(self, examples: Sequence[tuple[str, str]], texts: Sequence[str],
                      calibrate: bool = True) -> np.ndarray:
        import ray

        if not texts:
            return np.zeros((0, 0))
        examples_ref = ray.put([list(e) for e in examples])
        chunks = np.array_split(np.arange(len(texts)), min(len(self.actors), len(texts)))
        refs = [a.predict.remote(examples_ref, [texts[i] for i in idx], calibrate)
                for a, idx in zip(self.actors, chunks)]
        return np.concatenate([ray_get(r) for r in refs], axis=0)


class InContextAnswers:
    """ERASE answers from in-context actors, as `serve(manifest, texts, exclude)` for the
    quarantine guard; the examples' texts are read from the store once per prompt."""

    def __init__(self, store: Store):
        self.store = store
        self.server = None
        self._examples: dict = {}

    def __call__(self, manifest, texts: list[str], exclude: list[str]) -> dict:
        from erase.run import format_predictions

        probs, used = self.probabilities(manifest, texts, exclude)
        return format_predictions(manifest.config.labels, texts, probs, manifest.selected_ids, exclude)

    def probabilities(self, manifest, texts: Sequence[str], exclude: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        from erase.run import EraseRun

        if self.server is None:
            self.server = InContextServer(manifest.run, manifest.config.lm, manifest.config.labels)
        key = (manifest.digest, tuple(exclude))
        if key not in self._examples:
            self._examples = {key: EraseRun(self.store, manifest).examples(exclude)}
        probs = self.server.predict_proba(self._examples[key], list(texts), manifest.config.calibrate)
        return probs, [i for i in manifest.selected_ids if i not in set(exclude)]


def ray_get(ref):
    """ray.get that turns an UnlearnError raised in an actor back into a one-line UnlearnError."""
    import ray

    try:
        return ray.get(ref)
    except UnlearnError as exc:  # Ray re-raises it as a subclass carrying the remote traceback
        # keep the project's own class (IntegrityError is permanent, the rest transient)
        cls = next((c for c in type(exc).__mro__ if issubclass(c, UnlearnError) and c.__module__.split(".")[0]
                    in ("core", "sisa", "erase", "cluster")), UnlearnError)
        raise cls(one_line(exc)) from None


GENERATIONS_AT_ONCE = 4  # per coordinator; more wait their turn


def _coordinator_actor_class():
    import ray

    # generations run in a group of their own: long ones can never hold the threads that
    # acknowledge deletions, answer /predict and report requests
    @ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=32, num_cpus=0,
                concurrency_groups={"generate": GENERATIONS_AT_ONCE})
    class CoordinatorActor:
        """A run's coordinator as a named actor: it owns the request log and routing, applies
        batches in a background thread, and answers ensemble predictions meanwhile. On a
        restart its constructor replays the pending requests from the log."""

        def __init__(self, store_uri: str, run: str, window_s: float, actor_cpus: float | None):

            from cluster.coordinator import Coordinator, CoordinatorLoop
            from core.stored_run import run_method

            store = open_store(store_uri)
            self.store, self.run_name = store, run
            # what this incarnation was built for: a run dropped and trained again under the
            # same name (another config) must not be served or applied with this one's
            self.identity = run_identity(store, run)
            self.method = run_method(store, run)
            if self.method == "erase":
                from erase.run import EraseRun

                # one long-lived run object: its clustering state stays loaded in the partition actors
                self.run = EraseRun.open(store, run)
                self.run.pool = erase_pool(store, run, self.run.config, actor_cpus)
                self.answers = InContextAnswers(store)
                factory = lambda: self._current(self.run)  # noqa: E731
            else:
                from sisa.run import SisaRun

                config = SisaRun.read_head(store, run).config
                self.executor = RayExecutor(store, run, config, actor_cpus=actor_cpus)
                factory = lambda: self._current(SisaRun.open(store, run, self.executor))  # noqa: E731
            # a restarted incarnation finds the lock of the one that died (a dead process on
            # this machine, or a silent heartbeat elsewhere) and takes it over
            self.coordinator = Coordinator(store, run, run_factory=factory, window_s=window_s)
            self.loop = CoordinatorLoop(self.coordinator)

        def _current(self, run):
            """`run`, if it is still the run this coordinator was built for; else a transient
            error (the request stays queued; the next command replaces this actor)."""
            if run_identity(self.store, self.run_name) != self.identity:
                raise UnlearnError(f"run {self.run_name} was trained again since its coordinator started; "
                                   f"the next command replaces the coordinator")
            return run

        def pid(self) -> int:
            return os.getpid()

        def built_for(self) -> str:
            """The identity of the run this coordinator was built for (`run_identity`)."""
            return self.identity

        def warm(self, wait: bool = False) -> None:
            """Start every shard actor and load its model; without waiting (serve), or
            until every model is loaded (`unlearn up --run`)."""
            if self.method == "sisa":
                shards = range(self.executor.config.shards)
                self.executor._ensure(list(shards))
                refs = [self.executor.actor(k).warm.remote() for k in shards]
                if wait:
                    for ref in refs:
                        ray_get(ref)

        def warm_in_background(self) -> None:
            """Start every shard actor and load its model in a thread of this actor, and
            return at once: after a CLI delete on the cluster of `unlearn up` the next one
            finds its shard warm, whichever it is. A failure (no room on the cluster) is only
            logged: a later command creates what it needs, or says why it cannot."""
            def warm() -> None:
                try:
                    self.warm(wait=True)
                except Exception as exc:
                    print(f"unlearn: warning: run {self.run_name}: shard models not preloaded ({one_line(exc)})",
                          file=sys.stderr, flush=True)

            threading.Thread(target=warm, name="unlearn-warm", daemon=True).start()

        def submit(self, ids: list[str], owners: list[str], ignore_missing: bool = False) -> str:
            return self.coordinator.submit(ids, owners, ignore_missing)

        def submit_bulk(self, bulks: list) -> list:
            """Per bulk its request ids, or the exception that refused it (Coordinator.submit_bulk)."""
            return self.coordinator.submit_bulk(bulks)

        def get(self, request_id: str) -> dict:
            return self.coordinator.get(request_id).to_json()

        def log(self) -> list[dict]:
            return [r.to_json() for r in self.coordinator.log()]

        def pending(self) -> list[str]:
            return self.coordinator.pending()

        def busy(self) -> str | None:
            """Who holds the run lock while this coordinator waits for it (None: nobody)."""
            return self.coordinator.busy

        def errors(self) -> list[str]:
            return list(self.loop.errors)

        def requeue_failed(self) -> list[str]:
            return self.coordinator.requeue_failed()

        def crash_at(self, point: str | None) -> None:
            """Tests: exit at "after-commit" of the next batch (committed, receipts not written)."""
            self.coordinator.fault = point

        def quarantined(self) -> list:
            return self.coordinator.quarantined()

        @ray.method(concurrency_group="generate")
        def generate(self, prompts: list[str], max_new_tokens: int = 32, shard: int | None = None,
                     wait: bool = False) -> dict:
            if self.method == "erase":
                raise UnlearnError("an ERASE run classifies with a frozen LM; only SISA runs trained with "
                                   "--objective lm generate text")
            return self.coordinator.generate(prompts, self.executor.next_token_probs, max_new_tokens, shard, wait)

        def predict(self, texts: list[str], method: str = "vote", wait: bool = False) -> dict:
            if self.method == "erase":
                return self.coordinator.predict(texts, self.answers, method, wait)
            return self.coordinator.predict(texts, self.executor.predict_available, method, wait)

    return CoordinatorActor


def run_identity(store: Store, run: str) -> str:
    """What tells one training of `run` from another under the same name: its method,
    its configuration and the random salt of its first manifest (kept by every later
    commit, new on every train). A deletion changes none of them."""
    from core.keys import sha256_hex
    from core.stored_run import read_manifest_json

    _key, data = read_manifest_json(store, run)
    try:
        m = json.loads(data)
        return sha256_hex(json.dumps([m.get("method", "sisa"), m["config"], m["salt"]], sort_keys=True).encode())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnlearnError(f"run {run}: {store.uri}/{_key}: unreadable manifest") from None


def coordinator_actor(store: Store, run: str, window_s: float = 0.0, actor_cpus: float | None = None,
                      address: str | None = None, detached: bool = False):
    """The run's named coordinator actor, created if no live one exists in this Ray cluster
    (joined or started first, if this process has none yet: never Ray's own implicit start,
    which would bind no token, print Ray's logs and start its dashboard).

    `detached`: the actor (and the shard actors it owns) outlives this process, for the
    long-running cluster of `unlearn up`; by default it lives as long as this process. A
    live coordinator built for an earlier training of the run (dropped and trained again
    under the same name) is replaced, never used."""
    init_ray(address)
    handle = _get_or_create_coordinator(store, run, window_s, actor_cpus, detached)
    if ray_get(handle.built_for.remote()) != run_identity(store, run):
        _kill_coordinator(store, run, handle)
        handle = _get_or_create_coordinator(store, run, window_s, actor_cpus, detached)
    return handle


def _get_or_create_coordinator(store: Store, run: str, window_s: float, actor_cpus: float | None, detached: bool):
    cls = _coordinator_actor_class()
    options = {"lifetime": "detached"} if detached else {}
    # on the head: the shard actors it creates die with it (Ray's owner fate-sharing), so on
    # a worker node its loss would take every shard down, not only that node's; the head is
    # the cluster's one point of failure already (its GCS)
    return cls.options(name=coordinator_name(store, run), namespace=NAMESPACE, get_if_exists=True,
                       resources={HEAD_RESOURCE: RESOURCE_UNIT}, **options).remote(store.uri, run, window_s, actor_cpus)


def _kill_coordinator(store: Store, run: str, handle, timeout_s: float = 60.0) -> None:
    """Kill a coordinator (its shard actors, which it owns, go with it) and wait until its
    name is free, so that the next get-or-create makes a new one."""
    import time

    import ray

    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(coordinator_name(store, run), namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)
    raise UnlearnError(f"the old coordinator of run {run} did not stop within {timeout_s:.0f} s; try again")


def stop_coordinator(store: Store, run: str) -> bool:
    """Kill the run's coordinator on the joined cluster if one runs (`drop` on the cluster
    of `unlearn up`: a dropped run's warm actors must not hold its CPUs). True if one ran."""
    import ray

    try:
        handle = ray.get_actor(coordinator_name(store, run), namespace=NAMESPACE)
    except ValueError:
        return False
    _kill_coordinator(store, run, handle)
    return True


def coordinator_pid(store: Store, run: str) -> int | None:
    """The pid of the run's live coordinator on the joined cluster, None if none runs
    (found by name; never created)."""
    import ray

    try:
        handle = ray.get_actor(coordinator_name(store, run), namespace=NAMESPACE)
    except ValueError:
        return None
    return ray_get(handle.pid.remote())


def wait_request(handle, request_id: str, timeout_s: float = 24 * 3600.0, poll_s: float = 0.2,
                 on_busy=None) -> dict:
    """Poll the coordinator actor until the request is done or failed. `on_busy(who)` is
    called once if another process holds the run lock meanwhile (it applies the queue)."""
    import time

    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        req = ray_get(handle.get.remote(request_id))
        if req["status"] in ("done", "failed") or time.monotonic() > deadline:
            return req
        if on_busy is not None and not told:
            who = ray_get(handle.busy.remote())
            if who:
                on_busy(who)
                told = True
        time.sleep(poll_s)


def make_executor(runtime: str, store: Store, run: str, config: SisaConfig, progress: bool,
                  address: str | None = None, actor_cpus: float | None = None, actor_gpus: float | None = None):
    """None for the in-process engine, else a RayExecutor on a started or joined Ray."""
    if runtime == "local":
        return None
    if runtime != "ray":
        raise UnlearnError(f"--runtime {runtime!r}: choose ray or local")
    init_ray(address)
    return RayExecutor(store, run, config, actor_cpus=actor_cpus, progress=progress, actor_gpus=actor_gpus)
