"""`unlearn audit`: after an exact deletion every figure equals the reference's (same bits,
same numbers); an approximate run's do not; every kind of run can be audited; bad input is
one line. Plus the pure measures (AUC, scores, quantization) on their own."""
import json

import numpy as np
import pytest
import torch

from cluster.audit import audit
from cluster.cli import main
from core.errors import UnlearnError
from core.membership import Scored, auc, fake_quantize, knowledge, mean_distribution, membership, min_k_score
from core.sources import load_records
from core.store import LocalStore
from sisa.config import SisaConfig
from sisa.run import SisaRun

FACTS = "dataset:facts?people=8&facts=3&forget=0.25"
LM = dict(shards=2, slices=2, model="tiny-lm", epochs="2", batch_size=4, max_length=32, seed=3,
          extra={"objective": "lm"})


def facts(split: str, paraphrased: bool = False):
    return load_records(f"{FACTS}&split={split}" + ("&paraphrased=1" if paraphrased else ""))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A (trained on all, then the forget owners deleted), B (trained on the rest), C (on
    all, nothing deleted), in one store."""
    store = LocalStore(str(tmp_path_factory.mktemp("audit")))
    forget = facts("forget")
    a = SisaRun.train(store, "a", facts("train"), SisaConfig(**LM))
    a.delete(owners=sorted({r.owner for r in forget}))
    SisaRun.train(store, "b", facts("retain"), SisaConfig(**LM))
    SisaRun.train(store, "c", facts("train"), SisaConfig(**LM))
    return store


def test_after_an_exact_deletion_every_figure_equals_the_reference(runs):
    out = audit(runs, "a", facts("forget"), facts("holdout"), facts("forget", True), reference="b", relearn_steps=3)
    assert out["identical_to_reference"] is True
    assert all(v == 0 for v in out["membership_gap"].values())
    sub, ref = out["subject"], out["reference"]
    assert sub["knowledge"] == ref["knowledge"] and sub["relearn"] == ref["relearn"]
    assert sub["quantization"] == ref["quantization"] and sub["relearn"]["attack_records"] == 1
    assert out["forget_records"] == 6 and out["paraphrased_records"] == 6 and out["retain_records"] == 18
    # not vacuous: the run that still holds the forget set differs from the reference
    before = audit(runs, "c", facts("forget"), facts("holdout"), reference="b", relearn_steps=1, retain_sample=4)
    assert before["identical_to_reference"] is False
    assert before["subject"]["knowledge"]["forget"] != before["reference"]["knowledge"]["forget"]
    # the relearning attack moved the shard models (an attack that could fail)
    assert sub["relearn"]["after"]["mean_logprob"] != sub["relearn"]["before"]["mean_logprob"]


def test_the_relearning_attack_starts_from_the_weights_alone(runs):
    """An attacker holds the weights, not the optimizer. Seen: each shard was fine-tuned with
    the Adam moments its state stored from training, which an approximate run's unlearned state
    does not keep: approximate runs and their references were attacked with different optimizers."""
    from sisa.audit import ShardModels
    from sisa.checkpoint import state_digest

    models = ShardModels(SisaRun.open(runs, "c"))
    states = models.states()
    assert all(any(k.startswith("opt.") for k in s) for s in states)
    bare = [{k: v for k, v in s.items() if not k.startswith("opt.")} for s in states]
    attack = facts("forget")[:2]
    assert ([state_digest(s) for s in models.relearned(states, attack, 2, 1e-3)]
            == [state_digest(s) for s in models.relearned(bare, attack, 2, 1e-3)])


def test_audit_cli_json_plot_and_text(runs, tmp_path, capsys):
    plot = tmp_path / "audit.png"
    argv = ["audit", "--run", "a", "--store", runs.root, "--forget", f"{FACTS}&split=forget",
            "--holdout", f"{FACTS}&split=holdout", "--reference", "b", "--relearn-steps", "2", "--retain-sample", "6", "--quiet"]
    assert main([*argv, "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical_to_reference"] and out["subject"]["relearn"]["steps"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "membership AUC (loss)" in text and text.rstrip().endswith("every figure equals the reference's")


def test_audit_bad_input_is_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text(json.dumps({"id": "nobody-1", "prompt": "Q?", "completion": " A."}) + "\n")
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"id": "person-003-birthplace", "text": "Q?", "label": "x"}) + "\n")
    base = ["audit", "--store", runs.root, "--quiet"]
    forget, holdout = f"{FACTS}&split=forget", f"{FACTS}&split=holdout"
    for argv, message in [
        (["--run", "nope", "--forget", forget, "--holdout", holdout], "nope"),
        (["--run", "a", "--forget", str(stranger), "--holdout", holdout], 'id "nobody-1": run "a" never held it'),
        (["--run", "a", "--forget", str(empty), "--holdout", holdout], "empty.jsonl"),
        (["--run", "a", "--forget", forget, "--holdout", str(empty)], "empty.jsonl"),
        (["--run", "a", "--forget", forget, "--holdout", f"{FACTS}&split=retain"], "the holdout set must be"),
        (["--run", "a", "--forget", str(labelled), "--holdout", holdout], "has no completion"),
        (["--run", "a", "--forget", forget, "--holdout", holdout, "--reference", "c"],
         'reference run "c" holds forget record'),
        # seen: the run as its own reference, "every figure equals the reference's" whatever it still knew
        (["--run", "a", "--forget", forget, "--holdout", holdout, "--reference", "a"], '--reference "a" is the run audited'),
        (["--run", "a", "--forget", forget, "--holdout", holdout, "--plot", str(tmp_path / "no" / "x.png")],
         "--plot"),
        # seen: matplotlib's ValueError as a traceback, after the whole audit had run
        (["--run", "a", "--forget", forget, "--holdout", holdout, "--plot", str(tmp_path / "x.xyz")],
         "cannot write a 'xyz' image"),
    ]:
        code = main([*base, *argv])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and message in err, (argv, code, err)


def test_an_approximate_run_is_audited_and_differs_from_the_reference(tmp_path):
    store = LocalStore(str(tmp_path))
    forget = facts("forget")
    approx = {"objective": "lm", "approx": {"method": "gd-sine", "steps": 4, "lr": 0.02}}
    run = SisaRun.train(store, "x", facts("train"), SisaConfig(**{**LM, "shards": 1, "slices": 1, "extra": approx}))
    run.delete(owners=sorted({r.owner for r in forget}))
    SisaRun.train(store, "r", facts("retain"), SisaConfig(**{**LM, "shards": 1, "slices": 1}))
    out = audit(store, "x", forget, facts("holdout"), reference="r", relearn_steps=2)
    assert out["subject"]["method"] == "approx (gd-sine)" and out["reference"]["method"] == "sisa (lm, S=1)"
    assert out["identical_to_reference"] is False
    assert set(out["subject"]["quantization"]) == {"8bit", "4bit"}
    # an approximate run that unlearned the forget set is no reference: its model may still hold it
    SisaRun.train(store, "all", facts("train"), SisaConfig(**{**LM, "shards": 1, "slices": 1}))
    with pytest.raises(UnlearnError, match='reference run "x" is approximate and unlearned forget record'):
        audit(store, "all", forget, facts("holdout"), reference="x")


def test_classifier_and_erase_runs_are_audited(tmp_path, capsys):
    from conftest import synthetic_records, write_jsonl

    records = synthetic_records(60, owners_every=3)
    forget = [r for r in records if r.owner == records[0].owner]
    holdout = synthetic_records(70, owners_every=3)[60:]
    holdout = [type(r)(f"h-{r.id}", r.text, r.label, f"h-{r.owner}") for r in holdout]
    data, f, h = (write_jsonl(tmp_path / n, recs) for n, recs in
                  (("d.jsonl", records), ("f.jsonl", forget), ("h.jsonl", holdout)))
    store = str(tmp_path / "s")
    assert main(["train", "--data", data, "--run", "clf", "--store", store, "--model", "tiny", "--shards", "2",
                 "--slices", "1", "--epochs", "1", "--max-length", "16", "--runtime", "local", "--quiet"]) == 0
    assert main(["train", "--method", "erase", "--data", data, "--run", "icl", "--store", store, "--shots", "2",
                 "--embedder", "tiny", "--lm", "tiny-lm", "--runtime", "local", "--quiet"]) == 0
    capsys.readouterr()
    for run in ("clf", "icl"):
        assert main(["audit", "--run", run, "--store", store, "--forget", f, "--holdout", h, "--json",
                     "--relearn-steps", "1", "--quiet"]) == 0
        out = json.loads(capsys.readouterr().out)["subject"]
        assert out["knowledge"]["forget"]["records"] == len(forget) and 0 <= out["membership"]["loss_auc"] <= 1
        if run == "icl":
            assert "not applicable" in out["relearn"]["skipped"] and "skipped" in out["quantization"]
        else:
            assert out["quantization"]["8bit"]["forget"]["records"] == len(forget)


def test_measures_on_their_own():
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1], [1]) == 0.5 and auc([1, 2], [2, 3]) == 0.125
    assert auc([], [1]) is None
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    s = Scored.from_logprobs(np.log(probs), [0, 1], "q a")
    assert s.top == (True, False) and np.allclose(s.logprobs, np.log([0.7, 0.3]))
    k = knowledge([s])
    assert k["exact_match"] == 0.0 and k["token_accuracy"] == 0.5
    assert min_k_score(Scored((-1.0, -5.0, -2.0, -0.5, -3.0), (True,) * 5, "x")) == -5.0
    m = membership([s], [Scored.from_logprobs(np.log(probs), [2, 0], "q b")])
    # an ensemble is the mean of its members' distributions, kept in logs: no underflow
    lp = mean_distribution([np.array([[0.0, -2000.0]]), np.array([[-3000.0, 0.0]])])
    assert np.allclose(lp, [[np.log(0.5), np.log(0.5)]]) and np.isfinite(mean_distribution(
        [np.array([[-1000.0, 0.0]])] * 2)).all()
    assert set(m) == {"loss_auc", "zlib_auc", "min_k_auc"} and m["loss_auc"] == 1.0
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for bits, group in ((8, None), (4, 32)):
        q = fake_quantize(w, bits, group)
        levels = 2 ** (bits - 1) - 1
        step = w.reshape(16, -1, group or 64).abs().amax(-1, keepdim=True) / levels
        assert ((q - w).reshape(16, -1, group or 64).abs() <= step / 2 + 1e-6).all()
        assert len(torch.unique(q[0, :group or 64])) <= 2 ** bits  # one scale per row or group
