"""ERASE runs end to end through the CLI and the store: exactness against a fresh run on
the retained records, erasure of deleted texts and embeddings, one-line errors, and the
Ray path (partition actors, coordinator, quarantine of prompt examples)."""
import json

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
        assert receipt["selected_ids"] == _status(capsys, store, "e")["selected_ids"]
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
    from core.store import open_store

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
    with pytest.raises(SystemExit) as exc:  # option values are usage errors (exit 2)
        main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", str(store), "--eps", "0", *TINY])
    assert exc.value.code == 2
    assert "argument --eps: must be a number in (0, 1], got 0" in capsys.readouterr().err
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
    from core.store import open_store

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


def test_a_deletion_rewrites_only_its_partition(tmp_path, capsys):
    """Each partition's records and clustering state (with the embeddings) are separate
    objects: a deletion writes new ones for its own partition and keeps the others'."""
    from erase.run import EraseRun, partition_of
    from core.store import open_store

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


def _trained(tmp_path, n=40, shots="4", extra=()):
    from core.store import open_store

    records = synthetic_records(n)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    store = str(tmp_path / "s")
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", store, "--shots", shots,
                 *extra, *TINY]) == 0
    return records, open_store(store)


def _serve(manifest, texts, exclude):
    """A stand-in for the language model: answers with the examples it was given."""
    return {"examples": [i for i in manifest.selected_ids if i not in exclude], "predictions": []}


def test_quarantine_covers_an_example_that_an_applying_batch_selects(tmp_path):
    """A deletion acknowledged while an earlier batch applies may target the record that
    batch is about to select: it must not answer either."""
    import shutil

    from cluster.coordinator import Coordinator
    from erase.run import EraseRun
    from core.store import open_store

    _records, store = _trained(tmp_path)
    old = EraseRun.open(store, "e").manifest.selected_ids
    shutil.copytree(tmp_path / "s", tmp_path / "copy")  # which record replaces old[0]?
    scratch = EraseRun.open(open_store(str(tmp_path / "copy")), "e")
    scratch.delete(ids=[old[0]])
    successor = sorted(set(scratch.manifest.selected_ids) - set(old))[0]
    later = []

    class Run(EraseRun):
        def delete(self, *args, **kwargs):
            later.append(coordinator.submit(ids=[successor]))  # acknowledged mid-batch
            return super().delete(*args, **kwargs)

    coordinator = Coordinator(store, "e", run_factory=lambda: Run.open(store, "e"))
    coordinator.submit(ids=[old[0]])
    assert len(coordinator.apply_due()) == 1 and coordinator.pending() == later
    out = coordinator.predict(["x"], _serve)
    assert successor in coordinator.manifest.selected_ids and successor not in out["examples"]
    assert out["quarantined"] == [successor]


def test_an_answer_is_asked_again_when_its_example_is_deleted_meanwhile(tmp_path):
    """An ERASE batch applies in milliseconds, within one forward pass of the language
    model: a request accepted, applied and released during the answer still voids it."""
    from cluster.coordinator import Coordinator

    _records, store = _trained(tmp_path)
    coordinator = Coordinator(store, "e")
    example = coordinator.manifest.selected_ids[0]
    calls = []

    def serve(manifest, texts, exclude):
        calls.append(manifest.version)
        if len(calls) == 1:
            coordinator.submit(ids=[example])
            coordinator.apply_due()
        return _serve(manifest, texts, exclude)

    out = coordinator.predict(["x"], serve)
    assert calls == [1, 2] and example not in out["examples"]


def test_a_busy_run_keeps_the_request_queued_and_applies_it_once_free(tmp_path):
    """A lock held by a live process is never a reason to fail a request: it stays queued
    with its ids (and quarantined), untouched by this coordinator, until the lock is free."""
    from cluster.coordinator import Coordinator
    from core.lock import RunLock

    _records, store = _trained(tmp_path)
    coordinator = Coordinator(store, "e")
    with RunLock(store, "e", "delete"):  # another process (or coordinator) is applying
        rid = coordinator.submit(ids=["r0003"])
        before = store.get(f"e/queue/{rid}.json")
        assert coordinator.apply_due() == [] and "is busy" in coordinator.busy
        assert store.get(f"e/queue/{rid}.json") == before  # not rewritten, not failed
        assert coordinator.quarantined() == ["r0003"]
    assert [r.request_id for r in coordinator.apply_due()] == [rid]
    done = coordinator.get(rid)
    assert done.status == "done" and done.records_deleted == 1 and done.ids == []
    assert coordinator.quarantined() == [] and store.list_all("e/queue/") == []


def test_a_coordinator_follows_commits_made_outside_it(tmp_path):
    from cluster.coordinator import Coordinator
    from erase.run import EraseRun

    _records, store = _trained(tmp_path)
    coordinator = Coordinator(store, "e")  # e.g. behind `unlearn serve`
    example = coordinator.manifest.selected_ids[0]
    EraseRun.open(store, "e").delete(ids=[example])  # another process, --runtime local
    out = coordinator.predict(["x"], _serve)
    assert example not in out["examples"] and coordinator.manifest.version == 2


def test_no_object_or_log_entry_keeps_a_deleted_id(tmp_path, capsys):
    """Receipts of earlier requests must not name records a later request deletes."""
    records, _store = _trained(tmp_path, n=30, shots="2")
    store = str(tmp_path / "s")
    first = _status(capsys, store, "e")["selected_ids"]
    assert main(["delete", "--run", "e", "--store", store, "--ids", "r0004", "--quiet"]) == 0
    for victim in first:  # prompt examples named by earlier states
        assert main(["delete", "--run", "e", "--store", store, "--ids", victim, "--quiet"]) == 0
    for victim in first + ["r0004"]:
        text = next(r.text for r in records if r.id == victim)
        for p in (tmp_path / "s").rglob("*"):
            if p.is_file():
                assert f'"{victim}"'.encode() not in p.read_bytes() and text.encode() not in p.read_bytes(), p


def test_deleting_every_record_verifies_against_the_clustering_of_nothing(tmp_path, capsys):
    records, _store = _trained(tmp_path, n=12, shots="2")
    store = str(tmp_path / "s")
    ids = ",".join(r.id for r in records)
    assert main(["delete", "--run", "e", "--store", store, "--ids", ids, "--quiet"]) == 0
    assert _status(capsys, store, "e")["selected_ids"] == []
    assert main(["verify", "--run", "e", "--store", store, "--quiet"]) == 0


def test_a_damaged_queue_entry_withholds_every_prompt_example(tmp_path):
    from cluster.coordinator import Coordinator

    _records, store = _trained(tmp_path)
    coordinator = Coordinator(store, "e", window_s=3600)
    rid = coordinator.submit(ids=["r0003"])
    store.put(f"e/queue/{rid}.json", b"{")
    out = coordinator.predict(["x"], _serve)
    assert out["examples"] == [] and out["quarantined"] == sorted(coordinator.manifest.selected_ids)
