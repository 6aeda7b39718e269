"""Integrity on read: a corrupted object fails the command that reads it with one line
naming it, `verify` reports it as a mismatch (exit 3), and nothing is built on it or
committed over it (the store is left as it was)."""
import json
import os
import re
import shutil
import uuid

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from sisa.config import SisaConfig
from core.errors import IntegrityError
from core.keys import sha256_hex
from sisa.run import SisaRun
from core.store import LocalStore, S3Store

ERASE = ["--embedder", "tiny", "--lm", "tiny-lm", "--quiet"]


def flip(root, key: str, offset: int = -3) -> None:
    """Bit rot: flip the lowest bit of one byte of a stored object, in place."""
    path = os.path.join(str(root), *key.split("/"))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


def edit(root, key: str, old: bytes, new: bytes) -> None:
    """Change an object's content in place, keeping its name."""
    path = os.path.join(str(root), *key.split("/"))
    with open(path, "rb") as f:
        data = f.read()
    assert old in data
    with open(path, "wb") as f:
        f.write(data.replace(old, new, 1))


def snapshot(root, only: tuple[str, ...] = ()) -> dict:
    """Every file under the store (or only those under the given prefixes), with its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(str(root)):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), str(root)).replace(os.sep, "/")
            if not only or rel.startswith(only):
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[rel] = f.read()
    return out


# the committed run: what a failed deletion must leave as it was (the coordinator's request
# log next to it records the failure)
COMMITTED = ("e/HEAD", "e/manifests/", "e/data/", "e/state/")


def one_error_line(capsys) -> str:
    """The one error line on stderr (progress notes such as "request ... accepted" aside)."""
    err = capsys.readouterr().err
    errors = [line for line in err.strip().splitlines() if line.startswith("unlearn: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def sisa_template(tmp_path_factory):
    """One small SISA run (2 shards x 3 slices), trained once and copied by each test."""
    root = tmp_path_factory.mktemp("sisa") / "s"
    SisaRun.train(LocalStore(str(root)), "r", synthetic_records(36),
                  SisaConfig(shards=2, slices=3, model="tiny", batch_size=4, max_length=32))
    return root


@pytest.fixture
def sisa_store(sisa_template, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(sisa_template, root)
    return LocalStore(str(root)), root


def test_store_checks_content_addressed_names_on_read(tmp_path):
    store = LocalStore(str(tmp_path))
    data = b'{"id": "a"}\n'
    key = f"r/data/{sha256_hex(data)}.jsonl"
    store.put(key, data)
    assert store.get(key) == data
    edit(tmp_path, key, b'"a"', b'"b"')
    with pytest.raises(IntegrityError) as err:
        store.get(key)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and sha256_hex(b'{"id": "b"}\n')[:16] in msg
    # other names are not content-addressed: pointers, checkpoints (stage-prefixed), logs
    for other in ("r/HEAD", f"r/ckpt/0000/0001-{'0' * 64}.safetensors", f"r/data/{'A' * 64}.jsonl"):
        store.put(other, b"anything")
        assert store.get(other) == b"anything"


def test_s3_get_checks_content_addressed_objects(moto_server):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    bucket = f"i-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    store = S3Store(bucket, "p", client=client)
    data = b"tensor bytes"
    key = f"r/state/{sha256_hex(data)}.safetensors"
    store.put(key, data)
    assert store.get(key) == data
    client.put_object(Bucket=bucket, Key=f"p/{key}", Body=b"tensor bytez")  # rot behind the store's back
    with pytest.raises(IntegrityError, match=re.escape(f"store {store.uri}: object {key} is corrupted")):
        store.get(key)


def test_flipped_byte_in_the_last_checkpoint_fails_predict_and_verify_reports_it(sisa_store, tmp_path, capsys):
    store, root = sisa_store
    key = SisaRun.open(store, "r").manifest.shards[1].checkpoints[-1]
    flip(root, key)
    with pytest.raises(IntegrityError, match=re.escape(key)):
        SisaRun.open(store, "r").predict(["a great film"])

    texts = tmp_path / "t.txt"
    texts.write_text("a great film\n")
    capsys.readouterr()
    assert main(["predict", "--run", "r", "--store", str(root), "--input", str(texts), "--quiet"]) == 1
    line = one_error_line(capsys)
    assert key in line and "corrupted" in line

    assert main(["verify", "--run", "r", "--store", str(root), "--shard", "1", "--json", "--quiet"]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (shard,) = json.loads(captured.out)["shards"]
    assert not shard["match"] and shard["stages"][-1]["retrained"] == shard["stages"][-1]["expected"]
    assert any(f"stored checkpoint {key} is corrupted" in p for p in shard["problems"])


def test_a_corrupted_restore_point_is_not_built_on(sisa_store):
    store, root = sisa_store
    run = SisaRun.open(store, "r")
    entry = next(s for s in run.manifest.shards if s.slices[1].ids)
    key = entry.checkpoints[0]  # the restore point of a deletion in slice 1; not the final state
    flip(root, key)
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=re.escape(key)):
        run.delete(ids=[entry.slices[1].ids[0]])
    assert snapshot(root) == before  # same HEAD, same objects, same bytes


def test_an_edited_text_in_a_slice_fails_delete_and_verify_names_the_slice(sisa_store, capsys):
    store, root = sisa_store
    run = SisaRun.open(store, "r")
    entry = next(s for s in run.manifest.shards if s.slices[0].ids and s.slices[-1].ids)
    data_key = entry.slices[0].data
    edit(root, data_key, b'"text": "', b'"text": "X')  # the name still claims the old content
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=re.escape(data_key)):
        run.delete(ids=[entry.slices[-1].ids[0]])  # another slice of the same shard
    assert snapshot(root) == before

    capsys.readouterr()
    assert main(["verify", "--run", "r", "--store", str(root), "--shard", str(entry.shard), "--quiet"]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"shard {entry.shard:>3}: MISMATCH" in captured.out and "slice 0:" in captured.out
    assert data_key in captured.out and "corrupted" in captured.out
    assert snapshot(root) == before


def test_slice_records_that_differ_from_the_manifest_are_reported_and_not_built_on(sisa_store, capsys):
    """The slice object is intact, but the committed manifest says another owner holds a
    record: verify compares owners and label counts too, and a deletion refuses the shard."""
    store, root = sisa_store
    run = SisaRun.open(store, "r")
    entry = next(s for s in run.manifest.shards if s.slices[0].ids)
    entry.slices[0].owners[0] = "someone-else"
    run._commit(run.manifest)
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=re.escape(f"{entry.slices[0].data}: stored owners differ")):
        SisaRun.open(store, "r").delete(ids=[entry.slices[0].ids[-1]])
    assert snapshot(root) == before
    capsys.readouterr()
    assert main(["verify", "--run", "r", "--store", str(root), "--shard", str(entry.shard), "--json", "--quiet"]) == 3
    (shard,) = json.loads(capsys.readouterr().out)["shards"]
    assert shard["problems"] == [f"slice 0: stored owners differ from the manifest ({entry.slices[0].data})"]


def test_a_corrupted_manifest_is_one_line(sisa_store, capsys):
    store, root = sisa_store
    mkey = json.loads(store.get("r/HEAD"))["manifest"]
    edit(root, mkey, b'"version":1', b'"version":9')  # still valid JSON, a different manifest
    capsys.readouterr()
    assert main(["status", "--run", "r", "--store", str(root)]) == 1
    line = one_error_line(capsys)
    assert mkey in line and "corrupted" in line


@pytest.fixture(scope="module")
def erase_template(tmp_path_factory):
    """One small ERASE run (2 partitions), trained once and copied by each test."""
    base = tmp_path_factory.mktemp("erase")
    data = write_jsonl(base / "d.jsonl", synthetic_records(30))
    root = base / "s"
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", str(root),
                 "--shots", "2", "--partitions", "2", *ERASE]) == 0
    return root


@pytest.mark.parametrize("what", ["state", "data"])
def test_erase_corrupted_objects_fail_cleanly_and_change_nothing(erase_template, tmp_path, capsys, what):
    from erase.run import EraseRun

    root = tmp_path / "s"
    shutil.copytree(erase_template, root)
    part = EraseRun.open(LocalStore(str(root)), "e").manifest.partitions[0]
    if what == "state":
        key = part.state
        flip(root, key)
    else:
        key = part.data
        label = b'"label": "pos"' if b'"label": "pos"' in (root / key).read_bytes() else b'"label": "neg"'
        edit(root, key, label, b'"label": "neg"' if label.endswith(b'pos"') else b'"label": "pos"')
    before = snapshot(root, COMMITTED)
    capsys.readouterr()

    assert main(["status", "--run", "e", "--store", str(root), "--quiet"]) == 0  # reads the manifest only
    capsys.readouterr()
    assert main(["verify", "--run", "e", "--store", str(root), "--quiet"]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert len(captured.out.strip().splitlines()) == 1 and key in captured.out and "corrupted" in captured.out
    assert main(["delete", "--run", "e", "--store", str(root), "--ids", part.ids[0], "--quiet"]) == 1
    line = one_error_line(capsys)
    assert key in line and "corrupted" in line
    assert snapshot(root, COMMITTED) == before


def test_erase_verify_compares_partition_records_with_the_manifest(erase_template, tmp_path, capsys):
    from erase.run import EraseRun

    root = tmp_path / "s"
    shutil.copytree(erase_template, root)
    run = EraseRun.open(LocalStore(str(root)), "e")
    part = run.manifest.partitions[1]
    label = sorted(part.label_counts)[0]
    part.label_counts[label] += 1  # the manifest now claims one record too many
    run._commit(run.manifest)
    capsys.readouterr()
    assert main(["verify", "--run", "e", "--store", str(root), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert f"partition 1: stored label counts differ from the manifest ({part.data})" in out
    assert main(["delete", "--run", "e", "--store", str(root), "--ids", part.ids[0], "--quiet"]) == 1
    assert "stored label counts differ" in one_error_line(capsys)


def test_a_deletion_that_fails_on_damage_keeps_its_request_and_quarantine_until_retried(tmp_path, capsys):
    """A permanent failure (a damaged restore point) marks the request failed but keeps its
    ids and its quarantine: the shard does not answer, and `resume --retry-failed` applies
    it once the object is restored; the result equals a fresh run."""
    records = synthetic_records(40, owners_every=1)
    config = SisaConfig(shards=2, slices=2, model="tiny", batch_size=4, max_length=32, labels=("neg", "pos"))
    store_dir = tmp_path / "s"
    store = LocalStore(str(store_dir))
    run = SisaRun.train(store, "r", records, config)
    shard = run.manifest.shards[0]
    victim = shard.slices[1].ids[0]  # restores from the checkpoint after stage 0
    path = os.path.join(str(store_dir), *shard.checkpoints[0].split("/"))
    original = open(path, "rb").read()
    flip(store_dir, shard.checkpoints[0])
    capsys.readouterr()
    assert main(["delete", "--run", "r", "--store", str(store_dir), "--ids", victim, "--quiet"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unlearn: error")]
    assert len(err) == 1 and shard.checkpoints[0] in err[0] and "--retry-failed" in err[0], err
    (entry,) = [e for k in store.list("r/queue/") for e in json.loads(store.get(k))["requests"]]
    assert entry["status"] == "failed" and entry["ids"] == [victim] and entry["units"] == [0]
    texts = tmp_path / "t.txt"
    texts.write_text("great fun\n")
    assert main(["predict", "--run", "r", "--store", str(store_dir), "--input", str(texts), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["shards"] == [1] and answer["quarantined"] == [0]
    with open(path, "wb") as f:  # repaired (from a backup)
        f.write(original)
    assert main(["resume", "--run", "r", "--store", str(store_dir), "--retry-failed", "--json", "--quiet"]) == 0
    (done,) = json.loads(capsys.readouterr().out)["requests"]
    assert done["status"] == "done" and done["records_deleted"] == 1 and done["attempts"] == 2
    assert store.list_all("r/queue/") == []
    fresh = SisaRun.train(LocalStore(str(tmp_path / "f")), "r", [r for r in records if r.id != victim], config)
    assert [s.digest for s in SisaRun.open(store, "r").manifest.shards] == [s.digest for s in fresh.manifest.shards]
