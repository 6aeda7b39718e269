"""Group commit at the front door: requests that arrive together are acknowledged by one
durable write, each validated on its own; a group is a queue object, rewritten only by the
lock holder, and no version of it keeps the ids of a request that is done."""
import json
import threading
import time

import pytest

from cluster.coordinator import Coordinator
from cluster.requestlog import DeletionRequest, RequestLog, encode
from conftest import synthetic_records
from core.errors import UnlearnError
from core.store import LocalStore
from sisa.config import SisaConfig
from sisa.run import SisaRun

CFG = SisaConfig(shards=3, slices=2, model="tiny", batch_size=4, max_length=32)


class SlowQueue(LocalStore):
    """Its first queue write takes `pause` seconds (the others pile up meanwhile); counts
    queue writes and manifest reads; `fail` makes queue writes raise."""

    def __init__(self, root: str, pause: float = 0.0):
        super().__init__(root)
        self.pause, self.queue_puts, self.manifest_gets, self.fail = pause, 0, 0, False

    def put(self, key, data):
        if "/queue/" in key:
            if self.fail:
                raise OSError("disk full")
            self.queue_puts += 1
            if self.queue_puts == 1:
                time.sleep(self.pause)
        super().put(key, data)

    def get(self, key):
        if "/manifests/" in key:
            self.manifest_gets += 1
        return super().get(key)


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    SisaRun.train(LocalStore(str(root / "s")), "r", synthetic_records(40, owners_every=1), CFG)
    return root / "s"


@pytest.fixture
def store(trained_root, tmp_path):
    import shutil

    shutil.copytree(trained_root, tmp_path / "s")
    return SlowQueue(str(tmp_path / "s"), pause=0.3)


def submit_all(coord, requests):
    """Submit each (ids, owners) from its own thread, all at once; (ids or exceptions)."""
    out = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(i):
        start.wait()
        try:
            out[i] = coord.submit(*requests[i])
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_requests_arriving_together_share_one_durable_write(store):
    coord = Coordinator(store, "r", window_s=3600)
    ids = [f"r{i:04d}" for i in range(24)]
    out = submit_all(coord, [([i], []) for i in ids])
    assert all(isinstance(o, str) for o in out), out
    assert len(set(out)) == 24
    assert coord.groups_written == store.queue_puts <= 4  # one write for the first, one or so for the pile
    log = RequestLog(store, "r")
    assert len(log.queued_keys()) == coord.groups_written
    queued, problems = log.queued()
    assert problems == [] and sorted(r.request_id for r in queued) == sorted(out)
    for rid, victim in zip(out, ids):  # each found by its id, in whatever group, with what it named
        req = coord.get(rid)
        assert req.status == "pending" and req.ids == [victim] and req.units
    done = Coordinator(store, "r").apply_due()
    assert sorted(r.request_id for r in done) == sorted(out) and log.queued_keys() == []
    assert {coord.get(r).batch_size for r in out} == {24} and len({coord.get(r).batch_id for r in out}) == 1


def test_a_bad_request_fails_alone_and_a_failed_write_acknowledges_none(store):
    coord = Coordinator(store, "r", window_s=3600)
    out = submit_all(coord, [(["r0001"], []), (["nope"], []), ([], ["owner002"]), (["r0003"], [])])
    assert isinstance(out[1], UnlearnError) and 'unknown id "nope"' in str(out[1])
    good = [out[0], out[2], out[3]]
    assert all(isinstance(o, str) for o in good)
    stored = [json.loads(store.get(k)) for k in RequestLog(store, "r").queued_keys()]
    assert sorted(r["request_id"] for g in stored for r in g["requests"]) == sorted(good)
    assert not any("nope" in json.dumps(g) for g in stored)
    store.fail = True  # the durable write fails: nobody of that group hears "accepted"
    out = submit_all(coord, [([f"r{i:04d}"], []) for i in range(10, 16)])
    assert all(isinstance(o, OSError) for o in out), out
    store.fail = False
    assert len(RequestLog(store, "r").queued()[0]) == 3
    assert isinstance(coord.submit(ids=["r0020"]), str)  # the front door still works


def test_validation_reads_the_manifest_once_per_commit_not_per_request(store):
    """Seen: every acknowledgement read and indexed the whole manifest (53 ms a request at
    10,000 records, growing with the run): a front door of 22 requests a second."""
    coord = Coordinator(store, "r", window_s=3600)
    store.manifest_gets = 0
    for i in range(30):
        coord.submit(ids=[f"r{i:04d}"])
    assert store.manifest_gets <= 2
    assert coord.get(coord.submit(ids=["r0001"])).units  # its shard is quarantined while it is queued
    Coordinator(store, "r").apply_due()  # a commit: the next acknowledgement sees the new state
    store.manifest_gets = 0
    again = coord.submit(ids=["r0001"])  # a repeat of a done deletion: accepted, nothing to withhold
    assert coord.get(again).units == [] and store.manifest_gets <= 2


def test_a_queue_entry_written_before_groups_is_read_found_and_applied(store):
    coord = Coordinator(store, "r", window_s=3600)
    units = SisaRun.open(store, "r").units_of(["r0005"])
    old = DeletionRequest(request_id=f"{time.time_ns():020d}-0000abcd", accepted="2026-01-01T00:00:00+00:00",
                          ids=["r0005"], units=units, requested={"ids": 1, "owners": 0})
    store.put(f"r/queue/{old.request_id}.json", encode(old))  # one request, no group around it
    assert coord.get(old.request_id).ids == ["r0005"] and coord.quarantined() == units
    done = Coordinator(store, "r").apply_due()
    assert [r.request_id for r in done] == [old.request_id]
    assert coord.get(old.request_id).status == "done" and RequestLog(store, "r").queued_keys() == []
    assert "r0005" not in SisaRun.open(store, "r").manifest.owners()


def test_a_damaged_group_names_itself_when_one_of_its_requests_is_looked_up(store):
    coord = Coordinator(store, "r", window_s=3600)
    out = submit_all(coord, [([f"r{i:04d}"], []) for i in range(6)])
    keys = RequestLog(store, "r").queued_keys()
    key = max(keys, key=lambda k: len(store.get(k)))
    group = json.loads(store.get(key))
    store.put(key, store.get(key).replace(b'"r000', b'"r900', 1))
    member = group["requests"][-1]["request_id"]
    with pytest.raises(UnlearnError, match=f'entry "{group["group"]}" is damaged'):
        coord.get(member)
    others = [o for o in out if o not in {r["request_id"] for r in group["requests"]}]
    for rid in others:
        assert coord.get(rid).status == "pending"


@pytest.mark.integration
def test_finishing_part_of_a_group_leaves_no_version_naming_it_on_seaweedfs(seaweedfs, s3_bucket):
    """The lock holder rewrites a group without the requests it finished: on a versioned
    bucket the older versions (which named their ids) must go, as a deleted text must."""
    from core.store import open_store
    from test_store import all_versions

    store = open_store(f"s3://{s3_bucket}/p")
    log = RequestLog(store, "r")
    now = time.time_ns()
    a, b, c = (DeletionRequest(request_id=f"{now + i:020d}-0000000{i}", accepted="2026-01-01T00:00:00+00:00",
                               ids=[f"secret-{i}"], units=[i]) for i in range(3))
    group = log.append([a, b, c])
    b.status = "applying"
    log.update([b])
    log.finish([a])
    (left,) = log.queued_keys()
    assert [r.request_id for r in log.queued()[0]] == [b.request_id, c.request_id]
    client = seaweedfs.client()
    versions = [(k, v) for k, v in all_versions(client, s3_bucket) if k == f"p/{left}"]
    assert len(versions) == 1, versions
    body = client.get_object(Bucket=s3_bucket, Key=f"p/{left}", VersionId=versions[0][1])["Body"].read()
    assert b"secret-0" not in body and b"secret-1" in body and json.loads(body)["group"] == group
    log.finish([b, c])
    assert [k for k, _ in all_versions(client, s3_bucket) if "/queue/" in k] == []
    assert log.get(a.request_id).ids == []  # its receipt keeps counts, not what it named
    for key, version in all_versions(client, s3_bucket):
        assert b"secret-" not in client.get_object(Bucket=s3_bucket, Key=key, VersionId=version)["Body"].read(), key


def test_bulks_are_accepted_or_refused_whole_and_never_split_between_writes(store, monkeypatch):
    import cluster.coordinator as coordinator

    monkeypatch.setattr(coordinator, "MAX_GROUP", 3)
    coord = Coordinator(store, "r", window_s=3600)
    good = [([f"r{i:04d}"], [], False) for i in range(5)]  # more than a group: written whole anyway
    bad = [(["r0010"], [], False), (["nope"], [], False), (["r0011"], [], False)]
    empty = [(["r0012"], [], False), ([], [], False)]
    out = {}

    def bulks():
        out["bulks"] = coord.submit_bulk([good, bad, [(["r0013"], [], False)], empty])

    t = threading.Thread(target=bulks)
    t.start()
    singles = submit_all(coord, [([f"r{i:04d}"], []) for i in range(20, 26)])
    t.join(60)
    got = out["bulks"]
    assert isinstance(got[0], list) and len(got[0]) == 5 and got[0] == sorted(got[0])  # in order
    assert isinstance(got[1], UnlearnError) and str(got[1]).startswith("requests[1]: ")
    assert "no request of the bulk accepted" in str(got[1])
    assert isinstance(got[2], list) and len(got[2]) == 1
    assert isinstance(got[3], UnlearnError) and "requests[1]: a deletion request needs ids or owners" in str(got[3])
    assert all(isinstance(g, str) for g in singles), singles
    groups = [json.loads(store.get(k))["requests"] for k in RequestLog(store, "r").queued_keys()]
    ids_of = {r["request_id"]: r["ids"] for g in groups for r in g}
    assert sorted(ids_of) == sorted([*got[0], *got[2], *singles])
    assert not {"r0010", "r0011", "r0012"} & {i for v in ids_of.values() for i in v}  # refused whole
    home = [next(n for n, g in enumerate(groups) if rid in {r["request_id"] for r in g}) for rid in got[0]]
    assert len(set(home)) == 1  # one write for the whole bulk, though larger than a group
    assert all(len(g) <= 3 for g in groups if not {r["request_id"] for r in g} & set(got[0]))
