"""An acknowledged deletion is never lost, with real processes: `kill -9` of a command
while it applies, two writers at once, a killed `train`, and predictions from other
processes while a deletion is queued. Every test ends with: no request failed or left
queued, every acknowledged id and text gone from every object, digests equal to a
fresh run on what remains, and no answer from what was quarantined.

The cases share one run (each deletes new records); the killed train runs twice: once
dropped, once trained again over what it left."""
import json
import os
import random

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from proc_helpers import (assert_all_applied, assert_no_trace, assert_sisa_exact, kill9, kill_session, queue,
                          run_cli, shard_of, spawn, wait_until)
from sisa.config import SisaConfig

pytestmark = pytest.mark.integration

CFG = SisaConfig(shards=2, slices=2, model="tiny", epochs="4", batch_size=2, max_length=32, seed=3,
                 labels=("neg", "pos"))
OPTIONS = ["--model", "tiny", "--shards", "2", "--slices", "2", "--epochs", "4", "--batch-size", "2",
           "--max-length", "32", "--seed", "3", "--labels", "neg,pos", "--quiet"]
RECORDS = synthetic_records(240, owners_every=1)


@pytest.fixture(scope="module")
def sisa_run(tmp_path_factory):
    """One SISA run for the module; `deleted` grows as the tests delete."""
    base = tmp_path_factory.mktemp("durable")
    store = str(base / "store")
    data = write_jsonl(base / "d.jsonl", RECORDS)
    assert main(["train", "--data", data, "--run", "r", "--store", store, "--runtime", "local", *OPTIONS]) == 0
    from sisa.run import SisaRun
    from core.store import LocalStore

    digests = [s.digest for s in SisaRun.open(LocalStore(store), "r").manifest.shards]
    return {"store": store, "base": base, "deleted": set(), "rng": random.Random(7), "trained": digests}


def first_slice_victims(state, n: int = 2) -> list[str]:
    """Records of the first slice of different shards, not yet deleted: deleting one
    retrains its whole shard (the longest deletion there is)."""
    from sisa.run import SisaRun
    from core.store import LocalStore

    manifest = SisaRun.open(LocalStore(state["store"]), "r").manifest
    out = []
    for k in range(n):
        shard = manifest.shards[k % len(manifest.shards)]
        out.append(next(i for i in shard.slices[0].ids if i not in state["deleted"] and i not in out))
    return out


def delete_args(state, *ids: str) -> list[str]:
    return ["delete", "--run", "r", "--store", state["store"], "--ids", ",".join(ids), "--json", "--quiet"]


# the Ray variant (80 s on 2 cores) runs in `make test-all`; on Ray in `make test`, the coordinator
# actor killed while applying and shard actors killed mid-retrain are tests/test_ray_faults.py's
@pytest.mark.parametrize("runtime", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_kill_9_while_applying_then_the_next_delete_applies_both(sisa_run, tmp_path, runtime):
    """Seen before: the next delete failed "busy", replayed the request, failed it and
    wiped its ids; the record stayed. Now the dead holder's lock is taken over (or, on
    Ray, the orphaned coordinator finishes first and the next delete waits for it), and
    both requests are applied."""
    state = sisa_run
    first, second = first_slice_victims(state)
    proc = spawn(*delete_args(state, first), runtime=runtime, log=str(tmp_path / "first"))
    entry = wait_until(lambda: [e for e in queue(state["store"], "r").values() if e["status"] == "applying"],
                       120, "the first delete to start applying")[0]
    state["deleted"].add(first)  # acknowledged (it is applying): it must not be lost
    assert entry["ids"] == [first]
    import time

    time.sleep(state["rng"].uniform(0.1, 2.5))  # somewhere inside the retraining
    kill9(proc)  # the command only, as a user would: on Ray its workers may outlive it
    done = run_cli(*delete_args(state, second), runtime=runtime)
    kill_session(proc)  # what is left of the first command's Ray
    assert done.returncode == 0, done.stderr
    state["deleted"].add(second)
    receipt = json.loads(done.stdout)
    assert receipt["status"] == "done" and receipt["ids"] == [second]
    assert_all_applied(state["store"], "r", at_least=2)
    assert_no_trace(state["store"], RECORDS, state["deleted"])
    assert_sisa_exact(state["store"], "r", RECORDS, state["deleted"], CFG, str(tmp_path / "fresh"))


def test_two_writers_at_once_both_succeed(sisa_run, tmp_path):
    """Seen before: both exited "busy", both entries failed with ids wiped, nothing deleted."""
    import time

    state = sisa_run
    a, b = first_slice_victims(state)
    p1 = spawn(*delete_args(state, a), log=str(tmp_path / "a"))
    wait_until(lambda: queue(state["store"], "r"), 60, "the first request to be accepted")
    time.sleep(state["rng"].uniform(0.5, 4.0))
    p2 = spawn(*delete_args(state, b), log=str(tmp_path / "b"))
    assert p1.wait(timeout=300) == 0, open(tmp_path / "a.err").read()
    assert p2.wait(timeout=300) == 0, open(tmp_path / "b.err").read()
    state["deleted"] |= {a, b}
    for name, rid in (("a", a), ("b", b)):
        receipt = json.load(open(tmp_path / f"{name}.out"))
        assert receipt["status"] == "done" and receipt["ids"] == [rid]
    assert_all_applied(state["store"], "r", at_least=2)
    assert_no_trace(state["store"], RECORDS, state["deleted"])
    assert_sisa_exact(state["store"], "r", RECORDS, state["deleted"], CFG, str(tmp_path / "fresh"))


def test_a_queued_deletion_is_withheld_from_predictions_of_every_process(sisa_run, tmp_path, capsys):
    """While a live process holds the run lock (as an applying coordinator does), a
    request accepted by another process waits in the queue; `predict` and `eval` in
    other processes leave its shard out; they never take the lock or apply it."""
    from core.lock import RunLock
    from core.store import LocalStore

    state = sisa_run
    store = LocalStore(state["store"])
    victim = first_slice_victims(state, 1)[0]
    shard = shard_of(state["store"], "r", victim)
    texts = tmp_path / "t.txt"
    texts.write_text("great fun\ndull and flat\n")
    with RunLock(store, "r", "delete") as held:
        proc = spawn(*delete_args(state, victim), log=str(tmp_path / "del"))
        wait_until(lambda: queue(state["store"], "r"), 60, "the request to be accepted")
        state["deleted"].add(victim)
        lock_bytes = store.get("r/LOCK")
        write_jsonl(tmp_path / "e.jsonl", RECORDS[:6])
        for args in (["predict", "--input", str(texts)], ["eval", "--data", str(tmp_path / "e.jsonl")]):
            capsys.readouterr()  # this (test) process is not the one that accepted the request
            assert main([*args, "--run", "r", "--store", state["store"], "--json", "--runtime", "local"]) == 0
            answer = json.loads(capsys.readouterr().out)
            assert answer["quarantined"] == [shard]
            assert shard not in [s if isinstance(s, int) else s["shard"] for s in answer["shards"]]
        entry = list(queue(state["store"], "r").values())[0]
        assert entry["status"] == "pending" and entry["ids"] == [victim]  # nobody else touched it
        assert store.get("r/LOCK") == lock_bytes and held.held
        assert proc.poll() is None  # the delete waits for the lock, it does not fail
    assert proc.wait(timeout=300) == 0, open(tmp_path / "del.err").read()
    assert "another process applies" in open(tmp_path / "del.err").read()
    capsys.readouterr()
    assert main(["predict", "--input", str(texts), "--run", "r", "--store", state["store"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == [0, 1]
    assert_all_applied(state["store"], "r", at_least=1)
    assert_no_trace(state["store"], RECORDS, state["deleted"])


@pytest.mark.parametrize("then", ["drop", "train again"])
def test_a_killed_train_leaves_nothing_behind_drop_or_train_again(sisa_run, tmp_path, then):
    """Seen before: after `kill -9` mid-train, `drop` said "not found" while six objects
    with every training text remained."""
    store = str(tmp_path / "store")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    args = ["train", "--data", data, "--run", "t", "--store", store, *OPTIONS]
    proc = spawn(*args, log=str(tmp_path / "train"))
    wait_until(lambda: os.path.isdir(os.path.join(store, "t", "ckpt")), 120, "a first checkpoint")
    kill9(proc)
    left = [os.path.join(r, f) for r, _d, fs in os.walk(os.path.join(store, "t")) for f in fs]
    assert left and not os.path.exists(os.path.join(store, "t", "HEAD"))
    if then == "train again":  # at once: the dead holder's lock is taken over, leftovers purged
        again = run_cli(*args, "--json")
        assert again.returncode == 0 and "took over the lock of run t" in again.stderr, again.stderr
        # the same records and configuration as the module's run when it was trained
        assert [s["digest"] for s in json.loads(again.stdout)["shards"]] == sisa_run["trained"]
    drop = run_cli("drop", "--run", "t", "--store", store)
    assert drop.returncode == 0, drop.stderr
    assert not os.path.exists(os.path.join(store, "t")), os.listdir(os.path.join(store, "t"))
    assert run_cli("drop", "--run", "t", "--store", store).returncode == 1  # gone: not found


def test_erase_prompt_example_is_withheld_across_processes(tmp_path):
    """ERASE: a prompt example whose deletion is acknowledged (and not yet applied: a live
    process holds the lock) is never in another process's prompt; after the commit the
    state equals a fresh run."""
    from erase.run import EraseRun
    from core.lock import RunLock
    from core.store import LocalStore

    records = synthetic_records(40)
    store_dir = str(tmp_path / "s")
    tiny = ["--embedder", "tiny", "--lm", "tiny-lm", "--shots", "4", "--quiet"]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", store_dir, *tiny]) == 0
    store = LocalStore(store_dir)
    example = EraseRun.open(store, "e").manifest.selected_ids[1]
    texts = tmp_path / "t.txt"
    texts.write_text("a fine film\n")
    with RunLock(store, "e", "delete"):
        proc = spawn("delete", "--run", "e", "--store", store_dir, "--ids", example, "--quiet",
                     log=str(tmp_path / "del"))
        wait_until(lambda: queue(store_dir, "e"), 60, "the request to be accepted")
        out = run_cli("predict", "--run", "e", "--store", store_dir, "--input", str(texts), "--json")
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["withheld_examples"] == [example] and example not in answer["examples"]
        assert proc.poll() is None
    assert proc.wait(timeout=300) == 0, open(tmp_path / "del.err").read()
    assert_all_applied(store_dir, "e", at_least=1)
    assert_no_trace(store_dir, records, {example})
    fresh_dir = str(tmp_path / "fresh")
    retained = write_jsonl(tmp_path / "r.jsonl", [r for r in records if r.id != example])
    assert main(["train", "--method", "erase", "--data", retained, "--run", "e", "--store", fresh_dir, *tiny]) == 0
    got, want = EraseRun.open(store, "e").manifest, EraseRun.open(LocalStore(fresh_dir), "e").manifest
    assert (got.digest, got.selected_ids) == (want.digest, want.selected_ids)
