"""On a CUDA GPU (`--device cuda`): a SISA-LM run trains, deletes and stays exact on the
device, and its answers agree with the same state scored on the CPU. Skipped, with the
reason printed, where no GPU is present (CI has none; see README, "GPU")."""
import numpy as np
import pytest
import torch

from core.store import LocalStore
from sisa.config import SisaConfig
from sisa.run import SisaRun
from test_sisa_exact import pick_deletions
from test_sisa_lm import LM, qa_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
CUDA = {**LM, "extra": {**LM["extra"], "device": "cuda"}}


def test_an_lm_run_on_cuda_deletes_exactly_as_a_cuda_run_from_scratch(tmp_path):
    """Deterministic kernels on the device: the deletion's digests equal those of a run
    trained on the GPU without the records (the same promise as on the CPU)."""
    records = qa_records()
    config = SisaConfig(**CUDA)
    ids, owner, _layout = pick_deletions(records, config)
    run = SisaRun.train(LocalStore(str(tmp_path / "a")), "r", records, config)
    receipt = run.delete(ids=ids, owners=[owner])
    gone = set(ids) | {r.id for r in records if r.owner == owner}
    assert sorted(receipt.ids) == sorted(gone)
    fresh = SisaRun.train(LocalStore(str(tmp_path / "b")), "r", [r for r in records if r.id not in gone], config)
    assert [s.digest for s in run.manifest.shards] == [s.digest for s in fresh.manifest.shards]


def test_cuda_and_cpu_score_the_same_state_alike(tmp_path):
    """The checkpoint a CUDA run wrote, scored on the CPU, gives the GPU's probabilities."""
    from sisa.shard import ShardWorker

    store = LocalStore(str(tmp_path))
    run = SisaRun.train(store, "r", qa_records(18), SisaConfig(**{**CUDA, "shards": 1, "slices": 1}))
    entry = run.manifest.shards[0]
    prompts = ["Q: Where was person 2 born?\nA:", "Q: Where was person 5 born?\nA:"]
    gpu = ShardWorker(store, "r", run.config)
    cpu = ShardWorker(store, "r", SisaConfig(**{**LM, "shards": 1, "slices": 1}))
    _key, state = gpu.serving_state(entry)
    seqs = [gpu.trainer._ids(p) for p in prompts]
    on_gpu = gpu.trainer.next_token_probs(state, seqs)
    on_cpu = cpu.trainer.next_token_probs(state, seqs)
    assert np.allclose(on_gpu, on_cpu, atol=1e-4)
