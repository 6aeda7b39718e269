"""Embedding in worker processes must give the very bits of embedding in one process:
a record's vector may depend on its text and the encoder only, never on how the work
was split, or a from-scratch verify would not reproduce a run trained in parallel."""
import json

import numpy as np
import pytest

import erase.embed as embed
from cluster.cli import main
from conftest import synthetic_records, write_jsonl

TINY = ["--embedder", "tiny", "--lm", "tiny-lm", "--quiet"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Workers for a test-sized input: the thresholds are read in this process only."""
    monkeypatch.setattr(embed, "MIN_PER_WORKER", 4)
    monkeypatch.setattr(embed, "CHUNK", 7)


def test_worker_processes_give_the_same_bits_in_the_same_order(small_chunks):
    texts = [" ".join(["word"] * (1 + i % 9)) + f" text {i}" for i in range(40)] + ["", "x" * 900]
    e = embed.Embedder("tiny")
    one = e.embed(texts)
    three = e.embed(texts, workers=3)
    assert one.shape == three.shape == (len(texts), e.dim) and three.dtype == np.float32
    assert one.tobytes() == three.tobytes()
    assert not np.array_equal(three[0], three[1])  # rows are the texts' own, in order


def test_a_bad_worker_count_is_refused(capsys):
    from cluster import options

    assert options.MAX_EMBED_WORKERS == embed.MAX_WORKERS  # the CLI's bound is the embedder's
    with pytest.raises(embed.UnlearnError, match="workers"):
        embed.Embedder("tiny").embed(["a"], workers=0)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "erase", "--data", "x.jsonl", "--run", "e", "--store", "s", "--embed-workers", "0"])
    assert exc.value.code == 2 and "--embed-workers" in capsys.readouterr().err


def test_train_and_verify_with_workers_equal_one_process(tmp_path, capsys, small_chunks):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(30, owners_every=3))
    digests = []
    for workers in ("1", "2"):
        store = str(tmp_path / f"s{workers}")
        assert main(["train", "--method", "erase", "--data", data, "--run", "e", "--store", store, "--runtime", "local",
                     "--partitions", "2", "--embed-workers", workers, *TINY]) == 0
        capsys.readouterr()
        assert main(["status", "--run", "e", "--store", store, "--json"]) == 0
        digests.append(json.loads(capsys.readouterr().out)["digest"])
    assert digests[0] == digests[1]
    assert main(["verify", "--run", "e", "--store", str(tmp_path / "s1"), "--runtime", "local", "--quiet",
                 "--embed-workers", "2"]) == 0
