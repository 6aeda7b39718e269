"""Exact SISA with the tiny model: deletion equals training from scratch on D \\ X."""
import json

import pytest

from cluster.cli import main
from conftest import synthetic_records, write_jsonl
from sisa import plan
from sisa.config import SisaConfig
from sisa.run import SisaRun
from core.store import LocalStore

CFG = dict(shards=3, slices=4, model="tiny", epochs="2", batch_size=4, max_length=32, seed=5)


def cli_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def pick_deletions(records, config: SisaConfig):
    """Ids from the first, a middle and the last slice of several shards, plus one owner."""
    layout = plan.build_layout(((r.id, r.owner) for r in records), config.seed, config.shards, config.slices)
    owner_of = {r.id: r.owner for r in records}
    ids = []
    for k in (0, 1):
        for j in (0, 1, config.slices - 1):
            if layout[k][j]:
                ids.append(layout[k][j][0])
    owner = next(owner_of[i] for i in layout[2][2] if owner_of[i] not in {owner_of[x] for x in ids})
    return ids, owner, layout


def test_cross_run_exactness_via_cli(tmp_path, capsys):
    records = synthetic_records(72)
    config = SisaConfig(**CFG)
    ids, owner, layout = pick_deletions(records, config)
    assert len(ids) >= 5
    data = write_jsonl(tmp_path / "d.jsonl", records)
    common = ["--store", str(tmp_path / "store"), "--model", "tiny", "--shards", "3", "--slices", "4",
              "--epochs", "2", "--batch-size", "4", "--max-length", "32", "--seed", "5"]
    a0 = cli_json(capsys, "train", "--data", data, "--run", "A", *common)
    receipt = cli_json(capsys, "delete", "--run", "A", "--store", str(tmp_path / "store"),
                       "--ids", ",".join(ids))
    receipt2 = cli_json(capsys, "delete", "--run", "A", "--store", str(tmp_path / "store"), "--owners", owner)
    gone = set(ids) | {r.id for r in records if r.owner == owner}
    rest = write_jsonl(tmp_path / "rest.jsonl", [r for r in records if r.id not in gone])
    b = cli_json(capsys, "train", "--data", rest, "--run", "B", *common)
    a = cli_json(capsys, "status", "--run", "A", "--store", str(tmp_path / "store"))

    assert [s["digest"] for s in a["shards"]] == [s["digest"] for s in b["shards"]]
    assert [s["records"] for s in a["shards"]] == [s["records"] for s in b["shards"]]
    assert a["records"] == len(records) - len(gone)
    # the digests did change where records were deleted, so the comparison above is not vacuous
    assert a["shards"][0]["digest"] != a0["shards"][0]["digest"]
    assert receipt["shards"] == [0, 1]
    assert receipt["stages_redone"]["0"][0] == 0 and receipt["stages_redone"]["0"][-1] == 3
    assert receipt2["shards"] == [2] and receipt2["stages_redone"] == {"2": [2, 3]}
    assert receipt["seconds"] >= 0 and receipt["digests"]["0"]["before"] == a0["shards"][0]["digest"]


def test_untouched_shards_keep_digests_and_objects(tmp_path):
    records = synthetic_records(60)
    store = LocalStore(str(tmp_path / "s"))
    run = SisaRun.train(store, "r", records, SisaConfig(**CFG))
    layout = run.manifest.layout()
    victim = layout[1][3][0]  # last slice of shard 1: only stage 3 of shard 1 is redone
    before = {k: store.get(k) for k in store.list("r/ckpt/")}
    digests = [s.digest for s in run.manifest.shards]
    receipt = run.delete(ids=[victim])
    after = {k: store.get(k) for k in store.list("r/ckpt/")}
    assert receipt.shards == [1] and receipt.stages_redone == {"1": [3]}
    for k in (0, 2):
        assert run.manifest.shards[k].digest == digests[k]
        for key in run.manifest.shards[k].checkpoints:
            assert before[key] == after[key]
    # shard 1 reused stages 0..2 and replaced stage 3; the old stage 3 object is purged
    old1 = [key for key in before if key.startswith("r/ckpt/0001/")]
    assert sorted(run.manifest.shards[1].checkpoints[:3]) == sorted(k for k in old1 if "/0003-" not in k)
    assert not any(k in after for k in old1 if "/0003-" in k)
    assert run.manifest.shards[1].digest != digests[1]
    assert SisaRun.open(store, "r").verify(shards=[1])["exact"]


def test_delete_twice_is_harmless_and_unknown_ids_fail_cleanly(tmp_path, capsys):
    records = synthetic_records(30)
    store = LocalStore(str(tmp_path / "s"))
    run = SisaRun.train(store, "r", records, SisaConfig(**{**CFG, "slices": 2}))
    run.delete(ids=["r0001"], owners=["owner005"])
    snapshot = {k: store.get(k) for k in store.list("r/")}
    again = run.delete(ids=["r0001"], owners=["owner005"])
    assert again.shards == [] and sorted(again.already_deleted) == ["owner005", "r0001"]
    assert {k: store.get(k) for k in store.list("r/")} == snapshot

    assert main(["delete", "--run", "r", "--store", str(tmp_path / "s"), "--ids", "r0002,nope", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'unknown id "nope"' in err[0] and "nothing was deleted" in err[0]
    assert {k: store.get(k) for k in store.list("r/")} == snapshot
    assert main(["delete", "--run", "r", "--store", str(tmp_path / "s"), "--ids", "r0002,nope",
                 "--ignore-missing", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == ["r0002"]


def test_verify_detects_a_tampered_checkpoint(tmp_path, capsys):
    from core.tensorfile import read_metadata
    from sisa.checkpoint import dump_state, load_state

    store = LocalStore(str(tmp_path / "s"))
    run = SisaRun.train(store, "r", synthetic_records(24), SisaConfig(**{**CFG, "shards": 2, "slices": 2}))
    key = run.manifest.shards[0].checkpoints[-1]
    blob = store.get(key)
    state = load_state(blob)
    name = sorted(n for n in state if n.startswith("param."))[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-6
    store.put(key, dump_state(state, read_metadata(blob)))
    assert main(["verify", "--run", "r", "--store", str(tmp_path / "s"), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert "shard   0: MISMATCH" in out and "shard   1: bit-identical" in out


def test_crash_mid_delete_leaves_last_commit_readable(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path / "s"))
    run = SisaRun.train(store, "r", synthetic_records(24), SisaConfig(**{**CFG, "shards": 2, "slices": 2}))
    snapshot = {k: store.get(k) for k in store.list("r/")}
    from sisa import trainer

    calls = {"n": 0}
    real = trainer.StageTrainer.train_stage

    def crash_on_second_stage(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, *a, **kw)

    monkeypatch.setattr(trainer.StageTrainer, "train_stage", crash_on_second_stage)
    with pytest.raises(RuntimeError):
        run.delete(ids=[run.manifest.shards[0].slices[0].ids[0]])
    assert {k: store.get(k) for k in store.list("r/")} == snapshot
    monkeypatch.setattr(trainer.StageTrainer, "train_stage", real)
    reopened = SisaRun.open(store, "r")
    assert reopened.manifest.version == 1 and reopened.verify()["exact"]


def test_predict_and_eval(tmp_path, capsys):
    records = synthetic_records(40)
    store_dir = str(tmp_path / "s")
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["train", "--data", data, "--run", "r", "--store", store_dir, "--model", "tiny",
                 "--shards", "2", "--slices", "2", "--quiet"]) == 0
    texts = tmp_path / "t.txt"
    texts.write_text("a great film\nboring and flat\n")
    out = cli_json(capsys, "predict", "--run", "r", "--store", store_dir, "--input", str(texts))
    assert len(out["predictions"]) == 2 and out["shards"] == [0, 1]
    for p in out["predictions"]:
        assert p["label"] in ("neg", "pos") and abs(sum(p["probabilities"].values()) - 1) < 1e-4
    ev = cli_json(capsys, "eval", "--run", "r", "--store", store_dir, "--data", data, "--aggregate", "mean")
    assert ev["records"] == 40 and 0 <= ev["accuracy"] <= 1 and len(ev["shards"]) == 2


def test_verify_re_derives_placement_and_fails_a_run_trained_on_a_wrong_layout(tmp_path, capsys, monkeypatch):
    """A retrain on the manifest's layout reproduces its digests even if the layout is wrong
    (here: every owner one shard off), so verify must place records from their owners."""
    real = plan.place
    monkeypatch.setattr(plan, "place", lambda owner, seed, shards, slices: plan.Placement(
        (real(owner, seed, shards, slices).shard + 1) % shards, real(owner, seed, shards, slices).slice))
    SisaRun.train(LocalStore(str(tmp_path / "s")), "r", synthetic_records(24),
                  SisaConfig(**{**CFG, "shards": 2, "slices": 2}))
    monkeypatch.setattr(plan, "place", real)
    assert main(["verify", "--run", "r", "--store", str(tmp_path / "s"), "--quiet"]) == 3
    out = capsys.readouterr().out
    assert "shard   0: MISMATCH: record" in out and "placement by owner puts it in shard 0" in out
