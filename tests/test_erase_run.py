"""ERASE runs end to end through the CLI and the store: exactness against a fresh run on
the retained records, erasure of deleted texts and embeddings, one-line errors, and the
Ray path (partition actors, coordinator, quarantine of prompt examples)."""
import json
import os

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl

TINY = ["--embedder", "tiny", "--lm", "tiny-lm", "--quiet"]


def _status(capsys, store, run) -> dict:
    capsys.readouterr()
    assert main(["status", "--run", run, "--store", store, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _fresh(tmp_path, capsys, records, options, name) -> dict:
    """status --json of a run trained from scratch on `records`."""
    store = str(tmp_path / f"fresh-{name}")
    data = write_jsonl(tmp_path / f"{name}.jsonl", records)
    assert main(["train", "--method", "erase", "--data", data, "--run", "f", "--store", store, *options, *TINY]) == 0
    return _status(capsys, store, "f")


@pytest.mark.parametrize("options", [["--shots", "4", "--partitions", "2", "--labels", "neg,pos"],
                                     ["--shots", "3", "--no-per-label", "--eps", "0.02"]],
                         ids=["per-label-P2", "all-P1"])
def test_deletions_equal_a_fresh_run_on_the_retained_records(tmp_path, capsys, options):
    records = synthetic_records(48, owners_every=3)
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", store, *options, *TINY]) == 0
    deleted: set[str] = set()
    selected = _status(capsys, store, "e")["selected_ids"]
    owner = records[10].owner
    steps = [["--ids", "r0007"],  # an ordinary record
             ["--ids", selected[0]],  # a prompt example
             ["--owners", owner]]  # a whole data owner
    for step in steps:
        capsys.readouterr()
        assert main(["delete", "--run", "e", "--store", store, "--json", *step, "--quiet"]) == 0
        receipt = json.loads(capsys.readouterr().out)
        deleted |= set(receipt["ids"])
        assert receipt["details"]["selected_ids"] == _status(capsys, store, "e")["selected_ids"]
    assert deleted >= {"r0007", selected[0]} | {r.id for r in records if r.owner == owner}
    got = _status(capsys, store, "e")
    want = _fresh(tmp_path, capsys, [r for r in records if r.id not in deleted], options, "retained")
    assert got["selected_ids"] == want["selected_ids"] and selected[0] not in got["selected_ids"]
    assert got["digest"] == want["digest"] and got["records"] == want["records"] == len(records) - len(deleted)
    assert main(["verify", "--run", "e", "--store", store, "--quiet"]) == 0


def test_deleted_texts_ids_and_embeddings_leave_the_store(tmp_path, capsys):
    records = synthetic_records(30)
    store = tmp_path / "s"
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", str(store),
                 "--shots", "2", *TINY]) == 0
    victim = records[5]
    assert main(["delete", "--run", "e", "--store", str(store), "--ids", victim.id, "--quiet"]) == 0
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in files)
    for p in files:
        blob = p.read_bytes()
        assert victim.text.encode() not in blob and f'"{victim.id}"'.encode() not in blob, p
    # the state the run keeps holds one embedding per retained record, and no more
    from erase.run import EraseRun
    from sisa.store import open_store

    run = EraseRun.open(open_store(str(store)), "e")
    assert victim.id not in run.model().ids and len(run.model().ids) == len(records) - 1


def test_bad_erase_input_is_one_line_and_leaves_the_store_unchanged(tmp_path, capsys):
    store = tmp_path / "s"
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(20))
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", str(store),
                 "--shots", "1", *TINY]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "unlearn: error: config field 'shots': 1 shots cannot show each of the 2 labels; "
        "raise --shots or pass --no-per-label"]
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", str(store),
                 "--eps", "0", *TINY]) == 1
    assert "config field 'eps': must be > 0, got 0" in capsys.readouterr().err
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", str(store),
                 "--shots", "2", *TINY]) == 0
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["delete", "--run", "e", "--store", str(store), "--ids", "r0001,nope", "--quiet"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        'unlearn: error: run "e": unknown id "nope"; request not accepted, nothing was deleted']
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


@pytest.mark.integration
def test_ray_partition_actors_coordinator_and_quarantine(tmp_path, capsys, ray_local, monkeypatch):
    """Partitions in Ray actors, deletions through the coordinator actor: the state equals an
    in-process fresh run, and a prompt example whose deletion is acknowledged never answers."""
    from cluster.runtime import coordinator_actor, ray_get, wait_request
    from sisa.store import open_store

    monkeypatch.setenv("UNLEARN_RUNTIME", "ray")
    records = synthetic_records(40)
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", records)
    options = ["--shots", "4", "--partitions", "2"]
    assert main(["train", "--method", "erase", "--data", data, "--run", "er", "--store", store, *options, *TINY]) == 0
    selected = _status(capsys, store, "er")["selected_ids"]
    handle = coordinator_actor(open_store(store), "er")
    request_id = ray_get(handle.submit.remote([selected[1]], []))
    out = ray_get(handle.predict.remote(["a fine film", "dull"], "vote", False))
    assert selected[1] not in out["examples"] and len(out["predictions"]) == 2
    assert wait_request(handle, request_id)["status"] == "done"
    assert main(["delete", "--run", "er", "--store", store, "--ids", "r0003", "--quiet"]) == 0
    out = ray_get(handle.predict.remote(["a fine film"], "vote", True))
    assert out["quarantined"] == [] and selected[1] not in out["examples"]
    got = _status(capsys, store, "er")
    monkeypatch.setenv("UNLEARN_RUNTIME", "local")
    want = _fresh(tmp_path, capsys, [r for r in records if r.id not in {selected[1], "r0003"}], options, "ray")
    assert (got["digest"], got["selected_ids"]) == (want["digest"], want["selected_ids"])
    assert got["selected_ids"] == out["examples"]
    assert os.environ["UNLEARN_RUNTIME"] == "local"


def test_a_deletion_rewrites_only_its_partition(tmp_path, capsys):
    """Each partition's records and clustering state (with the embeddings) are separate
    objects: a deletion writes new ones for its own partition and keeps the others'."""
    from erase.run import EraseRun, partition_of
    from sisa.store import open_store

    records = synthetic_records(45)
    store = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", store,
                 "--shots", "2", "--partitions", "3", *TINY]) == 0
    before = EraseRun.open(open_store(store), "e").manifest
    victim = next(r.id for r in records if r.id not in before.selected_ids)
    assert main(["delete", "--run", "e", "--store", store, "--ids", victim, "--quiet"]) == 0
    after = EraseRun.open(open_store(store), "e").manifest
    hit = partition_of(before.config, victim)
    for b, a in zip(before.partitions, after.partitions):
        changed = (b.data != a.data, b.state != a.state)
        assert changed == ((True, True) if b.partition == hit else (False, False))
