"""Cross-run exactness with a real pretrained model (MiniLM) on real data (Rotten Tomatoes)."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from sisa import plan
from sisa.config import SisaConfig
from core.sources import load_records
from sisa.run import SisaRun
from sisa.shard import get_trainer
from core.store import LocalStore

pytestmark = pytest.mark.integration
# The smallest shard and training found to tell the runtimes apart without MKL_CBWR: with
# 1 or 2 epochs, or 500 records, they agree anyway and the test would not catch the regression.
EPOCHS, LIMIT = "3", 1000


def test_minilm_delete_equals_retrain_from_scratch(tmp_path):
    records = load_records("dataset:rotten_tomatoes?split=train&limit=90")
    cfg = SisaConfig(shards=2, slices=3, model="minilm", epochs="1", max_length=32, batch_size=8, seed=11)
    layout = plan.build_layout(((r.id, r.owner) for r in records), cfg.seed, cfg.shards, cfg.slices)
    ids = [layout[0][0][0], layout[0][1][-1], layout[0][2][0], layout[1][2][-1]]
    owner = next(r.owner for r in records if r.id == layout[1][1][0])
    gone = set(ids) | {r.id for r in records if r.owner == owner}

    a = SisaRun.train(LocalStore(str(tmp_path / "a")), "a", records, cfg)
    before = [s.digest for s in a.manifest.shards]
    receipt = a.delete(ids=ids, owners=[owner])
    b = SisaRun.train(LocalStore(str(tmp_path / "b")), "b", [r for r in records if r.id not in gone], cfg)

    assert receipt.shards == [0, 1]
    assert receipt.stages_redone == {"0": [0, 1, 2], "1": [1, 2]}
    assert [s.digest for s in a.manifest.shards] == [s.digest for s in b.manifest.shards]
    assert all(x != y for x, y in zip(before, [s.digest for s in a.manifest.shards]))
    assert a.manifest.records == len(records) - len(gone)


@pytest.mark.slow  # 1.5 minutes of both cores; test_mkl_reproducibility_is_set_before_torch_loads guards the cause in `make test`
def test_ray_actors_and_in_process_training_agree_bit_for_bit(ray_local, tmp_path):
    """The demo's shard 3 (273 records, R=4, 3 epochs) trained in a Ray actor and in this
    process. Without MKL's conditional numerical reproducibility (MKL_CBWR, set by the sisa
    package) the last stage differs in the last bits: run with MKL_CBWR= (empty) to see it
    fail."""
    from cluster.runtime import RayExecutor
    from core.records import with_labels

    records = load_records(f"dataset:rotten_tomatoes?split=train&limit={LIMIT}")
    cfg = with_labels(SisaConfig(shards=4, slices=4, model="minilm", epochs=EPOCHS), records)
    layout = plan.build_layout(((r.id, r.owner) for r in records), cfg.seed, cfg.shards, cfg.slices)
    keep = {i for sl in layout[3] for i in sl}
    subset = [r for r in records if r.id in keep]
    store = LocalStore(str(tmp_path))
    get_trainer(cfg)  # load the model (and transformers' lazy modules) before a second thread runs
    with ThreadPoolExecutor(1) as pool:  # the actor trains on one core while this process trains on the other
        on_ray = pool.submit(SisaRun.train, store, "ray", subset, cfg, executor=RayExecutor(store, "ray", cfg))
        local = SisaRun.train(store, "local", subset, cfg)
        ray_run = on_ray.result()
    assert local.manifest.shards[3].records == len(subset) == 273
    assert local.manifest.shards[3].stage_digests == ray_run.manifest.shards[3].stage_digests


@pytest.mark.parametrize("package", ["sisa", "erase", "cluster.runtime"])
def test_mkl_reproducibility_is_set_before_torch_loads(package):
    """The cause the bit-for-bit test above catches (in `make test-all`): without MKL_CBWR
    a Ray actor and this process trained the demo's shard 3 to different last bits. Every
    process that trains or embeds imports one of these packages first (a Ray worker
    unpickles the actor class from cluster.runtime): each must set it before torch loads."""
    import subprocess
    import sys

    from proc_helpers import cli_env

    env = cli_env()
    env.pop("MKL_CBWR", None)
    code = (f"import os; import {package}; print(os.environ.get('MKL_CBWR')); "
            "import torch; torch.ones(4, 4) @ torch.ones(4, 4)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "AVX2,STRICT"
