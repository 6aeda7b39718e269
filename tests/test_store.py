"""The storage interface on every backend, and erasure on a real versioned S3 server."""
import os
import time
import uuid

import pytest

from conftest import synthetic_records
from sisa.config import SisaConfig
from core.errors import UnlearnError
from sisa.run import SisaRun
from core.store import LocalStore, S3Store, open_store


def exercise(store):
    store.put("run/a/x.json", b"1")
    store.put("run/a/y.json", b"2")
    store.put("run/b.json", b"3")
    store.put("other/z", b"4")
    assert store.get("run/a/x.json") == b"1"
    assert store.exists("run/b.json") and not store.exists("run/nope")
    assert store.list("run/") == ["run/a/x.json", "run/a/y.json", "run/b.json"]
    assert store.list("run/a/") == ["run/a/x.json", "run/a/y.json"]
    store.put("run/b.json", b"33")
    assert store.get("run/b.json") == b"33"
    store.prune_versions("run/b.json")
    assert store.get("run/b.json") == b"33"
    store.delete("run/a/x.json")
    store.delete("run/a/x.json")  # deleting twice is fine
    with pytest.raises(KeyError):
        store.get("run/a/x.json")
    assert store.list("run/") == ["run/a/y.json", "run/b.json"]
    with pytest.raises(ValueError):
        store.put("../escape", b"x")
    assert store.put_if_absent("run/LOCK", b"first") and not store.put_if_absent("run/LOCK", b"second")
    assert store.get("run/LOCK") == b"first"
    store.delete("run/LOCK")
    assert store.put_if_absent("run/LOCK", b"third") and store.get("run/LOCK") == b"third"
    store.delete("run/LOCK")


def test_local_store(tmp_path):
    exercise(LocalStore(str(tmp_path)))
    assert not (tmp_path / "run" / "a" / "x.json").exists()


def test_moto_store(moto_server):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    client.create_bucket(Bucket="unit")
    exercise(S3Store("unit", "pre/fix", client=client))
    assert all(o["Key"].startswith("pre/fix/") for o in client.list_objects_v2(Bucket="unit")["Contents"])


def test_open_store_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnlearnError, match="exists and is not a directory"):
        open_store(str(tmp_path / "file"))
    with pytest.raises(UnlearnError, match="unsupported scheme"):
        open_store("gs://bucket")
    with pytest.raises(UnlearnError, match="missing bucket name"):
        open_store("s3://")


def all_versions(client, bucket):
    out = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        out += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    return out


@pytest.mark.integration
def test_seaweedfs_store_with_versioning_and_auth(seaweedfs, s3_bucket):
    client = seaweedfs.client()
    store = open_store(f"s3://{s3_bucket}/p")
    exercise(store)
    keys = [k for k, _ in all_versions(client, s3_bucket)]
    assert "p/run/a/x.json" not in keys  # purged, not just hidden behind a delete marker
    assert keys.count("p/run/b.json") == 1  # overwritten pointer keeps only its current version
    plain = f"u-{uuid.uuid4().hex[:8]}"  # an unversioned bucket takes the same code path
    client.create_bucket(Bucket=plain)
    exercise(open_store(f"s3://{plain}/p"))
    assert "p/run/a/x.json" not in [k for k, _ in all_versions(client, plain)]
    bad = S3Store(s3_bucket, "p", client=seaweedfs.client("wrong", "credentials"))
    with pytest.raises(UnlearnError, match="InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied"):
        bad.get("run/b.json")


@pytest.mark.integration
def test_delete_erases_every_version_on_seaweedfs(seaweedfs, s3_bucket, capsys):
    """After a delete, no object version in the bucket holds a deleted text or a checkpoint
    trained on it; a run trained from scratch without the records has the same digests."""
    client = seaweedfs.client()
    records = synthetic_records(36)
    cfg = SisaConfig(shards=2, slices=3, model="tiny", batch_size=4, max_length=32)
    run = SisaRun.train(open_store(f"s3://{s3_bucket}/runs"), "r", records, cfg)
    layout = run.manifest.layout()
    victim_ids = [layout[0][0][0], layout[1][1][0]]
    victims = [r for r in records if r.id in victim_ids]
    stale = {run.manifest.shards[0].checkpoints[j] for j in range(3)} | {run.manifest.shards[1].checkpoints[j] for j in (1, 2)}
    assert len(all_versions(client, s3_bucket)) > 0
    receipt = run.delete(ids=victim_ids)
    assert receipt.shards == [0, 1] and receipt.purged_objects >= len(stale)

    seen_keys = set()
    for key, version in all_versions(client, s3_bucket):
        seen_keys.add(key)
        body = client.get_object(Bucket=s3_bucket, Key=key, VersionId=version)["Body"].read()
        for r in victims:
            assert r.text.encode() not in body, f"{key}@{version} still holds {r.id}"
    assert not {f"runs/{k}" for k in stale} & seen_keys
    # the old manifests (which listed the deleted ids) are gone too
    manifests = [k for k in seen_keys if "/manifests/" in k]
    assert len(manifests) == 1

    fresh = SisaRun.train(open_store(f"s3://{s3_bucket}/fresh"), "r", [r for r in records if r.id not in victim_ids], cfg)
    assert [s.digest for s in fresh.manifest.shards] == [s.digest for s in SisaRun.open(open_store(f"s3://{s3_bucket}/runs"), "r").manifest.shards]


@pytest.mark.integration
def test_vacuum_makes_deleted_bytes_unreadable_on_disk(seaweedfs, s3_bucket):
    """S3 deletion is not erasure until the volumes are compacted (PLATFORM.md)."""
    secret = os.urandom(4096)  # incompressible, so the bytes land on disk as they are
    marker = secret[:64]
    store = open_store(f"s3://{s3_bucket}/v")
    store.put("blob", secret)

    def on_disk() -> bool:
        for root, _dirs, files in os.walk(os.path.join(seaweedfs.dir, "data")):
            for name in files:
                if name.endswith(".dat"):
                    with open(os.path.join(root, name), "rb") as f:
                        if marker in f.read():
                            return True
        return False

    assert on_disk()
    store.delete("blob")
    # the filer frees chunks asynchronously: compact until the bytes are gone (bounded)
    deadline = time.monotonic() + 90  # seen over 30 s on a loaded 2-core machine
    while on_disk() and time.monotonic() < deadline:
        seaweedfs.vacuum()
        time.sleep(0.5)
    assert not on_disk()


def test_s3_purge_removes_null_versions_and_finishes_interrupted_deletes(moto_server):
    """An object written before versioning was enabled has the version id "null"; a plain
    delete would only hide it. An interrupted purge leaves versions that list() misses."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    bucket = f"v-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    store = S3Store(bucket, "p", client=client)
    store.put("run/old", b"SECRET-1")
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store.put("run/old", b"SECRET-2")
    store.delete("run/old")
    assert all_versions(client, bucket) == []

    store.put("run/half", b"SECRET-3")
    client.delete_object(Bucket=bucket, Key="p/run/half")  # a purge killed after its first call
    assert store.list("run/") == [] and store.list_all("run/") == ["run/half"]
    store.delete("run/half")
    assert store.list_all("run/") == [] and all_versions(client, bucket) == []
    markers = client.list_object_versions(Bucket=bucket).get("DeleteMarkers", [])
    assert markers == []


def test_local_list_all_sees_half_written_files(tmp_path):
    store = LocalStore(str(tmp_path))
    store.put("run/a", b"x")
    (tmp_path / "run" / ".tmp-dead").write_bytes(b"secret text of a killed write")
    assert store.list("run/") == ["run/a"]
    assert store.list_all("run/") == ["run/.tmp-dead", "run/a"]
    store.delete("run/.tmp-dead")
    assert store.list_all("run/") == ["run/a"]


@pytest.mark.integration
def test_create_if_absent_has_one_winner_on_seaweedfs(seaweedfs, s3_bucket):
    """The run lock and its takeover claims rest on this: of racing creators, exactly one wins."""
    import threading

    from core.lock import RunBusy, RunLock

    won, start = [], threading.Barrier(8)

    def race(i):
        store = open_store(f"s3://{s3_bucket}/p")
        start.wait()
        won.append(store.put_if_absent("run/LOCK", str(i).encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]
    store = open_store(f"s3://{s3_bucket}/p")
    store.delete("run/LOCK")
    with RunLock(store, "run", "delete") as lock:  # the lock itself, on the real server
        with pytest.raises(RunBusy):
            RunLock(store, "run", "delete").acquire()
        assert store.exists("run/LOCK") and lock.held
    assert store.list_all("run/") == []
