"""The deletion coordinator: durable before acknowledged, batching, receipts, replay."""
import json

import pytest

from cluster.cli import main
from cluster.coordinator import Coordinator, CoordinatorLoop, batch_due, wait_for
from conftest import synthetic_records
from sisa.config import SisaConfig
from core.errors import UnlearnError
from sisa.run import SisaRun
from core.store import LocalStore

CFG = SisaConfig(shards=3, slices=2, model="tiny", batch_size=4, max_length=32)


@pytest.fixture
def trained(tmp_path):
    store = LocalStore(str(tmp_path / "s"))
    run = SisaRun.train(store, "r", synthetic_records(30, owners_every=1), CFG)
    return store, run


def test_batch_due():
    assert not batch_due([], 100.0, 0.0)
    assert batch_due([100.0], 100.0, 0.0)
    assert not batch_due([99.0, 100.0], 100.0, 5.0)
    assert batch_due([95.0, 100.0], 100.0, 5.0)


def test_request_is_logged_before_it_is_acknowledged_and_forgotten_after(trained):
    store, run = trained
    coord = Coordinator(store, "r")
    rid = coord.submit(ids=["r0003"], owners=["owner007"])
    (entry,) = json.loads(store.get(f"r/queue/{rid}.json"))["requests"]  # durable at acknowledgement
    assert entry["status"] == "pending" and entry["ids"] == ["r0003"] and entry["owners"] == ["owner007"]
    assert sorted(entry["units"]) == sorted(run.units_of(["r0003", "r0007"]))  # quarantined from now on
    done = coord.apply_due()
    assert [r.request_id for r in done] == [rid]
    req = coord.get(rid)
    assert req.status == "done" and req.records_deleted == 2 and req.ids == [] and req.owners == []
    assert req.completed >= req.accepted and req.version == 2
    where = run.manifest.owners()
    shards = sorted({k for k, s in enumerate(run.manifest.shards) for sl in s.slices
                     for i in sl.ids if i in ("r0003", "r0007")})
    assert req.shards == shards and set(req.digests) == {str(k) for k in shards}
    assert "r0003" not in SisaRun.open(store, "r").manifest.owners() and "r0003" in where
    assert b"r0003" not in store.get(f"r/requests/{rid}.json")
    assert store.list_all("r/queue/") == []  # the queue entry (which named the ids) is purged


def test_unknown_ids_are_not_accepted(trained):
    store, _ = trained
    coord = Coordinator(store, "r")
    with pytest.raises(UnlearnError, match='unknown id "zz"; request not accepted'):
        coord.submit(ids=["zz"])
    assert store.list_all("r/requests/") == [] and store.list_all("r/queue/") == []


def test_window_batches_requests_and_receipts_are_per_request(trained):
    store, _ = trained
    coord = Coordinator(store, "r", window_s=60.0)
    a = coord.submit(ids=["r0001"])
    b = coord.submit(ids=["r0002", "r0004"])
    assert coord.apply_due() == []  # the window has not passed
    done = coord.apply_due(now=1e12)
    assert sorted(r.request_id for r in done) == sorted([a, b])
    ra, rb = coord.get(a), coord.get(b)
    assert ra.batch_id == rb.batch_id == min(a, b) and ra.batch_size == rb.batch_size == 2
    assert ra.records_deleted == 1 and rb.records_deleted == 2
    assert ra.version == rb.version == 2  # one deletion for the whole batch


def test_a_restarted_coordinator_replays_pending_requests(trained):
    store, _ = trained
    rid = Coordinator(store, "r", window_s=3600).submit(ids=["r0005"])  # then the process dies
    fresh = Coordinator(store, "r", window_s=3600)
    assert fresh.pending() == [rid]
    assert [r.request_id for r in fresh.apply_due()] == [rid]  # replayed entries are due at once
    assert fresh.get(rid).status == "done"
    assert "r0005" not in SisaRun.open(store, "r").manifest.owners()


def test_background_loop_and_requests_command(trained, capsys):
    store, _ = trained
    coord = Coordinator(store, "r")
    loop = CoordinatorLoop(coord)
    try:
        rid = coord.submit(owners=["owner010"])
        assert wait_for(coord, rid, timeout_s=60).status == "done"
    finally:
        loop.stop()
    assert main(["requests", "--run", "r", "--store", store.root, "--json"]) == 0
    log = json.loads(capsys.readouterr().out)["requests"]
    assert [(r["request_id"], r["status"], r["records_deleted"]) for r in log] == [(rid, "done", 1)]


def test_cli_delete_goes_through_the_log(trained, capsys):
    store, _ = trained
    assert main(["delete", "--run", "r", "--store", store.root, "--ids", "r0009", "--json", "--quiet"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["request_id"] and receipt["accepted"] <= receipt["completed"] and receipt["ids"] == ["r0009"]
    assert Coordinator(store, "r").get(receipt["request_id"]).status == "done"


def test_a_flipped_bit_in_a_queue_entry_is_never_applied_and_withholds_everything(trained, tmp_path):
    """Seen before: "r0003" flipped to "r0002" deleted r0002 and reported success. Entries
    carry a checksum; a damaged one is skipped (the others are applied) and, as it could
    name anything, nothing answers until it is removed."""
    from cluster.quarantine import Serving
    from core.errors import Unavailable

    store, run = trained
    coord = Coordinator(store, "r", window_s=3600)
    rid = coord.submit(ids=["r0003"])
    other = coord.submit(ids=["r0011"])
    key = f"r/queue/{rid}.json"
    store.put(key, store.get(key).replace(b'"r0003"', b'"r0002"'))
    serving = Serving(store, "r")
    with pytest.raises(Unavailable, match=f'entry "{rid}" is damaged .*checksum.*--discard-damaged'):
        serving.predict(["great fun"], run._executor(False).predict)
    done = Coordinator(store, "r").apply_due()
    assert [r.request_id for r in done] == [other]
    held = SisaRun.open(store, "r").manifest.owners()
    assert "r0002" in held and "r0003" in held and "r0011" not in held
    assert Coordinator(store, "r").discard_damaged() == [key]
    assert serving.predict(["great fun"], run._executor(False).predict)["shards"] == [0, 1, 2]


def test_a_shard_whose_actor_is_restarting_is_left_out_not_waited_for(trained):
    """A lost node takes its shard actors with it until Ray restarts them elsewhere; the
    executor answers None for those, and the ensemble answers from the others, saying which
    were left out. With none left to answer, one line (HTTP 503)."""
    from cluster.quarantine import Serving
    from core.errors import Unavailable

    store, run = trained
    serving = Serving(store, "r")
    local = run._executor(False).predict

    def one_lost(entries, texts):
        return [None if e.shard == 1 else answer for e, answer in zip(entries, local(entries, texts))]

    out = serving.predict(["great fun", "dull"], one_lost)
    assert out["shards"] == [0, 2] and out["unavailable"] == [1] and out["quarantined"] == []
    assert "unavailable" not in serving.predict(["great fun"], local)
    with pytest.raises(Unavailable, match=r"no shard can answer now: shards \[0, 1, 2\] are restarting"):
        serving.predict(["great fun"], lambda entries, texts: [None] * len(entries))
    coord = Coordinator(store, "r", window_s=3600)
    coord.submit(ids=[run.manifest.shards[0].slices[0].ids[0]])  # shard 0 quarantined, shard 1 lost
    out = serving.predict(["great fun"], one_lost)
    assert out["shards"] == [2] and out["unavailable"] == [1] and out["quarantined"] == [0]
    assert [r.status for r in Coordinator(store, "r").apply_due()] == ["done"]


@pytest.mark.parametrize("damage", [b'"attempts": "x"', b'"units": [[0]]', b"rename"])
def test_entries_of_the_wrong_shape_are_damaged_not_half_used(trained, damage):
    from cluster.requestlog import RequestLog, decode, encode

    store, _ = trained
    coord = Coordinator(store, "r", window_s=3600)
    rid = coord.submit(ids=["r0003"])
    req = coord.get(rid)
    data = encode(req)
    if damage == b"rename":  # a copy under another id
        with pytest.raises(ValueError, match="it names request"):
            decode(data, "00000000000000000001-deadbeef")
        return
    field, value = damage.split(b": ")
    body = json.loads(data)
    body[json.loads(field)] = json.loads(value)
    body.pop("check")
    from cluster.requestlog import _canonical
    from core.keys import sha256_hex

    body["check"] = sha256_hex(_canonical(body))  # a well-formed checksum over a bad shape
    with pytest.raises(ValueError, match="wrong type"):
        decode(json.dumps(body).encode(), rid)
    assert RequestLog(store, "r").queued()[1] == []  # the stored entry itself is fine


def test_one_damaged_object_fails_only_the_requests_that_need_it(trained):
    store, run = trained
    coord = Coordinator(store, "r", window_s=3600)
    shard0 = run.manifest.shards[0]
    victim0 = shard0.slices[0].ids[0]
    victim1 = run.manifest.shards[1].slices[0].ids[0]
    a, b = coord.submit(ids=[victim0]), coord.submit(ids=[victim1])
    data = store.get(shard0.slices[0].data)
    with open(f"{store.root}/{shard0.slices[0].data}", "wb") as f:  # one byte of its text changed
        f.write(data.replace(b"#", b"%", 1))
    done = Coordinator(store, "r").apply_due()
    assert [r.request_id for r in done] == [b]
    failed = coord.get(a)
    assert failed.status == "failed" and failed.ids == [victim0] and "corrupted" in failed.reason
    assert coord.quarantined() == [0]  # still withheld: its deletion is acknowledged


def test_temporary_files_of_killed_log_writers_are_swept(trained):
    import os
    import time

    store, _ = trained
    coord = Coordinator(store, "r")
    rid = coord.submit(ids=["r0003"])
    leftover = os.path.join(store.root, "r", "queue", ".tmp-killed")
    with open(leftover, "w") as f:
        f.write('{"ids": ["r0003"]}')
    old = time.time() - 600
    os.utime(leftover, (old, old))
    assert [r.request_id for r in coord.apply_due()] == [rid]
    assert not os.path.exists(leftover)


def test_a_request_accepted_while_the_run_is_dropped_leaves_nothing(trained):
    store, _ = trained
    coord = Coordinator(store, "r")
    real = coord.requests.append

    def append_then_drop(req):
        real(req)
        SisaRun.drop(store, "r")  # drop between validation and the end of the intake

    coord.requests.append = append_then_drop
    with pytest.raises(UnlearnError, match="was dropped"):
        coord.submit(ids=["r0003"])
    assert store.list_all("r/") == []
