"""Regressions from review: odd characters, stale handles, locks, vanishing labels, leftovers."""
import json
import re

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from sisa.config import SisaConfig
from core.errors import UnlearnError
from core.lock import RunLock
from core.records import Record
from sisa.run import SisaRun
from core.store import LocalStore

CFG = SisaConfig(shards=2, slices=2, model="tiny", batch_size=4, max_length=32)


def test_unicode_line_separators_in_text_round_trip(tmp_path):
    recs = synthetic_records(10)
    recs[3] = Record(recs[3].id, "line\u2028sep\u2029para\x85next\x0bvt\x1cfs", recs[3].label, recs[3].owner)
    run = SisaRun.train(LocalStore(str(tmp_path)), "r", recs, CFG)
    receipt = run.delete(ids=[recs[3].id])
    assert receipt.ids == [recs[3].id]
    assert run.verify()["exact"]


def test_stale_handles_do_not_lose_deletions(tmp_path):
    store = LocalStore(str(tmp_path))
    recs = synthetic_records(20)
    SisaRun.train(store, "r", recs, CFG)
    first, second = SisaRun.open(store, "r"), SisaRun.open(store, "r")
    first.delete(ids=["r0002"])
    second.delete(ids=["r0011"])  # opened before the first delete committed
    now = SisaRun.open(store, "r")
    held = now.manifest.owners()
    assert "r0002" not in held and "r0011" not in held and now.manifest.version == 3
    assert now.verify()["exact"]


def test_a_locked_run_refuses_writers_with_one_line(tmp_path, capsys):
    store = LocalStore(str(tmp_path))
    SisaRun.train(store, "r", synthetic_records(8), CFG)
    before = sorted(store.list_all("r/"))
    with RunLock(store, "r", "delete"):
        with pytest.raises(UnlearnError, match=r'run "r" is busy: delete by .* since .*unlearn unlock --run r'):
            SisaRun.open(store, "r").delete(ids=["r0001"])
        assert main(["drop", "--run", "r", "--store", str(tmp_path)]) == 1
        assert "is busy" in capsys.readouterr().err
    assert sorted(store.list_all("r/")) == before
    with RunLock(store, "r", "delete"):
        pass
    # a lock left by a dead process is removed by hand
    store.put("r/LOCK", b'{"holder": "gone:1", "command": "delete", "since": "then"}')
    assert main(["unlock", "--run", "r", "--store", str(tmp_path)]) == 0
    assert SisaRun.open(store, "r").delete(ids=["r0001"]).ids == ["r0001"]


def test_deleting_the_last_record_of_a_label_warns_and_stays_reproducible(tmp_path, capsys):
    recs = synthetic_records(16) + [Record("odd1", "meh so so", "meh", "o-odd")]
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    base = ["--store", store, "--model", "tiny", "--shards", "2", "--slices", "2", "--quiet"]
    assert main(["train", "--data", data, "--run", "a", *base]) == 0
    capsys.readouterr()
    assert main(["delete", "--run", "a", "--store", store, "--owners", "o-odd", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    receipt = json.loads(captured.out)
    assert receipt["warnings"] and 'label "meh" has no records left' in captured.err
    rest = write_jsonl(tmp_path / "rest.jsonl", recs[:-1])
    assert main(["train", "--data", rest, "--run", "b", "--labels", "meh,neg,pos", *base]) == 0
    a, b = SisaRun.open(LocalStore(store), "a"), SisaRun.open(LocalStore(store), "b")
    assert [s.digest for s in a.manifest.shards] == [s.digest for s in b.manifest.shards]


def test_leftovers_of_a_killed_write_are_purged_by_the_next_delete(tmp_path):
    store = LocalStore(str(tmp_path))
    run = SisaRun.train(store, "r", synthetic_records(12), CFG)
    leftover = tmp_path / "r" / "data" / ".tmp-killed"
    leftover.write_bytes(b"text of a record being deleted when the process died")
    orphan = "r/ckpt/0000/0009-deadbeef.safetensors"
    store.put(orphan, b"an orphan checkpoint")
    receipt = run.delete(ids=["r0000"])
    assert not leftover.exists() and not store.exists(orphan)
    assert receipt.purged_objects >= 1


def test_unknown_owner_with_ignore_missing_is_not_remembered(tmp_path):
    run = SisaRun.train(LocalStore(str(tmp_path)), "r", synthetic_records(9), CFG)
    first = run.delete(owners=["nobody"], ignore_missing=True)
    assert first.shards == [] and first.already_deleted == []
    with pytest.raises(UnlearnError, match='unknown owner "nobody"'):
        run.delete(owners=["nobody"])


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", float("nan"), "must be a finite number > 0"),
    ("lora_alpha", 0, "must be > 0"),
    ("epochs", "1e9", r"must be in \(0, 1000\]"),
])
def test_config_rejects_nonsense(field, value, message):
    with pytest.raises(UnlearnError, match=f"config field '{field}': {message}"):
        SisaConfig(**{field: value})


@pytest.mark.parametrize("owner,message", [
    ("a,b", "contains a comma"), (" a", "has leading or trailing whitespace"), ("a\u0085", "contains the control character U+0085"),
])
def test_owners_must_be_deletable_from_the_command_line(tmp_path, owner, message):
    from core.sources import load_records

    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": "t", "label": "p", "owner": owner}])
    with pytest.raises(UnlearnError, match=re.escape(f"d.jsonl:1: field 'owner' {message}")):
        load_records(path)
