"""Rough edges a new user hit: receipts as an audit trail, predict's output, the test
model, warnings and broken pipes, and a requests/ folder that grows without bound."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from cluster.cli import main
from cluster.requestlog import RequestLog
from conftest import synthetic_records, write_jsonl
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


