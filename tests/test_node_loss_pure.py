"""Pure parts of serving through node loss and of per-node sizing (no Ray started): which
shards a prediction leaves out, and the GPU share of a shard actor on several nodes."""
from types import SimpleNamespace

import pytest


class _Ref:
    def __init__(self, shard):
        self.shard = shard


class _Actor:
    def __init__(self, shard):
        self.predict = SimpleNamespace(remote=lambda entry, texts: _Ref(shard))


def _executor(monkeypatch, states, ready_after):
    """A RayExecutor whose shard k answers after `ready_after[k]` polls (None: never) and
    whose actor is in `states[k](poll)`; returns (executor, cancelled refs)."""
    import ray

    from cluster import runtime

    polls = {"n": 0}
    cancelled = []

    def wait(refs, num_returns, timeout):
        polls["n"] += 1
        done = [r for r in refs if ready_after[r.shard] is not None and polls["n"] >= ready_after[r.shard]]
        return done, [r for r in refs if r not in done]

    monkeypatch.setattr(ray, "put", lambda x: x)
    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: cancelled.append(ref.shard))
    monkeypatch.setattr(runtime, "ray_get", lambda ref: (f"key{ref.shard}", ref.shard))
    monkeypatch.setattr(runtime, "actor_state", lambda handle: states[handle.shard](polls["n"]))
    ex = runtime.RayExecutor.__new__(runtime.RayExecutor)
    ex._ensure = lambda shards: None
    actors = {k: _Actor(k) for k in states}
    for k, a in actors.items():
        a.shard = k
    ex.actor = actors.__getitem__
    return ex, cancelled


def test_a_shard_actor_still_being_created_is_waited_for_not_left_out(monkeypatch):
    """Seen: right after `serve` started, a shard actor not yet created (PENDING_CREATION
    while its worker process starts) was taken for one Ray is restarting, and the first
    answers came from part of the ensemble with "unavailable"."""
    states = {0: lambda n: "ALIVE", 1: lambda n: "PENDING_CREATION" if n < 4 else "ALIVE",
              2: lambda n: "DEPENDENCIES_UNREADY" if n < 2 else "ALIVE"}
    ex, cancelled = _executor(monkeypatch, states, {0: 1, 1: 5, 2: 3})
    entries = [SimpleNamespace(shard=k) for k in (0, 1, 2)]
    assert ex.predict_available(entries, ["x"], poll_s=0) == [("key0", 0), ("key1", 1), ("key2", 2)]
    assert cancelled == []


def test_a_restarting_shard_is_left_out_and_its_call_cancelled(monkeypatch):
    """A shard whose actor Ray restarts (lost node) answers None, and its call is cancelled:
    Ray retries actor tasks (max_task_retries=-1), so a long outage under load would queue
    every abandoned prediction for the actor's return, and the shard would then look busy."""
    states = {0: lambda n: "ALIVE", 1: lambda n: "RESTARTING"}
    ex, cancelled = _executor(monkeypatch, states, {0: 2, 1: None})
    entries = [SimpleNamespace(shard=k) for k in (0, 1)]
    assert ex.predict_available(entries, ["x"], poll_s=0) == [("key0", 0), None]
    assert cancelled == [1]


def test_actor_state_says_alive_where_rays_private_table_cannot_answer(monkeypatch):
    from cluster.runtime import actor_state

    assert actor_state(object()) == "ALIVE"  # no _actor_id: Ray's table cannot be asked


def test_the_default_gpu_share_fits_on_the_nodes_not_only_in_their_sum(monkeypatch, tmp_path):
    """Seen: two nodes of one GPU and three cuda shards: the default share counted the
    cluster's 2 GPUs (0.6666 each), one node holds one such actor, the third never fits.
    And a cuda run's CPU share counted a GPU-less head's CPUs, which its actors never get."""
    import ray

    from cluster.runtime import RayExecutor, actor_gpus_for, actors_that_fit, fit_problem
    from core.errors import UnlearnError
    from core.store import LocalStore
    from sisa.config import SisaConfig

    cuda = SisaConfig(shards=3, extra={"device": "cuda"})
    assert actor_gpus_for(cuda, [1.0, 1.0], None) == 0.5 and actor_gpus_for(cuda, 2.0, None) == 0.6666
    with pytest.raises(UnlearnError, match="at most the 1 GPUs of the largest node"):
        actor_gpus_for(cuda, [1.0, 1.0], 1.5)
    nodes = [{"CPU": 16.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 20.0, "GPU": 2.0})
    monkeypatch.setattr("cluster.runtime.node_resources", lambda: (nodes, nodes))
    for shards in (2, 3, 4, 5):
        ex = RayExecutor(LocalStore(str(tmp_path)), "r", SisaConfig(shards=shards, extra={"device": "cuda"}))
        assert fit_problem(shards, ex.actor_cpus, ex.actor_gpus, nodes, nodes) is None, (shards, ex.actor_cpus,
                                                                                          ex.actor_gpus)
        assert actors_that_fit([1.0, 1.0], ex.actor_gpus) >= shards
    cpu = RayExecutor(LocalStore(str(tmp_path)), "r", SisaConfig(shards=4))
    assert cpu.actor_gpus == 0.0 and cpu.actor_cpus == 1.0  # a CPU run counts every node's CPUs
