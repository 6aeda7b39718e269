"""Attacks on the group commit of deletion requests (review of c0c8099): crashes at the
worst moments of a group's rewrite, many writers at once, the leader hand-off, a run trained
again under a live coordinator, damaged groups."""
import json
import random
import shutil
import threading
import time

import pytest

from cluster.coordinator import Coordinator
from cluster.requestlog import DeletionRequest, RequestLog
from conftest import synthetic_records
from core.errors import UnlearnError
from core.store import LocalStore
from sisa.config import SisaConfig
from sisa.run import SisaRun

CFG = SisaConfig(shards=3, slices=2, model="tiny", batch_size=4, max_length=32)


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs in the process that raised it."""


class Versioned(LocalStore):
    """A LocalStore that keeps every overwritten version of a key (as a versioned bucket
    does) until `prune_versions` or `delete` purges it; `crash_at(pred)` raises Crash
    the first time pred(op, key) holds."""

    def __init__(self, root: str):
        super().__init__(root)
        self.old: dict[str, list[bytes]] = {}
        self._crash = None

    def crash_at(self, pred):
        self._crash = pred

    def _maybe_crash(self, op, key):
        if self._crash is not None and self._crash(op, key):
            self._crash = None
            raise Crash(f"{op} {key}")

    def put(self, key, data):
        self._maybe_crash("put", key)
        try:
            self.old.setdefault(key, []).append(super().get(key))
        except KeyError:
            pass
        super().put(key, data)

    def prune_versions(self, key):
        self._maybe_crash("prune", key)
        self.old.pop(key, None)

    def delete(self, key):
        self._maybe_crash("delete", key)
        self.old.pop(key, None)
        super().delete(key)

    def every_version(self, prefix: str) -> list[bytes]:
        out = [v for k, vs in self.old.items() if k.startswith(prefix) for v in vs]
        return out + [self.get(k) for k in self.list(prefix)]


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gca")
    SisaRun.train(LocalStore(str(root / "s")), "r", synthetic_records(40, owners_every=1), CFG)
    return root / "s"


@pytest.fixture
def store(trained_root, tmp_path):
    shutil.copytree(trained_root, tmp_path / "s")
    return Versioned(str(tmp_path / "s"))


def _req(i: int, now: int, **kw) -> DeletionRequest:
    return DeletionRequest(request_id=f"{now + i:020d}-0000000{i}", accepted="2026-01-01T00:00:00+00:00",
                           ids=[f"r{i:04d}"], units=[0], requested={"ids": 1, "owners": 0}, **kw)

def a_failed_and_an_applying_request(store):
    """(log, queue key, the failed request, the applying one): one group of two, the second
    being applied, as a lock holder leaves it just before its rewrite and prune."""
    log = RequestLog(store, "r")
    now = time.time_ns()
    failed, done = _req(1, now, status="failed"), _req(2, now)
    key = log.queue_key(log.append([failed, done]))
    done.status = "applying"
    log.update([done])
    return log, key, failed, done



# -- 1. kill -9 at the worst moments ------------------------------------------------------

def test_a_crash_between_a_groups_rewrite_and_its_prune_leaves_no_version_naming_a_done_request(store):
    """finish(): receipt, then the group is rewritten without the request, then its older
    versions (which name the request's ids) are pruned. Killed between the rewrite and the
    prune, the next lock holder sees nothing to drop (the current version no longer holds
    the request) and, when what is left of the group is a failed request, nothing is due:
    the deleted request's ids stayed in an older version of the queue object."""
    log, key, failed, done = a_failed_and_an_applying_request(store)
    store.crash_at(lambda op, k: op == "prune" and k == key and len(log.queued()[0]) == 1)
    with pytest.raises(Crash):
        log.finish([done])
    assert [r.request_id for r in log.queued()[0]] == [failed.request_id]
    # the next lock holders: a coordinator's batch (nothing due), then `unlearn resume`
    coord = Coordinator(store, "r")
    coord.apply_due()
    coord.sweep()
    leaked = [v for v in store.every_version("r/queue/") if b"r0002" in v]
    assert leaked == [], "an older version of the queue group still names the finished request"


def test_a_crash_between_receipts_and_the_group_rewrite_is_cleaned_up_by_the_next_holder(store):
    coord = Coordinator(store, "r", window_s=0)
    (ids,) = coord.submit_bulk([[([f"r{i:04d}"], [], False) for i in range(3)]])
    key = RequestLog(store, "r").queued_keys()[0]
    store.crash_at(lambda op, k: op in ("put", "delete") and k == key and
                   len(RequestLog(store, "r").receipt_keys()) == 3)
    with pytest.raises(Crash):
        coord.apply_due()
    assert RequestLog(store, "r").queued_keys() == [key]  # receipts written, group not yet dropped
    again = Coordinator(store, "r")
    assert again.apply_due() == []  # nothing applied a second time
    assert RequestLog(store, "r").queued_keys() == []
    assert all(again.get(i).status == "done" for i in ids)
    assert not any(b"r000" in v for v in store.every_version("r/queue/"))


def test_a_crash_in_drop_queued_of_a_group_holding_others_loses_none_and_applies_the_rest(store):
    """The holder finishes one request of a group while another of it stays queued, and is
    killed in the middle of the rewrite (before the put, after it)."""
    for where in ("put", "prune"):
        log = RequestLog(store, "r")
        now = time.time_ns()
        a, b = _req(5, now, status="done"), _req(6, now)
        key = log.queue_key(log.append([a, b]))
        store.crash_at(lambda op, k: op == where and k == key)
        with pytest.raises(Crash):
            log.finish([a])
        coord = Coordinator(store, "r")
        done = coord.apply_due()
        assert [r.request_id for r in done] == [b.request_id]
        assert coord.get(a.request_id).status == "done" and coord.get(b.request_id).status == "done"
        assert log.queued_keys() == []
        assert not [v for v in store.every_version("r/queue/") if b"r0005" in v or b"r0006" in v]


# -- 2./3. many writers, the leader hand-off ----------------------------------------------

def test_many_threads_bulks_and_failing_writes_never_hang_and_every_acknowledged_id_is_durable(store, monkeypatch):
    import cluster.coordinator as coordinator

    monkeypatch.setattr(coordinator, "MAX_GROUP", 4)
    coord = Coordinator(store, "r", window_s=3600)
    rng = random.Random(7)
    real_put = Versioned.put

    def flaky(self, key, data):
        if "/queue/" in key and rng.random() < 0.2:
            raise OSError("store timeout")
        real_put(self, key, data)

    monkeypatch.setattr(Versioned, "put", flaky)
    results = []
    lock = threading.Lock()

    def worker(seed):
        r = random.Random(seed)
        for _ in range(6):
            bulks = []
            for _ in range(r.randint(1, 3)):
                bulk = [([f"r{r.randrange(40):04d}"], [], False) for _ in range(r.randint(1, 6))]
                if r.random() < 0.2:
                    bulk.append((["nope"], [], False))
                bulks.append(bulk)
            out = coord.submit_bulk(bulks)
            with lock:
                results.extend(zip(bulks, out))

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a submitter hangs"
    monkeypatch.setattr(Versioned, "put", real_put)
    acked = [i for bulk, out in results if isinstance(out, list) for i in out]
    for bulk, out in results:
        if any(ids == ["nope"] for ids, _o, _m in bulk):
            assert isinstance(out, BaseException)
        if isinstance(out, list):
            assert len(out) == len(bulk)
    assert acked and len(set(acked)) == len(acked)
    for rid in acked:
        assert coord.get(rid).status == "pending"
    done = Coordinator(store, "r").apply_due()
    finished = {r.request_id for r in done}
    assert set(acked) <= finished
    assert coord.submit(ids=["r0001"])  # the front door still works


def test_an_empty_bulk_is_refused_not_answered_with_nothing(store):
    coord = Coordinator(store, "r", window_s=3600)
    out = coord.submit_bulk([[], [(["r0001"], [], False)]])
    assert isinstance(out[0], UnlearnError), out
    assert isinstance(out[1], list)


def test_a_hostile_request_in_process_fails_alone(store):
    """A request whose ids are not strings (the in-process API has no HTTP validation in
    front) must not fail the other callers' requests written in the same group."""
    coord = Coordinator(store, "r", window_s=3600)
    out = coord.submit_bulk([[([["x"]], [], False)], [(["r0001"], [], False)]])
    assert isinstance(out[1], list), out


# -- 4. a run trained again under a live coordinator --------------------------------------

def test_a_run_dropped_and_trained_again_with_another_layout_quarantines_the_new_shard(store):
    coord = Coordinator(store, "r", window_s=3600)
    coord.submit(ids=["r0001"])  # the intake caches the run at this HEAD
    SisaRun.drop(store, "r")
    cfg = SisaConfig(shards=2, slices=1, model="tiny", batch_size=4, max_length=32, seed=11)
    SisaRun.train(store, "r", synthetic_records(40, owners_every=1), cfg)
    fresh = SisaRun.open(store, "r")
    for i in range(40):
        rid = coord.submit(ids=[f"r{i:04d}"])
        assert coord.get(rid).units == fresh.units_of([f"r{i:04d}"])


# -- 5. damaged groups ----------------------------------------------------------------------

def _write_raw(store, key, body: dict):
    from core.keys import sha256_hex
    from cluster.requestlog import _canonical

    store.put(key, json.dumps({**body, "check": sha256_hex(_canonical(body))}).encode())


@pytest.mark.parametrize("damage", ["bitflip", "other-name", "twice", "truncated"])
def test_a_damaged_group_is_never_applied_withholds_everything_and_is_discarded(store, damage):
    coord = Coordinator(store, "r", window_s=3600)
    (ids,) = coord.submit_bulk([[([f"r{i:04d}"], [], False) for i in range(3)]])
    key = RequestLog(store, "r").queued_keys()[0]
    data = store.get(key)
    if damage == "bitflip":
        store.put(key, data.replace(b'"r0001"', b'"r0002"', 1))
    elif damage == "truncated":
        store.put(key, data[: len(data) // 2])
    else:
        d = json.loads(data)
        d.pop("check")
        if damage == "other-name":
            d["group"] = ids[1]
        else:
            d["requests"].append(d["requests"][0])
        _write_raw(store, key, d)
    coord.quarantine.read()
    assert coord.quarantine.damaged
    other = Coordinator(store, "r")
    assert other.apply_due() == []
    manifest = SisaRun.open(store, "r").manifest
    assert {"r0000", "r0001", "r0002"} <= set(manifest.owners())  # nothing of it applied
    with pytest.raises(UnlearnError):
        coord.get(ids[0])
    assert other.discard_damaged() == [key]
    assert RequestLog(store, "r").queued_keys() == []
    coord.quarantine.read()
    assert not coord.quarantine.damaged


# -- 2. two submitting processes and an applier, each killed -9 at random --------------------

SUBMITTER = r"""
import json, random, sys, threading, time
from cluster.coordinator import Coordinator
from core.store import LocalStore
store, seed = LocalStore(sys.argv[1]), int(sys.argv[2])
coord = Coordinator(store, "r", window_s=3600)
out = open(sys.argv[3], "a", buffering=1)
def one(t):
    r = random.Random(seed * 100 + t)
    end = time.time() + 10
    while time.time() < end:
        ids = [f"r{r.randrange(40):04d}" for _ in range(r.randint(1, 2))]
        if r.random() < 0.3:
            got = coord.submit_bulk([[(ids, [], False), ([f"r{r.randrange(40):04d}"], [], False)]])[0]
        else:
            try:
                got = [coord.submit(ids=ids)]
            except Exception as exc:
                got = exc
        if isinstance(got, list):
            out.write(json.dumps(got) + "\n")  # acknowledged: printed once durable
        time.sleep(0.1)
threads = [threading.Thread(target=one, args=(t,)) for t in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
print("finished", coord.groups_written, file=sys.stderr)
"""

APPLIER = r"""
import sys, time
from cluster.coordinator import Coordinator
from core.store import LocalStore
coord = Coordinator(LocalStore(sys.argv[1]), "r", window_s=0)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        coord.apply_due()
    except Exception as exc:
        print("applier:", exc, file=sys.stderr)
    time.sleep(0.05)
"""


def test_two_submitting_processes_and_an_applier_killed_at_random_lose_nothing_acknowledged(trained_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root = tmp_path / "s"
    shutil.copytree(trained_root, root)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    acks = tmp_path / "acks.jsonl"
    rng = random.Random(3)
    subs = [subprocess.Popen([sys.executable, "-c", SUBMITTER, str(root), str(s), str(acks)], env=env,
                             stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    applier = subprocess.Popen([sys.executable, "-c", APPLIER, str(root), "600"], env=env)
    time.sleep(rng.uniform(6, 9))  # imports (~5 s), then submitting and applying
    subs[1].send_signal(signal.SIGKILL)  # a submitter killed in the middle of its group commits
    applier.send_signal(signal.SIGKILL)  # and the applier, in a batch or between two
    subs[0].wait(180)
    subs[1].wait(10)
    assert subs[0].returncode == 0, subs[0].stderr.read()
    store = LocalStore(str(root))
    coord = Coordinator(store, "r", window_s=0)
    for _ in range(20):  # the next holder takes the dead applier's lock over and applies the rest
        coord.apply_due()
        if not coord.pending():
            break
    assert coord.pending() == []
    acked = [i for line in acks.read_text().splitlines() if line.endswith("]") for i in json.loads(line)]
    assert len(acked) > 20 and subs[1].returncode == -signal.SIGKILL
    log = {r.request_id: r for r in coord.log()}  # one read of everything (a get each is slow once compacted)
    assert not coord.problems
    for rid in acked:
        assert log[rid].status == "done", rid
        assert log[rid].records_deleted + log[rid].already_deleted_count >= 1, rid
    took_over = sum(any("took over the run lock" in w for w in log[r].warnings) for r in acked)
    print(f"acked {len(acked)}, applied after a takeover: {took_over}")
    for rid in rng.sample(acked, 10):  # and by `get`, wherever it is (receipt or day index)
        assert coord.get(rid).status == "done"
    assert store.list("r/queue/") == []


# -- 6. hostile bulk bodies: nothing of a bad bulk is accepted --------------------------------

@pytest.mark.parametrize("body", [
    {"requests": [{"ids": ["r1"]}, {"ids": ["r2"], "ignore_missing": "yes"}]},
    {"requests": [{"ids": ["r1"]}, {"ids": ["r2"], "ignore_missing": 1}]},
    {"requests": [{"ids": ["r1"]}, {"requests": [{"ids": ["r2"]}]}]},
    {"requests": [{"ids": ["r1"]}, {"ids": [["r2"]]}]},
    {"requests": [{"ids": ["r1"]}, {"ids": [None]}]},
    {"requests": [{"ids": ["r1"]}, {"ids": []}]},
    {"requests": [{"ids": ["r1"]}, {}]},
    {"requests": [{"ids": ["r1"]}, {"ids": "r2"}]},
    {"requests": [{"ids": ["r1"]}, {"owners": [""]}]},
    {"requests": [{"ids": ["r1"]}, {"ids": ["x" * 100_000]}]},
    {"requests": [{"ids": ["r1"]}, {"ids": ["r\u0000"]}]},
    {"requests": [{"ids": ["r1"]}] * 1001},
    {"requests": [{"ids": [f"r{i}" for i in range(5000)]}, {"ids": [f"s{i}" for i in range(5001)]}]},
    {"requests": [{"ids": [f"r{i}" for i in range(10_001)]}]},
    {"requests": None},
    {"requests": "r1"},
    {"requests": [{"ids": ["r1"]}], "wait": True},
    {"requests": [[{"ids": ["r1"]}]]},
])
def test_a_hostile_bulk_is_refused_whole(body):
    from cluster.http_api import HttpError, parse_body

    with pytest.raises(HttpError) as exc:
        parse_body("delete", json.dumps(body).encode())
    assert exc.value.status == 400 and len(exc.value.message) <= 1000


def test_a_bulk_body_nested_too_deep_or_with_a_field_twice_is_refused():
    from cluster.http_api import HttpError, parse_body

    deep = b'{"requests": [{"ids": ["r1"]}, ' + b"[" * 40 + b"]" * 40 + b"]}"
    twice = b'{"requests": [{"ids": ["r1"], "ids": ["r2"]}]}'
    for raw in (deep, twice, b'{"requests": [{"ids": ["r1"]}], "requests": [{"ids": ["r2"]}]}'):
        with pytest.raises(HttpError):
            parse_body("delete", raw)


@pytest.mark.integration
def test_a_crash_before_a_groups_prune_on_seaweedfs_leaves_no_version_once_the_next_holder_ran(
        trained_root, seaweedfs, s3_bucket):
    """As the first test of this file, on a real versioned bucket."""
    from core.store import open_store
    from test_store import all_versions

    store = open_store(f"s3://{s3_bucket}/p")
    local = LocalStore(str(trained_root))
    for key in local.list("r/"):
        if "/ckpt/" not in key:  # the queue, the lock and the manifest are what this needs
            store.put(key, local.get(key))
    log, key, failed, done = a_failed_and_an_applying_request(store)
    real = store.prune_versions

    def crash(k):
        if k == key:
            raise Crash(k)
        real(k)

    store.prune_versions = crash
    done.status = "done"
    with pytest.raises(Crash):
        log.finish([done])
    store.prune_versions = real
    client = seaweedfs.client()

    def bodies():
        return [client.get_object(Bucket=s3_bucket, Key=k, VersionId=v)["Body"].read()
                for k, v in all_versions(client, s3_bucket) if "/queue/" in k]

    assert any(b"r0002" in b for b in bodies())  # the crash left a version naming it
    coord = Coordinator(store, "r")
    assert coord.apply_due() == []  # nothing due: the failed request waits for --retry-failed
    assert coord.sweep()  # `unlearn resume`
    assert not any(b"r0002" in b for b in bodies())
    assert [r.request_id for r in log.queued()[0]] == [failed.request_id]


def test_a_run_trained_again_between_validation_and_the_durable_write_is_not_acknowledged_with_old_shards(store):
    """The intake validates against the run at HEAD, then writes the group; the only check
    after the write was that HEAD exists. A drop and a new training of the same name with
    another layout in between acknowledged the request with the old run's shards as its
    quarantine: the shard of the new run that holds the record answered."""
    coord = Coordinator(store, "r", window_s=3600)
    coord.submit(ids=["r0000"])
    cfg = SisaConfig(shards=2, slices=1, model="tiny", batch_size=4, max_length=32, seed=11)
    real_put = Versioned.put
    state = {"armed": True}

    def put(self, key, data):
        if state["armed"] and "/queue/" in key:
            state["armed"] = False
            SisaRun.drop(self, "r")
            SisaRun.train(self, "r", synthetic_records(40, owners_every=1), cfg)
        real_put(self, key, data)

    store.put = put.__get__(store)
    victims = [f"r{i:04d}" for i in range(40)]
    old = SisaRun.open(store, "r")
    victim = next(v for v in victims if old.units_of([v]) != [0])  # any record off the new layout's shard 0..1 view
    try:
        rid = coord.submit(ids=[victim])
    except UnlearnError as exc:
        assert "trained again" in str(exc) or "dropped" in str(exc)
        return
    fresh = SisaRun.open(store, "r")
    assert coord.get(rid).units == fresh.units_of([victim])


class Interrupted(BaseException):
    pass


def test_a_base_exception_in_the_leaders_write_reaches_its_group_and_the_next_group_is_written(store):
    coord = Coordinator(store, "r", window_s=3600)
    real_put = Versioned.put
    state = {"n": 0}

    def put(self, key, data):
        if "/queue/" in key:
            state["n"] += 1
            if state["n"] == 1:
                time.sleep(0.3)  # the others pile up behind the first write
            if state["n"] == 2:
                raise Interrupted()
        real_put(self, key, data)

    store.put = put.__get__(store)
    out = [None] * 6

    def one(i):
        try:
            out[i] = coord.submit(ids=[f"r{i:04d}"])
        except BaseException as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
    threads[0].start()
    time.sleep(0.1)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert isinstance(out[0], str) and any(isinstance(o, Interrupted) for o in out)
    assert isinstance(coord.submit(ids=["r0030"]), str)


def test_a_waiting_submitter_that_dies_when_handed_the_lead_does_not_wedge_the_front_door(store):
    """A thread waiting for its group can leave with an exception (KeyboardInterrupt in a
    main thread, an asynchronous exception) at the moment the last writer hands it the next
    group. Nobody wrote that group, and every later submit waited forever."""
    import ctypes

    coord = Coordinator(store, "r", window_s=3600)
    real_put = Versioned.put
    first = threading.Event()

    def put(self, key, data):
        if "/queue/" in key and not first.is_set():
            first.set()
            time.sleep(0.5)
        real_put(self, key, data)

    store.put = put.__get__(store)
    leader = threading.Thread(target=coord.submit, kwargs={"ids": ["r0001"]}, daemon=True)
    leader.start()
    first.wait(5)
    victim = threading.Thread(target=lambda: coord.submit(ids=["r0002"]), daemon=True)
    victim.start()
    time.sleep(0.1)  # waiting in the intake behind the leader's write
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(victim.ident), ctypes.py_object(Interrupted))
    leader.join(10)
    victim.join(10)
    assert not victim.is_alive()
    later = {}
    t = threading.Thread(target=lambda: later.setdefault("id", coord.submit(ids=["r0003"])), daemon=True)
    t.start()
    t.join(10)
    assert "id" in later, "the front door hangs: the lead was handed to a thread that is gone"


def test_a_request_whose_validation_raises_refuses_its_bulk_only(store, monkeypatch):
    coord = Coordinator(store, "r", window_s=3600)
    real = SisaRun.resolve

    def resolve(self, ids=(), owners=()):
        if "r0007" in ids:
            raise RuntimeError("boom")
        return real(self, ids, owners)

    monkeypatch.setattr(SisaRun, "resolve", resolve)
    out = coord.submit_bulk([[(["r0001"], [], False), (["r0007"], [], False)], [(["r0002"], [], False)]])
    assert isinstance(out[0], UnlearnError) and "requests[1]" in str(out[0]) and "boom" in str(out[0])
    assert isinstance(out[1], list)
    queued = RequestLog(store, "r").queued()[0]
    assert [r.ids for r in queued] == [["r0002"]]
