"""Rough edges a new user hit: receipts as an audit trail, predict's output, the test
model, warnings and broken pipes, and a requests/ folder that grows without bound."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest

from cluster.cli import main
from cluster.coordinator import Coordinator
from cluster.requestlog import DeletionRequest, RequestLog, UnknownRequest
from conftest import synthetic_records, write_jsonl
from core.errors import UnlearnError
from core.store import LocalStore
from sisa.config import SisaConfig
from sisa.run import SisaRun

UNLEARN = os.path.join(os.path.dirname(sys.executable), "unlearn")
RECORDS = synthetic_records(24)
CFG = SisaConfig(shards=3, slices=1, model="tiny", batch_size=8, max_length=16, epochs="1")


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    SisaRun.train(LocalStore(str(root / "s")), "r", RECORDS, CFG)
    return root / "s"


@pytest.fixture
def store(trained_once, tmp_path):
    """A fresh copy of the trained run for each test (training once is the slow part)."""
    shutil.copytree(trained_once, tmp_path / "s")
    return str(tmp_path / "s")


def cli(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def stored_log_bytes(store: str) -> bytes:
    """Every byte of the run's request log as stored (receipts and the day index)."""
    out = b""
    for dirpath, _dirs, files in os.walk(os.path.join(store, "r", "requests")):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out += f.read()
    return out


# -- 1. receipts ----------------------------------------------------------------------------
def test_owners_file_receipt_names_the_owners_and_the_stored_one_does_not(store, tmp_path, capsys):
    owners = tmp_path / "owners.txt"
    owners.write_text("owner001\nowner002\n")
    code, out, _err = cli(capsys, "delete", "--run", "r", "--store", store, "--owners-file", str(owners),
                          "--json", "--quiet")
    receipt = json.loads(out)
    assert code == 0 and receipt["owners"] == ["owner001", "owner002"]
    assert receipt["ids"] == ["r0003", "r0004", "r0005", "r0006", "r0007", "r0008"]
    log = stored_log_bytes(store)
    assert log and b"owner001" not in log and b"r0003" not in log


def test_already_deleted_is_a_list_when_printed_and_a_count_when_stored(store, capsys):
    assert cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0000", "--quiet")[0] == 0
    code, out, _ = cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0000", "--json", "--quiet")
    receipt = json.loads(out)
    assert code == 0 and receipt["already_deleted"] == ["r0000"] and receipt["already_deleted_count"] == 1
    code, out, _ = cli(capsys, "requests", "--run", "r", "--store", store, "--json")
    entries = json.loads(out)["requests"]
    assert [e["already_deleted_count"] for e in entries] == [0, 1]
    assert all("already_deleted" not in e for e in entries)  # one name, one type
    code, text, _ = cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0000", "--quiet")
    assert "already deleted before: r0000" in text
    assert b"r0000" not in stored_log_bytes(store)


def test_ignore_missing_names_what_was_not_found_and_stores_a_count(store, capsys):
    code, out, _ = cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0001,nope,r0002,gone",
                       "--ignore-missing", "--json", "--quiet")
    receipt = json.loads(out)
    assert code == 0 and receipt["ids"] == ["r0001", "r0002"]
    assert receipt["not_found"] == ["nope", "gone"] and receipt["not_found_count"] == 2
    stored = RequestLog(LocalStore(store), "r").get(receipt["request_id"])
    assert (stored.not_found_count, stored.records_deleted, stored.ids) == (2, 2, [])
    assert b"nope" not in stored_log_bytes(store)
    code, text, _ = cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0005,nope", "--ignore-missing",
                        "--quiet")
    assert code == 0 and "not found (never in the run, skipped): nope" in text


def test_library_receipt_lists_not_found(store):
    receipt = SisaRun.open(LocalStore(store), "r").delete(ids=["nope"], owners=["owner003", "nobody"],
                                                          ignore_missing=True)
    assert receipt.not_found == ["nope", "nobody"] and receipt.ids == ["r0009", "r0010", "r0011"]


# -- 2, 3. predict and eval output ---------------------------------------------------------
def test_predict_plain_output_shows_the_votes_that_decided(store, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("good great film\nbad awful plot\n")
    code, out, err = cli(capsys, "predict", "--run", "r", "--store", store, "--input", str(texts), "--quiet")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    for line in lines:
        label, how, _text = line.split("\t")
        m = re.fullmatch(r"votes (pos|neg) (\d)/3, (pos|neg) (\d)/3(; tie broken by mean probability .*)?", how)
        assert m and int(m[2]) + int(m[4]) == 3 and m[2] >= m[4] and (label == m[1] or m[5])
    assert "test model 'tiny'" in err
    code, out, _ = cli(capsys, "predict", "--run", "r", "--store", store, "--input", str(texts), "--quiet",
                       "--aggregate", "mean")
    assert re.match(r"(pos|neg)\tmean probability (pos|neg) [01]\.\d{3}, (pos|neg) [01]\.\d{3} \(votes ", out)
    code, out, _ = cli(capsys, "predict", "--run", "r", "--store", store, "--input", str(texts), "--json")
    preds = json.loads(out)["predictions"]
    assert set(preds[0]) >= {"label", "probabilities", "votes", "text"}


def test_a_vote_that_disagrees_with_the_mean_probability_reads_as_a_vote():
    from cluster.cli import _predict_text

    out = {"aggregate": "vote", "shards": [0, 1, 2], "predictions": [
        {"text": "t", "label": "neg", "probabilities": {"neg": 0.4, "pos": 0.6}, "votes": {"neg": 2, "pos": 1}}]}
    assert _predict_text(out) == "neg\tvotes neg 2/3, pos 1/3\tt"


def test_eval_on_the_tiny_model_says_it_is_a_random_test_model(store, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:6])
    code, out, err = cli(capsys, "eval", "--run", "r", "--store", store, "--data", data, "--json", "--quiet")
    assert code == 0 and "accuracy" in json.loads(out)
    assert err.strip().splitlines() == ["unlearn: note: run r uses the test model 'tiny', a fixed random network: "
                                        "its predictions and accuracy mean nothing"]


# -- 4. noise ---------------------------------------------------------------------------------
def test_in_context_prediction_uses_the_current_cache_api():
    import torch

    from erase.icl import InContextClassifier

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clf = InContextClassifier("tiny-lm", labels=["neg", "pos"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for use_cache in (True, False):
                clf.predict_proba([("good", "pos"), ("bad", "neg")], ["fine", "awful film"], use_cache=use_cache)
    finally:
        torch.set_num_threads(before)
    assert [str(w.message) for w in caught if "deprecated" in str(w.message)] == []


def test_output_into_a_closed_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader (`| head -1`) is gone before anything is written
    try:
        proc = subprocess.run([UNLEARN, "plan", "--rate", "1/day", "--records", "100", "--shards", "1", "--slices", "1",
                               "--profile", "tiny"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 1


# -- 5. the requests/ folder --------------------------------------------------------------------
def test_old_receipts_are_compacted_and_still_answer(store, capsys):
    s = LocalStore(store)
    coord = Coordinator(s, "r", receipts_kept=2)
    first = coord.submit(ids=["r0000"])
    coord.apply_due()
    rids = [first]
    for _ in range(5):  # already deleted: receipts without retraining
        rids.append(coord.submit(ids=["r0000"], owners=["owner004"] if len(rids) == 1 else []))
        coord.apply_due()
    receipts = os.listdir(os.path.join(store, "r", "requests"))
    # folded down to 2 whenever more than 2 + a tenth (at least 1) were whole: at 4 and at 6
    assert sorted(receipts) == sorted([f"{r}.json" for r in rids[-2:]] + ["index"])
    old = coord.get(first)
    assert old.status == "done" and old.compacted and old.records_deleted == 1 and old.shards
    assert old.digests == {} and old.version == 2
    assert coord.get(rids[1]).records_deleted == 3 and coord.get(rids[2]).already_deleted_count == 1
    assert [r.request_id for r in coord.log()] == rids
    code, out, _ = cli(capsys, "requests", "--run", "r", "--store", store)
    assert code == 0 and out.count("receipt compacted") == 4 and len(out.strip().splitlines()) == 6
    log = stored_log_bytes(store)
    assert b"r0000" not in log and b"owner004" not in log
    with pytest.raises(UnknownRequest):
        coord.get(f"{int(first[:20]) + 1:020d}-00000000")  # a well-formed id that was never a request


def test_compaction_never_touches_the_queue_and_survives_a_crash(store):
    s = LocalStore(store)
    log = RequestLog(s, "r")
    for n in range(4):
        req = DeletionRequest(request_id=f"{n + 1:020d}-0000000{n}", accepted="2026-01-01T00:00:00+00:00",
                              status="done", records_deleted=n)
        log.finish(req)
    queued = DeletionRequest(request_id=f"{9:020d}-00000009", accepted="2026-01-01T00:00:00+00:00", ids=["r0001"])
    log.append(queued)
    real_delete = s.delete

    def crash(key):
        raise RuntimeError("killed")

    s.delete = crash  # killed after the index was written, before any receipt went
    with pytest.raises(RuntimeError):
        log.compact(kept=1)
    s.delete = real_delete
    entries, problems = log.entries()
    assert problems == [] and [r.records_deleted for r in entries[:4]] == [0, 1, 2, 3]
    assert not entries[0].compacted  # the whole receipt wins while both exist
    assert log.compact(kept=1) == 3  # the next holder finishes the job
    entries, _ = log.entries()
    assert [r.compacted for r in entries] == [True, True, True, False, False]
    assert log.get(queued.request_id).ids == ["r0001"] and log.get(queued.request_id).status == "pending"
    # a queue entry whose receipt was written (and then compacted) before a crash took its
    # cleanup is dropped by the next holder, not applied a second time
    log.append(DeletionRequest(request_id=entries[0].request_id, accepted="x", ids=["r0002"]))
    done = Coordinator(s, "r").apply_due()
    assert [r.request_id for r in done] == [queued.request_id] and done[0].records_deleted == 1
    assert log.queued_keys() == [] and log.get(entries[0].request_id).compacted


def test_a_damaged_receipt_index_is_one_line(store):
    s = LocalStore(store)
    log = RequestLog(s, "r")
    for n in range(3):
        log.finish(DeletionRequest(request_id=f"{n + 1:020d}-0000000{n}", accepted="x", status="done"))
    log.compact(kept=1)
    (key,) = log.index_keys()
    path = os.path.join(store, key)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data.replace(b'"day": "1970-01-01"', b'"day": "1970-01-02"'))  # a flipped bit
    entries, problems = log.entries()
    assert len(entries) == 1 and problems == ['run "r": receipt index "1970-01-01" is damaged '
                                              '(its content does not match its checksum); skipped']
    with pytest.raises(UnlearnError, match='receipt index "1970-01-01" is damaged'):
        log.get(f"{1:020d}-00000000")
    for n in (5, 6):
        log.finish(DeletionRequest(request_id=f"{n:020d}-0000000{n}", accepted="x", status="done"))
    with pytest.raises(UnlearnError, match="receipts not compacted"):  # never written over
        log.compact(kept=1)
    assert len(log.receipt_keys()) == 3


def test_receipts_written_before_the_rename_are_read(store):
    s = LocalStore(store)
    rid = f"{1:020d}-00000001"
    s.put(f"r/requests/{rid}.json", json.dumps({"request_id": rid, "accepted": "x", "status": "done",
                                                "already_deleted": 2}).encode())
    assert RequestLog(s, "r").get(rid).already_deleted_count == 2


def test_temporary_files_in_requests_are_swept_by_the_next_delete(store, capsys):
    root = os.path.join(store, "r")
    planted = [os.path.join(root, "requests", ".tmp-killed"), os.path.join(root, "data", ".tmp-killed"),
               os.path.join(root, ".tmp-head")]
    os.makedirs(os.path.dirname(planted[0]), exist_ok=True)
    for path in planted:
        with open(path, "w") as f:
            f.write('{"ids": ["r0003"]}')
    old = time.time() - 600
    os.utime(planted[2], (old, old))  # a killed HEAD write, minutes ago
    assert cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0003", "--quiet")[0] == 0
    assert [p for p in planted if os.path.exists(p)] == []


KILLED_WRITER = """
import os, signal, sys
from core.store import LocalStore
def die(*a):
    os.kill(os.getpid(), signal.SIGKILL)  # after the temporary file is written, before it becomes the key
os.replace = die
LocalStore(sys.argv[1]).put("r/queue/00000000000000000001-deadbeef.json", b'{"ids": ["r0005"], "owners": ["o9"]}')
"""


def test_a_killed_writers_temporary_file_is_swept_at_once_by_the_next_delete_or_resume(store, capsys):
    """Seen: a writer killed (-9) while rewriting a queue entry left `queue/.tmp-*` naming
    the ids; the next delete and `resume` kept it (only files two minutes old were swept)."""
    from core.store import temporary_prefix

    def killed_writer() -> str:
        proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, store], capture_output=True, timeout=60)
        assert proc.returncode == -9, proc.stderr
        left = [n for n in os.listdir(os.path.join(store, "r", "queue")) if n.startswith(".tmp-") and n != live_name]
        assert len(left) == 1
        return os.path.join(store, "r", "queue", left[0])

    live_name = temporary_prefix() + "live"
    os.makedirs(os.path.join(store, "r", "queue"), exist_ok=True)
    live = os.path.join(store, "r", "queue", live_name)  # this process is writing it: kept
    with open(live, "w") as f:
        f.write("a write in progress")
    dead = killed_writer()
    assert cli(capsys, "delete", "--run", "r", "--store", store, "--ids", "r0003", "--quiet")[0] == 0
    assert not os.path.exists(dead) and os.path.exists(live)
    dead = killed_writer()
    code, out, _err = cli(capsys, "resume", "--run", "r", "--store", store)
    assert code == 0 and "nothing queued" in out
    assert not os.path.exists(dead) and os.path.exists(live)
    os.unlink(live)
    with open(os.path.join(store, "r", "queue", ".tmp-abc123"), "w"):  # no writer named: the age rule
        pass
    assert cli(capsys, "resume", "--run", "r", "--store", store)[0] == 0
    assert os.path.exists(os.path.join(store, "r", "queue", ".tmp-abc123"))
