"""SISA with the lm objective (LoRA adapters on a causal LM): exact like the classifiers,
through the CLI and through Ray, with ensemble label scoring and generation."""
import json

import numpy as np
import pytest

from cluster.cli import main
from conftest import write_jsonl
from core.records import Record
from core.store import LocalStore
from sisa.config import SisaConfig
from sisa.run import SisaRun
from test_sisa_exact import cli_json, pick_deletions

LM = dict(shards=3, slices=3, model="tiny-lm", epochs="2", batch_size=4, max_length=32, seed=5,
          extra={"objective": "lm"})
COMMON = ["--objective", "lm", "--model", "tiny-lm", "--shards", "3", "--slices", "3", "--epochs", "2",
          "--batch-size", "4", "--max-length", "32", "--seed", "5"]


def qa_records(n: int = 45) -> list[Record]:
    """Prompt/completion records: facts about people, several per owner."""
    return [Record(f"q{i:03d}", f"Q: Where was person {i // 3} born?\nA:", "", f"person-{i // 3}",
                   f" In the town of Vale {i % 7}.") for i in range(n)]


def labelled_records(n: int = 36) -> list[Record]:
    words = ["great", "fine", "awful", "dull"]
    return [Record(f"l{i:03d}", f"the film was {words[i % 4]} ({i})", "pos" if i % 4 < 2 else "neg", f"o{i % 9}")
            for i in range(n)]


def write_qa(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "prompt": r.text, "completion": r.completion, "owner": r.owner}) + "\n")
    return str(path)


def test_lm_records_are_read_and_stored_as_prompt_completion(tmp_path):
    from core.slices import decode_slice, encode_slice
    from core.sources import load_records

    path = write_qa(tmp_path / "qa.jsonl", qa_records(3))
    got = load_records(path)
    assert got == qa_records(3) and got[0].form == "prompt/completion"
    assert decode_slice(encode_slice(got)) == got
    # a labelled record keeps the bytes it always had (no completion field)
    assert b"completion" not in encode_slice(labelled_records(2))


def test_cross_run_exactness_prompt_completion_via_cli(tmp_path, capsys):
    records = qa_records()
    config = SisaConfig(**LM)
    ids, owner, _layout = pick_deletions(records, config)
    store = str(tmp_path / "store")
    a0 = cli_json(capsys, "train", "--data", write_qa(tmp_path / "d.jsonl", records), "--run", "A", "--store", store,
                  *COMMON)
    assert a0["config"]["extra"] == {"objective": "lm"} and a0["config"]["labels"] == []
    cli_json(capsys, "delete", "--run", "A", "--store", store, "--ids", ",".join(ids))
    receipt = cli_json(capsys, "delete", "--run", "A", "--store", store, "--owners", owner)
    gone = set(ids) | {r.id for r in records if r.owner == owner}
    assert receipt["records_deleted"] == len({r.id for r in records if r.owner == owner} - set(ids))
    rest = write_qa(tmp_path / "rest.jsonl", [r for r in records if r.id not in gone])
    b = cli_json(capsys, "train", "--data", rest, "--run", "B", "--store", store, *COMMON)
    a = cli_json(capsys, "status", "--run", "A", "--store", store)
    assert [s["digest"] for s in a["shards"]] == [s["digest"] for s in b["shards"]]
    assert a["shards"][0]["digest"] != a0["shards"][0]["digest"]  # not vacuous
    assert cli_json(capsys, "verify", "--run", "A", "--store", store)["exact"]
    # only adapters (and their optimizer state) are stored: no base weight in any checkpoint
    from sisa.checkpoint import load_state

    ckpts = [p for p in (tmp_path / "store").rglob("*.safetensors")]
    assert ckpts
    for p in ckpts:
        names = load_state(p.read_bytes()).keys()
        assert all("lora_" in n for n in names), sorted(names)[:3]


def test_label_scoring_runs_where_the_shard_model_is():
    """core.label_scoring built its inputs on the CPU: since SISA-LM scored labels with it, a
    --device cuda lm run failed every predict with a device-mismatch traceback (only a GPU
    shows it; before, _token_logprobs moved its inputs to the run's device)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from sisa.shard import get_trainer

    cpu = get_trainer(SisaConfig(**{**LM, "labels": ("neg", "quite positive")}))
    state = cpu.initial_state(0)
    texts = ["the film was great", "a much longer review of a film that was dull and flat"]
    want = cpu.predict_proba(state, texts)
    cuda = get_trainer(SisaConfig(**{**LM, "labels": ("neg", "quite positive"), "extra": {**LM["extra"], "device": "cuda"}}))
    assert np.allclose(cuda.predict_proba(state, texts), want, atol=1e-4)


def test_labelled_lm_run_scores_labels_like_erase_and_deletes_exactly(tmp_path):
    records = labelled_records()
    store = LocalStore(str(tmp_path / "s"))
    run = SisaRun.train(store, "r", records, SisaConfig(**LM))
    assert run.config.labels == ("neg", "pos")
    out = run.predict(["the film was great", "the film was dull"], "mean")
    probs = [p["probabilities"] for p in out["predictions"]]
    assert all(abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    # each shard's label probabilities are the softmax of the verbalizers' log-likelihoods
    from sisa.shard import ShardWorker

    worker = ShardWorker(store, "r", run.config)
    entry = run.manifest.shards[0]
    _key, p = worker.predict_proba(entry, ["the film was great"])
    _key, state = worker.serving_state(entry)
    lp = worker.trainer.completion_logprobs(state, [Record(f"x{lab}", "the film was great", lab, "x")
                                                     for lab in ("neg", "pos")])
    sums = np.array([v.sum() for v in lp])
    assert np.allclose(p[0], np.exp(sums) / np.exp(sums).sum(), atol=1e-5)
    # multi-token verbalizers of unequal length, queries of unequal length: the cached scoring
    # (each query once, later label tokens on its cache) equals one full pass per label
    from sisa.lm import LMStageTrainer

    labels = ("neg", "quite positive indeed")
    multi = LMStageTrainer(SisaConfig(**{**LM, "labels": labels}), worker.trainer.clf)
    assert [len(v) for v in multi.verb_ids] == [1, 3]
    texts = ["the film was great", "a much longer review of a film that was dull and flat, said nobody"]
    got = multi.predict_proba(state, texts, batch_size=2)
    for text, row in zip(texts, got):
        lp = multi.completion_logprobs(state, [Record(f"x{i}", text, lab, "x") for i, lab in enumerate(labels)])
        sums = np.array([v.sum() for v in lp])
        assert np.allclose(row, np.exp(sums) / np.exp(sums).sum(), atol=1e-5), (row, sums)
    assert run.evaluate(records)["records"] == len(records)
    victim = run.manifest.shards[1].slices[0].ids[0]
    run.delete(ids=[victim])
    fresh = SisaRun.train(LocalStore(str(tmp_path / "f")), "f", [r for r in records if r.id != victim], SisaConfig(**LM))
    assert [s.digest for s in run.manifest.shards] == [s.digest for s in fresh.manifest.shards]


def test_generation_is_greedy_over_the_mean_of_the_shards(tmp_path):
    from sisa.generate import greedy

    run = SisaRun.train(LocalStore(str(tmp_path)), "g", qa_records(), SisaConfig(**LM))
    out = run.generate(["Q: Where was person 2 born?\nA:"], max_new_tokens=6)
    assert out["shards"] == [0, 1, 2] and len(out["generations"][0]["tokens"]) <= 6
    alone = run.generate(["Q: Where was person 2 born?\nA:"], max_new_tokens=6, shard=1)
    assert alone["shards"] == [1]
    # the loop itself: argmax of the step's distribution, stopping at eos
    table = {(): [0.1, 0.7, 0.2], (1,): [0.2, 0.1, 0.7], (1, 2): [0.9, 0.05, 0.05]}
    assert greedy(lambda seqs: np.array([table[tuple(s[1:])] for s in seqs]), [[5]], 10, eos=0) == [[1, 2]]
    assert greedy(lambda seqs: np.array([table[tuple(s[1:])] for s in seqs]), [[5]], 1, eos=0) == [[1]]


def test_bad_input_for_the_lm_objective_is_one_line(tmp_path, capsys):
    store = str(tmp_path / "store")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"id": "a", "prompt": "p", "completion": " c"}\n{"id": "b", "text": "t", "label": "x"}\n')
    both = tmp_path / "both.jsonl"
    both.write_text('{"id": "a", "prompt": "p", "completion": " c", "text": "t"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "a", "prompt": "p", "completion": ""}\n')
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(6))
    cases = [
        (["train", "--data", str(mixed), "--run", "x", *COMMON], "mixed.jsonl:2: a text/label record after"),
        (["train", "--data", str(both), "--run", "x", *COMMON], "both.jsonl:1: field 'text' next to 'prompt'"),
        (["train", "--data", str(empty), "--run", "x", *COMMON], "empty.jsonl:1: field 'completion' is empty"),
        (["train", "--data", qa, "--run", "x", "--model", "tiny"], 'record "q000": a prompt/completion record'),
        (["train", "--data", qa, "--run", "x", "--objective", "lm", "--model", "minilm"],
         "'minilm' is not a model for the lm objective"),
        (["train", "--data", qa, "--run", "x", *COMMON, "--labels", "a,b"], "prompt/completion records, which have no labels"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main([*argv, "--store", store]) != 0, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.safetensors"))
    # generate: on a classifier run, a shard out of range, a count out of range
    assert main(["train", "--data", write_jsonl(tmp_path / "l.jsonl", labelled_records(12)), "--run", "c",
                 "--store", store, "--model", "tiny", "--shards", "2", "--slices", "1", "--epochs", "1", "--quiet"]) == 0
    assert main(["train", "--data", qa, "--run", "g", "--store", store, *COMMON, "--shards", "2", "--quiet"]) == 0
    for argv, message, code in [
        (["--run", "c"], "run c is a classifier (objective classify)", 1),
        (["--run", "g", "--shard", "7"], "--shard 7: run g has shards 0..1", 1),
        (["--run", "g", "--max-new-tokens", "0"], "--max-new-tokens", 2),
        (["--run", "nope"], "nope", 1),
    ]:
        capsys.readouterr()
        try:
            got = main(["generate", "--input", qa, "--store", store, *argv])
        except SystemExit as exc:  # usage errors exit from argparse
            got = exc.code
        assert got == code, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


@pytest.mark.integration
def test_lm_through_ray_equals_in_process_and_generates_the_same_tokens(ray_local, tmp_path, capsys):
    """Shard actors on Ray train and delete (ids from the first, a middle and the last
    slice, plus one owner) to the same digests as a from-scratch run in this process, and
    `unlearn generate` gives the same tokens through the actors as in this process."""
    from cluster.runtime import RayExecutor

    records = qa_records(30)
    config = SisaConfig(**{**LM, "shards": 2})
    from sisa import plan

    layout = plan.build_layout(((r.id, r.owner) for r in records), config.seed, config.shards, config.slices)
    ids = [layout[k][j][0] for k in (0, 1) for j in (0, 1, 2) if layout[k][j]]  # first, middle, last slice
    owner = next(r.owner for r in records if r.owner not in {x.owner for x in records if x.id in ids})
    store = LocalStore(str(tmp_path / "store"))
    run = SisaRun.train(store, "A", records, config, executor=RayExecutor(store, "A", config))
    receipt = run.delete(ids=ids, owners=[owner])
    gone = set(ids) | {r.id for r in records if r.owner == owner}
    assert sorted(receipt.ids) == sorted(gone)
    fresh = SisaRun.train(LocalStore(str(tmp_path / "fresh")), "B", [r for r in records if r.id not in gone], config)
    assert [s.digest for s in run.manifest.shards] == [s.digest for s in fresh.manifest.shards]
    prompts = write_qa(tmp_path / "p.jsonl", records[:3])
    argv = ["generate", "--run", "A", "--store", str(tmp_path / "store"), "--input", prompts, "--max-new-tokens", "6"]
    on_ray = cli_json(capsys, *argv, "--runtime", "ray")  # the actors that trained (named, reused)
    local = cli_json(capsys, *argv, "--runtime", "local")
    assert on_ray["generations"] == local["generations"] and on_ray["shards"] == [0, 1]
    assert all(g["tokens"] for g in local["generations"])


def test_generate_leaves_out_a_shard_with_an_acknowledged_deletion(tmp_path):
    """The /predict rule for generation: between a deletion's acknowledgement and its commit
    the shard holding the record contributes no token (in this process, through the
    coordinator that `serve` runs)."""
    from cluster.coordinator import Coordinator

    store = LocalStore(str(tmp_path))
    run = SisaRun.train(store, "g", qa_records(), SisaConfig(**LM))
    coordinator = Coordinator(store, "g", run_factory=lambda: SisaRun.open(store, "g"))
    next_probs = run._executor(False).next_token_probs
    prompt = ["Q: Where was person 4 born?\nA:"]
    before = coordinator.generate(prompt, next_probs, 6)
    assert before["shards"] == [0, 1, 2] and before["quarantined"] == []
    victim = run.manifest.shards[1].slices[0].ids[0]
    coordinator.submit([victim], [])  # acknowledged (durable), not applied
    during = coordinator.generate(prompt, next_probs, 6)
    assert during["shards"] == [0, 2] and during["quarantined"] == [1]
    from sisa.generate import generate_answers

    # the answer is exactly that of the ensemble of shards 0 and 2
    others = [run.manifest.shards[0], run.manifest.shards[2]]
    assert during["generations"] == generate_answers(run.config, prompt, others, next_probs, 6)["generations"]
    from core.errors import Unavailable

    with pytest.raises(Unavailable, match="shard 1 is being retrained"):
        coordinator.generate(prompt, next_probs, 6, shard=1)
    while coordinator.pending():
        coordinator.apply_due()
    after = coordinator.generate(prompt, next_probs, 6)
    assert after["shards"] == [0, 1, 2] and after["quarantined"] == []


@pytest.mark.integration
@pytest.mark.slow  # a Serve deployment of its own (70 s); in `make test` the same rule in-process (above)
def test_generate_over_http_leaves_out_a_quarantined_shard(ray_local, tmp_path):
    """The style of the /predict one (test_durability_serve): with the run lock held
    elsewhere, a deletion accepted over HTTP stays queued; meanwhile /generate answers from
    the other shard only, token for token what that shard generates alone; after the commit
    both shards answer again."""
    from ray import serve

    from cluster.serving import start_serving
    from core.lock import RunLock
    from proc_helpers import http, wait_until
    from seaweedfs import free_port
    from sisa.generate import generate_answers

    store = LocalStore(str(tmp_path / "store"))
    run = SisaRun.train(store, "lmhttp", qa_records(24), SisaConfig(**{**LM, "shards": 2, "slices": 2}))
    prompt = ["Q: Where was person 4 born?\nA:"]
    url = start_serving(store, "lmhttp", port=free_port())
    try:
        def answered():
            status, out = http(url, "/generate", {"prompts": prompt, "max_new_tokens": 5})
            return out if status == 200 else None

        before = wait_until(answered, 120, "/generate", poll=0.5)
        assert before["shards"] == [0, 1] and before["quarantined"] == []
        victim = run.manifest.shards[1].slices[0].ids[0]
        with RunLock(store, "lmhttp", "delete"):
            status, out = http(url, "/delete", {"ids": [victim]})
            assert status == 202
            status, during = http(url, "/generate", {"prompts": prompt, "max_new_tokens": 5})
            assert status == 200 and during["quarantined"] == [1] and during["shards"] == [0], during
            alone = generate_answers(run.config, prompt, [run.manifest.shards[0]],
                                     run._executor(False).next_token_probs, 5)
            assert during["generations"] == alone["generations"]
            status, out2 = http(url, "/generate", {"prompts": prompt, "max_new_tokens": 5, "shard": 1})
            assert status == 503 and "shard 1 is being retrained" in out2["error"], out2
        rid = out["request_id"]
        wait_until(lambda: http(url, f"/requests/{rid}")[1].get("status") == "done", 120, rid, poll=0.2)
        status, after = http(url, "/generate", {"prompts": prompt, "max_new_tokens": 5})
        assert status == 200 and after["shards"] == [0, 1] and after["quarantined"] == []
    finally:
        serve.shutdown()
        import ray

        from cluster.runtime import coordinator_name

        ray.kill(ray.get_actor(coordinator_name(store, "lmhttp"), namespace="unlearn"))


def test_generate_over_http_is_validated_before_the_coordinator():
    from cluster.http_api import Generate, HttpError, parse_request

    assert parse_request("POST", "/generate", b'{"prompts": ["a"], "max_new_tokens": 5, "shard": 1}') == \
        Generate(("a",), 5, 1, False)
    assert parse_request("POST", "/generate", b'{"prompts": ["a"], "shard": null, "wait": false}') == \
        Generate(("a",), 32, None, False)  # the body the README shows
    for body, message in [(b'{"prompts": []}', "'prompts' must be a non-empty list"),
                          (b'{"prompts": ["a"], "max_new_tokens": 0}', "'max_new_tokens' must be an integer in 1..512"),
                          (b'{"prompts": ["a"], "max_new_tokens": true}', "must be an integer"),
                          (b'{"prompts": ["a"], "shard": -1}', "'shard' must be an integer"),
                          (b'{"prompts": ["a"], "temperature": 1}', "temperature"),
                          (b'{"prompts": ' + b'["a", ' * 70 + b'"a"' + b']' * 70 + b'}', "")]:
        with pytest.raises(HttpError) as exc:
            parse_request("POST", "/generate", body)
        assert exc.value.status == 400 and message in exc.value.message, (body[:40], exc.value.message)
    with pytest.raises(HttpError) as exc:
        parse_request("GET", "/generate")
    assert exc.value.status == 405


def test_predict_and_eval_on_a_completion_run_say_use_generate(tmp_path, capsys):
    store = str(tmp_path / "store")
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(6))
    assert main(["train", "--data", qa, "--run", "g", "--store", store, *COMMON, "--shards", "1", "--slices", "1",
                 "--quiet"]) == 0
    labelled = write_jsonl(tmp_path / "l.jsonl", labelled_records(4))
    for argv in (["predict", "--input", qa], ["eval", "--data", labelled]):
        capsys.readouterr()
        assert main([*argv, "--run", "g", "--store", store]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no labels to" in err and "unlearn generate" in err, err
    assert main(["train", "--data", labelled, "--run", "l", "--store", store, *COMMON, "--shards", "1",
                 "--slices", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--data", qa, "--run", "l", "--store", store]) == 1
    assert "a prompt/completion record; eval needs id, text, label records" in capsys.readouterr().err


def test_generation_stays_within_a_learned_position_table(tmp_path, capsys):
    """Seen in review: a GPT-2-style model (learned positions, here 64) trained with the
    default --max-length 64 crashed in generate with an IndexError once prompt + new tokens
    passed 64. The prompt is now cut so that every new token has a position."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.causal_lm import load_tokenizer

    tok = load_tokenizer("tiny-lm")
    folder = tmp_path / "gpt2-64"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    store = str(tmp_path / "store")
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(4))
    assert main(["train", "--data", qa, "--run", "g", "--store", store, "--objective", "lm", "--model", str(folder),
                 "--shards", "1", "--slices", "1", "--epochs", "1", "--quiet", "--runtime", "local"]) == 0
    long = tmp_path / "long.txt"
    long.write_text("word " * 200 + "\n")
    out = cli_json(capsys, "generate", "--run", "g", "--store", store, "--input", str(long), "--max-new-tokens", "20")
    assert len(out["generations"][0]["tokens"]) <= 20
    capsys.readouterr()
    assert main(["generate", "--run", "g", "--store", store, "--input", str(long), "--max-new-tokens", "64"]) == 1
    assert "the model embeds 64 positions" in capsys.readouterr().err


def test_generate_refuses_erase_runs_and_empty_shards_in_one_line(tmp_path, capsys):
    store = str(tmp_path / "store")
    labelled = write_jsonl(tmp_path / "l.jsonl", labelled_records(8))
    assert main(["train", "--method", "erase", "--embedder", "tiny", "--lm", "tiny-lm", "--shots", "2",
                 "--data", labelled, "--run", "e", "--store", store, "--quiet", "--runtime", "local"]) == 0
    qa = write_qa(tmp_path / "qa.jsonl", qa_records(6))  # two owners: two of four shards stay empty
    assert main(["train", "--data", qa, "--run", "g", "--store", store, *COMMON, "--shards", "4", "--quiet"]) == 0
    empty = next(s.shard for s in SisaRun.open(LocalStore(store), "g").manifest.shards if not s.records)
    for argv, message in [(["--run", "e"], "run e is an ERASE run"),
                          (["--run", "g", "--shard", str(empty)], f"shard {empty} holds no records")]:
        capsys.readouterr()
        assert main(["generate", "--input", qa, "--store", store, *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_shared_base_weights_give_the_same_bits_as_a_loaded_model(tmp_path):
    """The path every Ray shard actor of a real LM takes (core.shared_weights): parameters
    built on the meta device and made views of the read-only arrays of the object store,
    the output layer re-tied to the embeddings. A tied Llama saved as a folder (tiny-lm
    itself is built from a seed in each process and never shared): the same stage digest,
    next-token distributions and greedy tokens as the model loaded from its file."""
    from core.causal_lm import load_tokenizer, tiny_lm
    from sisa.checkpoint import state_digest
    from sisa.generate import greedy
    from sisa.lm import LMStageTrainer, lm_base_weights, load_adapted_lm

    folder = str(tmp_path / "tied-llama")
    tokenizer = load_tokenizer("tiny-lm")
    tiny_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shared = lm_base_weights(folder)
    for arr in shared.values():
        arr.flags.writeable = False  # as Ray hands them out
    assert "lm_head.weight" not in shared  # tied: the embeddings stand for it
    config = SisaConfig(**{**LM, "model": folder, "shards": 1, "slices": 1})
    records = qa_records(12)
    out = []
    for weights in (None, shared):
        adapted = load_adapted_lm(folder, config.lora_r, config.lora_alpha, config.lora_dropout, shared=weights)
        base = adapted.model.get_base_model()
        assert base.lm_head.weight is base.model.embed_tokens.weight
        # not vacuous: with `shared` the model holds no weights of its own, it reads the arrays
        assert (weights is not None) == np.shares_memory(base.model.embed_tokens.weight.detach().numpy(),
                                                         shared["model.embed_tokens.weight"])
        trainer = LMStageTrainer(config, adapted)
        state = trainer.train_stage(trainer.initial_state(0), records, 0, 0)
        prompts = [trainer._ids(r.text, special=True) for r in records[:3]]
        out.append((state_digest(state), trainer.next_token_probs(state, prompts),
                    greedy(lambda seqs: trainer.next_token_probs(state, seqs), prompts, 6, trainer.eos)))
    (own_digest, own_probs, own_tokens), (shared_digest, shared_probs, shared_tokens) = out
    assert shared_digest == own_digest
    assert np.array_equal(shared_probs, own_probs) and shared_tokens == own_tokens
    assert all(own_tokens)


def test_models_load_from_several_threads_of_a_fresh_process():
    """Seen in the audit bench: two threads (two executors) loading SmolLM2 at once in one
    process, the second saw a half-imported transformers ("cannot import name
    'AutoConfig'"). Loads now take a process-wide lock."""
    import subprocess
    import sys

    code = ("import threading\nfrom core.causal_lm import load_causal_lm, load_tokenizer\nerrors = []\n"
            "def go(f):\n    try:\n        f()\n    except Exception as exc:\n        errors.append(repr(exc))\n"
            "jobs = [lambda: load_causal_lm('tiny-lm', '--model'), lambda: load_tokenizer('tiny-lm')] * 3\n"
            "ts = [threading.Thread(target=go, args=(f,)) for f in jobs]\n[t.start() for t in ts]\n"
            "[t.join() for t in ts]\nprint(errors)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
