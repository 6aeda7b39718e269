"""The Ray runtime: shard actors give the same bits as the in-process engine."""
import pytest

from conftest import synthetic_records
from sisa.config import SisaConfig
from sisa.run import SisaRun
from core.store import LocalStore

pytestmark = pytest.mark.integration

CFG = SisaConfig(shards=4, slices=3, model="tiny", epochs="2", batch_size=4, max_length=32, seed=3)


@pytest.mark.slow  # make test-all; tests/test_multinode.py deletes through Ray on three nodes against a from-scratch run
def test_ray_delete_retrains_one_shard_and_equals_from_scratch(ray_local, tmp_path):
    from cluster.runtime import RayExecutor

    records = synthetic_records(48, owners_every=1)
    store = LocalStore(str(tmp_path))
    config = SisaConfig.from_json({**CFG.to_json(), "labels": ["neg", "pos"]})
    executor = RayExecutor(store, "a", config)
    run = SisaRun.train(store, "a", records, config, executor=executor)
    layout = run.manifest.layout()
    victim = layout[2][1][0]
    before = [s.digest for s in run.manifest.shards]
    pids = {k: ray_local.get(executor.actor(k).pid.remote()) for k in range(4)}
    assert len(set(pids.values())) == 4  # one actor process per shard

    receipt = run.delete(ids=[victim])
    assert receipt.shards == [2] and receipt.stages_redone == {"2": [1, 2]}
    after = [s.digest for s in run.manifest.shards]
    assert [k for k in range(4) if before[k] != after[k]] == [2]

    fresh = SisaRun.train(LocalStore(str(tmp_path / "b")), "b", [r for r in records if r.id != victim], config)
    assert [s.digest for s in fresh.manifest.shards] == after
    assert run.verify()["exact"]  # verification through the actors too
    out = run.predict(["great fun", "dull and flat"])
    assert out["shards"] == [k for k in range(4) if run.manifest.shards[k].records]


def test_actors_that_cannot_fit_fail_with_one_line_instead_of_hanging(ray_local, tmp_path, monkeypatch):
    """Ray leaves an actor that does not fit pending forever; the runtime checks first."""
    from cluster.runtime import RayExecutor, RayPartitionPool
    from core.errors import UnlearnError

    records = synthetic_records(8)
    store = LocalStore(str(tmp_path))
    config = SisaConfig.from_json({**CFG.to_json(), "labels": ["neg", "pos"], "shards": 2})
    executor = RayExecutor(store, "huge", config, actor_cpus=64)
    monkeypatch.setattr("cluster.runtime.ensure_fits.__defaults__", (0.0, 1.0))  # wait 1 s, not 60
    with pytest.raises(UnlearnError, match=r"2 new actors x 64 CPUs do not fit in the Ray cluster's free"):
        SisaRun.train(store, "huge", records, config, executor=executor)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    pool = RayPartitionPool("huge", "0" * 12, actor_cpus=64)
    with pytest.raises(UnlearnError, match=r"1 new actors x 64 CPUs do not fit"):
        pool.call({"all/0": ("ids", ())})


def test_project_errors_raised_in_an_actor_keep_their_class_and_one_line(ray_local):
    """Seen in review: ray_get looked for the error's class in sisa/erase/cluster only, after
    the errors moved to core; every error from an actor became a bare StopIteration (a
    traceback, and the quarantine's retry on ObjectMissing never ran)."""
    from cluster.runtime import ray_get
    from core.errors import IntegrityError, ObjectMissing, UnlearnError

    @ray_local.remote
    def fail(kind: str):
        from core.errors import IntegrityError, ObjectMissing, UnlearnError

        raise {"plain": UnlearnError, "missing": ObjectMissing, "damaged": IntegrityError}[kind](f"{kind}: it broke")

    for kind, cls in (("plain", UnlearnError), ("missing", ObjectMissing), ("damaged", IntegrityError)):
        with pytest.raises(cls) as exc:
            ray_get(fail.remote(kind))
        assert type(exc.value) is cls and str(exc.value) == f"{kind}: it broke", (kind, type(exc.value), exc.value)


def test_actor_names_tell_stores_apart(tmp_path):
    """Two runs of one name in two stores on one cluster must never share an actor (a
    deletion sent to store B's run would go through store A's coordinator)."""
    from cluster.runtime import RayExecutor, actor_scope, coordinator_name
    from core.store import LocalStore
    from sisa.config import SisaConfig

    a, b = LocalStore(str(tmp_path / "a")), LocalStore(str(tmp_path / "b"))
    assert actor_scope(a, "r") != actor_scope(b, "r") and coordinator_name(a, "r") != coordinator_name(b, "r")
    assert actor_scope(a, "r") == actor_scope(LocalStore(str(tmp_path / "a")), "r")  # stable
    config = SisaConfig(shards=2, slices=1, model="tiny", labels=("a", "b"))
    shard = RayExecutor.__new__(RayExecutor)  # the naming alone, no cluster needed
    names = []
    for store in (a, b):
        shard.store, shard.run, shard.config = store, "r", config
        names.append(shard._name(0))
    assert names[0] != names[1] and names[0].endswith("/shard-0")
