"""The split manifest (format 2): one content-addressed object per unit (a SISA shard, an
ERASE partition), named by the manifest. A deletion writes only the units it touched;
format 1 is still read; a corrupted or missing unit object is one line naming it;
superseded unit objects are purged with every version; a crash before HEAD leaves the
previous state readable and the next mutation purges what the crash left; resolving
through per-unit indexes answers as one table did."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict

import pytest

from cluster.cli import main
from conftest import synthetic_records
from core.errors import IntegrityError, ObjectMissing, UnlearnError
from core.keys import sha256_hex
from core.store import LocalStore, S3Store
from core.tombstones import Resolver, after_deletion, tombstone
from core.units import UNITS, UnitIndex, clear_cache
from sisa.config import SisaConfig
from sisa.run import SisaRun

CFG = SisaConfig(shards=3, slices=2, model="tiny", batch_size=4, max_length=32, seed=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("split") / "s"
    SisaRun.train(LocalStore(str(root)), "r", synthetic_records(48, owners_every=2), CFG)
    return root


@pytest.fixture
def store(template, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(template, root)
    clear_cache()  # as a fresh process: nothing parsed yet
    return LocalStore(str(root))


class Counting(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key, data):
        self.puts.append(key)
        super().put(key, data)


def head_json(store, run="r") -> dict:
    return json.loads(store.get(json.loads(store.get(f"{run}/HEAD"))["manifest"]))


def point_head_at(store, top: dict, run: str = "r") -> None:
    """Write manifest JSON `top` under its content address and point HEAD at it."""
    blob = json.dumps(top).encode()
    mkey = f"{run}/manifests/{sha256_hex(blob)}.json"
    store.put(mkey, blob)
    store.put(f"{run}/HEAD", json.dumps({"manifest": mkey}).encode())


def files(store) -> dict[str, bytes]:
    out = {}
    for key in store.list_all("r/"):
        with open(os.path.join(store.root, *key.split("/")), "rb") as f:
            out[key] = f.read()
    return out


def test_the_manifest_names_one_object_per_shard_and_holds_no_record_ids(store):
    top = head_json(store)
    assert top["format"] == 2 and "shards" not in top
    assert [u["summary"]["shard"] for u in top["units"]] == [0, 1, 2]
    assert all(u["key"].startswith(f"r/{UNITS}") for u in top["units"])
    run = SisaRun.open(store, "r")
    held = run.manifest.owners()
    assert len(held) == 48 and not any(f'"{rid}"' in json.dumps(top) for rid in held)
    # round trip: the entries read back are the ones committed, bit for bit
    for unit, entry in zip(top["units"], run.manifest.shards):
        data = store.get(unit["key"])
        assert unit["key"] == f"r/{UNITS}{sha256_hex(data)}.json"
        assert json.loads(data) == asdict(entry)  # the entry as format 1 held it
        assert unit["summary"] == {"shard": entry.shard, "records": entry.records,
                                   "slices": [len(s.ids) for s in entry.slices], "digest": entry.digest}


def test_the_unit_cache_is_bounded_by_records_and_stays_right_when_too_small(store, monkeypatch):
    """Reviewed: bounded by 8,192 entries, a long-lived coordinator of a 1M-record run could
    hold gigabytes of superseded units (deleted ids among them, in memory). Bounded by
    records, the oldest go first; a budget below the run's size only costs reads."""
    from core import units
    from core.units import _Bounded

    lru = _Bounded(10)
    for k, w in (("a", 4), ("b", 4), ("c", 4)):
        lru.put(k, k.upper(), w)
    assert lru.get("a") is None and lru.get("b") == "B" and lru.get("c") == "C" and lru.weight == 8
    lru.put("huge", "H", 50)  # over the budget alone: kept, everything older goes
    assert lru.get("huge") == "H" and lru.get("b") is None and lru.weight == 50

    monkeypatch.setattr(units, "CACHE", units.UnitCache(budget=5))  # below one shard's 16 records
    run = SisaRun.open(store, "r")
    victim = run.manifest.shards[1].slices[0].ids[0]
    run.delete(ids=[victim])
    again = SisaRun.open(store, "r")
    assert victim not in again.manifest.owners() and again.resolve(ids=[victim])[1] == [victim]
    assert all(m.weight <= 5 or len(m._d) == 1 for m in (units.CACHE.entries, units.CACHE.keys, units.CACHE.indexes))


def test_status_reads_no_unit_object(store):
    class NoUnits(LocalStore):
        def get(self, key):
            assert f"/{UNITS}" not in key, key
            return super().get(key)

    status = SisaRun.open(NoUnits(store.root), "r").status()
    assert status["records"] == 48 and [s["shard"] for s in status["shards"]] == [0, 1, 2]


def test_a_deletion_writes_only_the_unit_it_touched(store):
    counting = Counting(store.root)
    run = SisaRun.open(counting, "r")
    before = run.manifest.unit_keys()
    victim = run.manifest.shards[1].slices[1].ids[0]
    receipt = run.delete(ids=[victim])
    assert receipt.shards == [1]
    units = [k for k in counting.puts if f"/{UNITS}" in k]
    after = SisaRun.open(counting, "r").manifest.unit_keys()
    assert units == [after[1]] and after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert not [k for k in counting.puts if "/data/" in k and k not in str(run.manifest.shards[1].slices)]
    # the superseded unit object (it lists the deleted id) is purged
    assert before[1] not in store.list_all("r/") and sorted(store.list_all(f"r/{UNITS}")) == sorted(after)
    assert not [k for k, data in files(store).items() if f'"{victim}"'.encode() in data]


def test_resolving_after_a_commit_reindexes_the_touched_shard_only(store, monkeypatch):
    run = SisaRun.open(store, "r")
    run.resolve(ids=["r0000"])  # every shard indexed once
    built = []
    real = UnitIndex.__init__

    def counting(self, rows):
        built.append(1)
        real(self, rows)

    monkeypatch.setattr(UnitIndex, "__init__", counting)
    victim = run.manifest.shards[2].slices[0].ids[0]
    run.delete(ids=[victim])
    fresh = SisaRun.open(store, "r")  # another handle, as the coordinator opens per batch
    assert fresh.resolve(ids=[victim]) == (set(), [victim], [])
    assert fresh.units_of(fresh.manifest.shards[0].slices[0].ids[:1]) == [0]
    assert len(built) == 1  # the new shard 2 object only


def legacy(store, run: str, key_field: str) -> str:
    """Rewrite the committed manifest as format 1 (every unit's entry inline), as a version
    before the split wrote it, and drop the unit objects; returns the manifest key."""
    from core.stored_run import StoredRun

    cls = SisaRun if key_field == "shards" else __import__("erase.run", fromlist=["EraseRun"]).EraseRun
    m = cls.open(store, run).manifest
    d = {**m.scalars(), "format": 1, key_field: [m.entry_json(e) for e in m.units]}
    data = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    mkey = f"{run}/manifests/{sha256_hex(data)}.json"
    store.put(mkey, data)
    store.put(f"{run}/HEAD", json.dumps({"manifest": mkey}).encode())
    for key in store.list_all(f"{run}/"):
        if f"/{UNITS}" in key or ("/manifests/" in key and key != mkey):
            store.delete(key)
    assert StoredRun.exists(store, run)
    clear_cache()
    return mkey


def test_a_format_1_run_is_read_and_its_next_deletion_writes_format_2(store):
    before = SisaRun.open(store, "r").status()
    mkey = legacy(store, "r", "shards")
    run = SisaRun.open(store, "r")
    assert run.status() == before and run.manifest.format == 1
    # a deletion's leftovers collection must keep the format-1 manifest HEAD names
    victim = run.manifest.shards[0].slices[0].ids[0]
    run.delete(ids=[victim])
    top = head_json(store)
    assert top["format"] == 2 and len(top["units"]) == 3
    assert mkey not in store.list_all("r/")  # the old manifest (every id in it) is purged
    assert not [k for k, data in files(store).items() if f'"{victim}"'.encode() in data]
    clear_cache()
    assert SisaRun.open(store, "r").verify()["exact"]


def test_a_format_1_erase_run_is_read_and_rewritten(tmp_path):
    from erase.config import EraseConfig
    from erase.run import EraseRun

    store = LocalStore(str(tmp_path / "s"))
    EraseRun.train(store, "e", synthetic_records(30), EraseConfig(embedder="tiny", partitions=3, shots=4))
    before = EraseRun.open(store, "e").status()
    legacy(store, "e", "partitions")
    run = EraseRun.open(store, "e")
    assert run.status() == before
    run.delete(ids=["r0004"])
    assert head_json(store, "e")["format"] == 2
    clear_cache()
    again = EraseRun.open(store, "e")
    assert again.manifest.records == 29 and again.verify()["exact"]
    assert len(store.list_all(f"e/{UNITS}")) == 3


def test_an_unknown_manifest_format_is_refused(store):
    mkey = json.loads(store.get("r/HEAD"))["manifest"]
    d = head_json(store)
    d["format"] = 3
    data = json.dumps(d).encode()
    key = f"r/manifests/{sha256_hex(data)}.json"
    store.put(key, data)
    store.put("r/HEAD", json.dumps({"manifest": key}).encode())
    with pytest.raises(UnlearnError, match="manifest format 3, this version reads 1 and 2"):
        SisaRun.open(store, "r")
    assert mkey


@pytest.mark.parametrize("damage", ["flip", "missing", "not an entry"])
def test_a_damaged_unit_object_is_one_line_naming_it(store, capsys, damage):
    top = head_json(store)
    key = top["units"][1]["key"]
    path = os.path.join(store.root, *key.split("/"))
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(5)
            byte = f.read(1)
            f.seek(5)
            f.write(bytes([byte[0] ^ 1]))
    elif damage == "missing":
        os.unlink(path)
    else:  # intact bytes under their own SHA-256, but not a shard entry: the manifest names it
        data = b'{"shard": 1}'
        key = f"r/{UNITS}{sha256_hex(data)}.json"
        store.put(key, data)
        top["units"][1]["key"] = key
        point_head_at(store, top)
    error = {"flip": IntegrityError, "missing": ObjectMissing, "not an entry": UnlearnError}[damage]
    with pytest.raises(error) as err:
        SisaRun.open(store, "r").delete(ids=["r0000"])
    assert key in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    assert main(["delete", "--run", "r", "--store", store.root, "--ids", "r0001", "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("unlearn: error: ")]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in err, err
    assert main(["status", "--run", "r", "--store", store.root, "--json"]) == 0  # the summary is in the manifest


@pytest.mark.parametrize("name", ["r/units/edited.json", "other/units/{sha}.json", "r/ckpt/{sha}.json"])
def test_a_unit_key_that_is_not_this_runs_content_address_is_refused(store, name):
    """The store checks a unit object's bytes only against a `<sha256>.json` name: a manifest
    naming a unit any other way (an edited object under a plain name, another run's object
    that its garbage collection may purge, an object of another folder) was read unchecked."""
    top = head_json(store)
    entry = json.loads(store.get(top["units"][1]["key"]))
    entry["slices"][0]["ids"] = entry["slices"][0]["ids"][1:]  # the content the key does not name
    entry["slices"][0]["owners"] = entry["slices"][0]["owners"][1:]
    data = json.dumps(entry).encode()
    key = name.format(sha=sha256_hex(data))
    store.put(key, data)
    top["units"][1]["key"] = key
    point_head_at(store, top)
    with pytest.raises(UnlearnError, match="is not r/units/<sha256>.json") as err:
        SisaRun.open(store, "r").manifest.owners()
    assert key in str(err.value) and "\n" not in str(err.value)


def test_superseded_unit_objects_leave_no_version_behind(moto_server, tmp_path):
    """A versioned bucket: the unit objects a deletion superseded (they list the deleted
    id) are purged with every version, like the slices and checkpoints."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    bucket = f"u-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store = S3Store(bucket, "p", client=client)
    records = synthetic_records(24, owners_every=1)
    run = SisaRun.train(store, "r", records, SisaConfig(shards=2, slices=1, model="tiny", batch_size=4, max_length=32))
    old_units = run.manifest.unit_keys()
    victims = [run.manifest.shards[0].slices[0].ids[0], run.manifest.shards[1].slices[0].ids[0]]
    run.delete(ids=victims[:1])
    run.delete(owners=[next(r.owner for r in records if r.id == victims[1])])
    seen = set()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            seen.add(v["Key"])
            body = client.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
            for rid in victims:
                assert f'"{rid}"'.encode() not in body, (v["Key"], rid)
    assert not {f"p/{k}" for k in old_units} & seen
    assert len([k for k in seen if f"/{UNITS}" in k]) == 2 and len([k for k in seen if "/manifests/" in k]) == 1


CHILD = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
from core.store import LocalStore
from sisa.run import SisaRun

class Stalling(LocalStore):
    def put(self, key, data):
        if {point!r} in key:
            open({flag!r}, "w").close()
            time.sleep(600)  # killed here
        super().put(key, data)

SisaRun.open(Stalling({root!r}), "r").delete(ids=[{victim!r}])
"""


@pytest.mark.parametrize("point", ["/manifests/", "/HEAD"])
def test_kill_9_after_the_unit_objects_and_before_head(store, tmp_path, point):
    """Killed after writing the new unit objects (and the manifest): the previous state
    is what reads see; the next deletion takes the dead holder's lock over and purges what
    the killed one wrote (its unit objects list ids it was about to delete)."""
    run = SisaRun.open(store, "r")
    before_head = store.get("r/HEAD")
    status = run.status()
    first = run.manifest.shards[0].slices[1].ids[0]
    flag = str(tmp_path / "stalled")
    code = CHILD.format(repo=REPO, point=point, flag=flag, root=store.root, victim=first)
    proc = subprocess.Popen([sys.executable, "-P", "-c", code], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not os.path.exists(flag):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the child never reached the commit"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    orphans = [k for k in store.list_all(f"r/{UNITS}") if k not in run.manifest.unit_keys()]
    assert len(orphans) == 1  # shard 0's new object, written before the commit point
    assert store.get("r/HEAD") == before_head
    clear_cache()
    reader = SisaRun.open(store, "r")
    assert reader.status() == status and first in reader.manifest.owners()

    second = reader.manifest.shards[1].slices[0].ids[0]
    reader.delete(ids=[second])
    left = set(store.list_all("r/")) - {"r/HEAD"}
    keep = reader.manifest.referenced_keys() | {reader.manifest.key}
    assert not [k for k in left if k not in keep and not k.startswith(("r/LOCK", "r/locks/"))]
    assert not set(orphans) & left
    assert first in reader.manifest.owners() and second not in reader.manifest.owners()


def test_per_unit_resolver_answers_as_one_table():
    rng = random.Random(5)
    for trial in range(30):
        held = {f"id{i}": f"o{rng.randrange(40)}" for i in range(rng.randrange(0, 300))}
        salt = os.urandom(16).hex()
        gone_ids = [f"gone{i}" for i in range(5)]
        tombs = after_deletion(salt, [], gone_ids, ["gone-owner"], {"gone-owner"})
        assert tombstone(salt, "owner", "gone-owner") in tombs
        k = rng.randrange(1, 8)
        parts: list[list] = [[] for _ in range(k)]
        for rid, owner in held.items():
            parts[rng.randrange(k)].append((rid, owner, rng.randrange(3)))
        one = Resolver(held, tombs, salt)
        split = Resolver([UnitIndex(p) for p in parts], tombs, salt)
        names = list(held) + gone_ids + ["nope", "id9999"]
        owners = sorted(set(held.values())) + ["gone-owner", "nobody"]
        for _ in range(20):
            ids = rng.sample(names, min(len(names), rng.randrange(0, 6)))
            os_ = rng.sample(owners, min(len(owners), rng.randrange(0, 4)))
            a, b = one.resolve(ids, os_), split.resolve(ids, os_)
            assert (a[0], sorted(a[1]), sorted(a[2])) == (b[0], sorted(b[1]), sorted(b[2])), (trial, ids, os_)
            assert one.owners_held(os_) == split.owners_held(os_)


def _flip(store, key: str, at: int = 5) -> None:
    path = os.path.join(store.root, *key.split("/"))
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))


def test_verify_reads_every_unit_from_the_store_not_from_this_process(store):
    """A long-lived process (a notebook, a coordinator) keeps the unit objects it parsed;
    verify must still see an object damaged at rest since."""
    run = SisaRun.open(store, "r")
    assert len(run.manifest.units) == 3  # parsed and cached here
    key = head_json(store)["units"][1]["key"]
    _flip(store, key)
    assert SisaRun.open(store, "r").manifest.units  # what the cache still answers for others
    with pytest.raises(IntegrityError) as err:
        run.verify()
    assert key in str(err.value) and "\n" not in str(err.value)


def test_erase_verify_reads_its_units_and_state_from_the_store(tmp_path):
    from erase.config import EraseConfig
    from erase.run import EraseRun

    store = LocalStore(str(tmp_path / "e"))
    run = EraseRun.train(store, "e", synthetic_records(40, owners_every=2),
                         EraseConfig(embedder="tiny", partitions=2, shots=2, seed=1))
    assert run.verify()["exact"]  # the model and every unit are now this process's
    top = json.loads(store.get(json.loads(store.get("e/HEAD"))["manifest"]))
    _flip(store, top["state"], at=200)  # the head's clustering state (safetensors), damaged at rest
    report = run.verify()
    assert not report["exact"] and any(top["state"] in p for p in report["problems"]), report["problems"]
    _flip(store, top["units"][0]["key"])
    with pytest.raises(IntegrityError) as err:
        run.verify()
    assert top["units"][0]["key"] in str(err.value)
