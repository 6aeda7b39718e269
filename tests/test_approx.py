"""Approximate unlearning baselines (GA, GD, GD+Sine) on tiny-lm: they move the model the
expected way on the forget set, GD+Sine's MLP update stays within its bound under long
ascent, and an approximate run says everywhere that it is not verifiable."""
import numpy as np
import pytest
import torch

from core.errors import UnlearnError
from core.store import LocalStore
from sisa.approx.config import ApproxConfig
from sisa.approx.layer import DeltaLinear
from sisa.approx.unlearn import attach_deltas, attached
from sisa.config import SisaConfig
from sisa.run import SisaRun
from sisa.shard import ShardWorker
from test_sisa_lm import qa_records

BASE = dict(shards=1, slices=1, model="tiny-lm", epochs="3", batch_size=4, max_length=32, seed=5)


def approx_config(method: str, **over) -> SisaConfig:
    approx = {"method": method, "steps": 6, "lr": 0.02, "batch_size": 4, **over}
    return SisaConfig(**BASE, extra={"objective": "lm", "approx": approx})


def mean_logprob(store, run: SisaRun, records) -> float:
    worker = ShardWorker(store, run.name, run.config)
    _key, state = worker.serving_state(run.manifest.shards[0])
    return float(np.mean([lp.mean() for lp in worker.trainer.completion_logprobs(state, records)]))


@pytest.fixture(scope="module")
def records():
    return qa_records(30)


@pytest.mark.parametrize("method", ["ga", "gd", "gd-sine"])
def test_each_method_lowers_what_the_model_knows_of_the_forget_set(tmp_path, records, method):
    store = LocalStore(str(tmp_path))
    run = SisaRun.train(store, "a", records, approx_config(method))
    owner = records[0].owner
    forget = [r for r in records if r.owner == owner]
    before = mean_logprob(store, run, forget)
    before_digest = run.manifest.shards[0].digest
    receipt = run.delete(owners=[owner])
    assert sorted(receipt.ids) == sorted(r.id for r in forget)
    assert any(w.startswith("approximate: not verifiable") for w in receipt.warnings)
    after = mean_logprob(store, run, forget)
    assert after < before - 0.05, (method, before, after)  # the forget set got less likely
    assert run.manifest.shards[0].digest != before_digest and run.manifest.records == len(records) - len(forget)
    # the deleted records are gone from the store; the state holds the adapter plus the deltas
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*.jsonl"))
    assert all(r.id.encode() not in blob for r in forget)
    worker = ShardWorker(store, "a", run.config)
    _key, state = worker.serving_state(run.manifest.shards[0])
    assert any(k.startswith("delta.") for k in state) and any(k.startswith("param.") for k in state)
    # and it says so: status, verify
    assert run.status()["approximate"].startswith("approximate: not verifiable (" + method)
    with pytest.raises(UnlearnError, match="is approximate .*not verifiable"):
        run.verify()


def test_an_approximate_deletion_is_deterministic_and_continues_from_its_deltas(tmp_path, records):
    digests = []
    for name in ("x", "y"):
        store = LocalStore(str(tmp_path / name))
        run = SisaRun.train(store, "a", records, approx_config("gd"))
        run.delete(ids=[records[3].id])
        first = run.manifest.shards[0].digest
        run.delete(ids=[records[4].id])
        digests.append((first, run.manifest.shards[0].digest))
    assert digests[0] == digests[1] and digests[0][0] != digests[0][1]


def test_gd_sine_keeps_the_mlp_update_within_its_bound_under_long_ascent():
    """Property: whatever A and B become, every entry of a bounded delta's update stays
    within (alpha/r)/sqrt(d_in); a plain delta under the same ascent grows past it."""
    torch.manual_seed(0)
    config = ApproxConfig(method="gd-sine", rank=4, alpha=8, omega=100.0)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        layer = torch.nn.Linear(24, 40)
        bounded = DeltaLinear(layer, 24, 40, config.rank, config.scale, config.omega)
        plain = DeltaLinear(layer, 24, 40, config.rank, config.scale, None)
        for d in (bounded, plain):
            with torch.no_grad():
                d.A.copy_(torch.randn(d.A.shape, generator=gen))
        # Adam: a step moves a parameter by about lr at most, so A and B grow far (to tens)
        # yet stay finite; it is dW the sine bounds, not A and B
        opt = torch.optim.Adam([bounded.A, bounded.B, plain.A, plain.B], lr=0.1)
        x = torch.randn(16, 24, generator=gen)
        for _ in range(150):  # ascent: push the outputs (and with them the update) ever larger
            opt.zero_grad()
            loss = -(bounded(x).pow(2).mean() + plain(x).pow(2).mean())
            loss.backward()
            opt.step()
        assert (bounded.omega * (bounded.B @ bounded.A)).abs().max().item() > 100  # far past the sine's first peak
        assert bounded.delta_weight().abs().max().item() <= bounded.bound() + 1e-6
        assert plain.delta_weight().abs().max().item() > 10 * plain.bound()


def test_gd_sine_bounds_only_the_mlp_deltas_and_a_fresh_delta_changes_nothing(tmp_path):
    from core.causal_lm import load_causal_lm

    _tok, model = load_causal_lm("tiny-lm", "--model")
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    deltas = attach_deltas(model, ApproxConfig(method="gd-sine"))
    kinds = {name.rsplit(".", 1)[1]: d.bounded for name, d in deltas.items()}
    assert kinds == {"q_proj": False, "v_proj": False, "gate_proj": True, "up_proj": True, "down_proj": True}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # B = 0: bit for bit the same outputs
    again = attach_deltas(model, ApproxConfig(method="gd-sine"))  # the same settings: the same modules, reused
    assert again.keys() == deltas.keys() and all(again[n] is deltas[n] for n in deltas)
    assert len(attached(model)) == len(deltas)


@pytest.mark.parametrize("extra, message", [
    ({"objective": "lm", "approx": {"method": "gd-sin"}}, "method must be one of ga, gd, gd-sine"),
    ({"objective": "lm", "approx": {"method": "gd", "steps": 0}}, "steps must be an integer in 1..100000"),
    ({"objective": "lm", "approx": {"method": "gd", "lr": float("nan")}}, "lr must be a number"),
    ({"objective": "lm", "approx": {"method": "gd", "bound": 1}}, "unknown field 'bound'"),
    ({"approx": {"method": "gd"}}, "approximate unlearning is for one model: the lm objective"),
])
def test_bad_approximate_settings_are_one_line(extra, message):
    with pytest.raises(UnlearnError, match=message.replace("(", r"\(")):
        SisaConfig(**{**BASE, "model": "tiny-lm" if extra.get("objective") else "tiny"}, extra=extra)
    with pytest.raises(UnlearnError, match="1 shard and 1 slice"):
        SisaConfig(**{**BASE, "shards": 2}, extra={"objective": "lm", "approx": {"method": "gd"}})


def test_approximate_run_through_the_cli_says_it_is_not_verifiable(tmp_path, capsys):
    """train --method approx, delete through the coordinator and the log, purge; the receipt
    and status say approximate; verify exits non-zero with one line; bad options are usage errors."""
    import json

    from cluster.cli import main

    store = str(tmp_path / "s")
    common = ["--run", "ax", "--store", store, "--runtime", "local"]
    assert main(["train", "--method", "approx", "--approx", "ga", "--approx-steps", "3", "--model", "tiny-lm",
                 "--data", "dataset:facts?people=6&facts=2", "--epochs", "1", "--max-length", "32", "--quiet",
                 *common]) == 0
    capsys.readouterr()
    assert main(["delete", "--owners", "person-001", "--json", *common]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["ids"] == ["person-001-birthplace", "person-001-profession"] and receipt["stages_redone"] == {}
    assert receipt["warnings"][0].startswith("approximate: not verifiable (ga")
    assert main(["status", "--json", "--run", "ax", "--store", store]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["config"]["extra"]["approx"]["method"] == "ga" and st["records"] == 10 and "approximate" in st
    assert main(["verify", *common]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is approximate (ga): not verifiable" in err
    for argv, message in [(["--slices", "2"], "--slices: must be 1 with --method approx"),
                          (["--objective", "classify"], "--objective: must be lm with --method approx"),
                          (["--approx", "sine"], "invalid choice: 'sine'"),
                          (["--approx-steps", "0"], "--approx-steps")]:
        with pytest.raises(SystemExit) if "invalid" in message or "steps" in message else _no_raise():
            code = main(["train", "--method", "approx", "--model", "tiny-lm", "--data", "dataset:facts",
                         "--run", "bad", "--store", store, *argv])
            assert code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "bad").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_an_approximate_run_started_from_a_trained_model_equals_one_trained_from_scratch(tmp_path, records, capsys):
    """--from copies the model of an lm run (1 shard, 1 slice) instead of training: the same
    state, digest for digest, as training the approximate run; and then the same deletion."""
    import json

    from cluster.cli import main

    store = LocalStore(str(tmp_path))
    trained = SisaRun.train(store, "trained", records, approx_config("gd"))
    source = SisaRun.train(store, "src", records, SisaConfig(**BASE, extra={"objective": "lm"}))
    capsys.readouterr()
    assert main(["train", "--method", "approx", "--approx", "ga", "--approx-steps", "6", "--approx-lr", "0.02",
                 "--from", "src", "--run", "cli", "--store", str(tmp_path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["config"]["extra"]["approx"]["method"] == "ga" and st["shards"][0]["digest"] == \
        source.manifest.shards[0].digest
    forked = SisaRun.start_approx(store, "forked", "src", trained.config.approx)
    assert forked.manifest.shards[0].digest == trained.manifest.shards[0].digest == source.manifest.shards[0].digest
    for run in (trained, forked):
        run.delete(ids=[records[2].id])
    assert forked.manifest.shards[0].digest == trained.manifest.shards[0].digest
    assert SisaRun.open(store, "src").manifest.version == 1  # the source is untouched
    for argv, message in [(["--from", "trained"], "not approximate itself (that run is approximate)"),
                          (["--from", "src", "--data", "dataset:facts"], "--data: not with --from"),
                          (["--from", "src", "--shards", "1"], "--shards: not with --from"),
                          (["--from", "nope"], "nope")]:
        code = main(["train", "--method", "approx", "--run", "again", "--store", str(tmp_path), *argv])
        err = capsys.readouterr().err.strip()
        assert code in (1, 2) and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert main(["train", "--from", "src", "--run", "again", "--store", str(tmp_path)]) == 2
    assert "--from: is for --method approx" in capsys.readouterr().err
    assert not SisaRun.exists(store, "again")


@pytest.mark.parametrize("over", [{}, {"rank": 4}])
def test_runs_with_other_approximate_settings_in_one_process_keep_their_own_deltas(tmp_path, records, over):
    """A process holds one base model for every run of the same model and LoRA settings
    (get_trainer), whatever their approximate settings. Seen: once a gd-sine run had been
    loaded, a gd run answered through its sine-bounded MLP deltas (the attached ones were
    reused and only refilled), so its answers depended on what the process had loaded; with
    another rank it failed with a traceback (a tensor copy of the wrong shape)."""
    store = LocalStore(str(tmp_path))
    sequences = [[1, 5, 9, 200, 31], [7, 8, 9]]

    def answer(name):
        run = SisaRun.open(store, name)
        return ShardWorker(store, name, run.config).next_token_probs(run.manifest.shards[0], sequences)[1]

    SisaRun.train(store, "x", records, approx_config("gd")).delete(owners=[records[0].owner])
    x_alone = answer("x")
    SisaRun.train(store, "y", records, approx_config("gd-sine", **over)).delete(owners=[records[0].owner])
    y_alone = answer("y")
    assert np.array_equal(answer("x"), x_alone)
    assert np.array_equal(answer("y"), y_alone)


def test_a_checkpoint_whose_unlearning_tensors_have_other_shapes_is_refused():
    """load_deltas checked the tensors' names only: a [1, d_in] A was broadcast into every
    row (silently another model), another rank was a RuntimeError traceback."""
    from core.causal_lm import load_causal_lm
    from sisa.approx.unlearn import delta_state, initial_deltas, load_deltas

    _tok, model = load_causal_lm("tiny-lm", "--model")
    config = ApproxConfig(method="gd")
    deltas = attach_deltas(model, config)
    initial_deltas(deltas, 0)
    good = delta_state(deltas)
    name = sorted(k for k in good if k.endswith(".A"))[0]
    for bad in ({**good, name: good[name][:1]}, delta_state(attach_deltas(model, ApproxConfig(method="gd", rank=4)))):
        with pytest.raises(UnlearnError, match="checkpoint does not match the model: unlearning tensor .* shape"):
            load_deltas(model, config, bad)
    load_deltas(model, config, good)
    assert all(torch.equal(d.A, good[f"delta.{n}.A"]) for n, d in attached(model).items())


@pytest.mark.parametrize("where", [{"dtype": torch.float64}, {"device": "cuda"}])
def test_deltas_live_where_the_layer_does(where):
    """Deltas were created on the CPU in float32 whatever the layer: a run with --device cuda
    failed its first approximate deletion with a device-mismatch traceback (float64 stands
    for it on a machine without a GPU: the same fix, the layer's device and dtype)."""
    from core.causal_lm import load_causal_lm

    if where.get("device") == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    _tok, model = load_causal_lm("tiny-lm", "--model")
    model.to(**where)
    ids = torch.tensor([[1, 5, 9, 200, 31]], device=where.get("device", "cpu"))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    deltas = attach_deltas(model, ApproxConfig(method="gd-sine"))
    weight = model.get_input_embeddings().weight
    assert all(p.device == weight.device and p.dtype == weight.dtype for d in deltas.values() for p in (d.A, d.B))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("point", ["during-stage-0", "after-stage-0"])  # the worst moments; before-stage-0 writes nothing
def test_the_fault_points_hold_for_an_approximate_deletion(tmp_path, records, point):
    """crash_at (what the fault tests kill shard actors with) was ignored by an approximate
    deletion: it ran to the end. Now the process exits at the point; HEAD is unchanged, and the
    next deletion collects what it wrote and unlearns both records."""
    import subprocess
    import sys

    from proc_helpers import assert_no_trace

    store = LocalStore(str(tmp_path))
    run = SisaRun.train(store, "a", records, approx_config("gd"))
    head = (tmp_path / "a" / "HEAD").read_bytes()
    script = (f"from core.store import LocalStore; from sisa.run import SisaRun, LocalExecutor\n"
              f"store = LocalStore({str(tmp_path)!r}); run = SisaRun.open(store, 'a')\n"
              f"run.executor = LocalExecutor(store, 'a', run.config); run.executor.worker.crash_at({point!r})\n"
              f"run.delete(owners=[{records[3].owner!r}])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert (tmp_path / "a" / "HEAD").read_bytes() == head
    owners = {records[3].owner, records[6].owner}  # every record of an owner: records share texts per owner
    run.delete(owners=sorted(owners))
    gone = {r.id for r in records if r.owner in owners}
    assert len(gone) == 6 and run.manifest.records == len(records) - 6 and run.manifest.version == 2
    assert_no_trace(str(tmp_path), records, gone)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1 and len(list(tmp_path.rglob("*.jsonl"))) == 1
