"""Cross-run exactness of the lm objective with a real pretrained causal LM (SmolLM2-135M):
LoRA adapters trained on prompt/completion facts, an owner and single records deleted,
every shard digest equal to a from-scratch run on what remains."""
import pytest

from core.records import Record
from core.store import LocalStore
from sisa import plan
from sisa.config import SisaConfig
from sisa.run import SisaRun

pytestmark = pytest.mark.integration

FACTS = ["was born in", "works as", "wrote the book", "lives in"]
ANSWERS = ["Lisbon", "a baker", "Blue Harbour", "Oslo", "Quito", "a pilot", "Night Rain", "Perth"]


def facts(people: int = 6) -> list[Record]:
    return [Record(f"p{p}-{k}", f"Q: Who {FACTS[k]} what, for person {p}?\nA:", "", f"person-{p}",
                   f" Person {p} {FACTS[k]} {ANSWERS[(p + k) % len(ANSWERS)]}.")
            for p in range(people) for k in range(len(FACTS))]


def test_smollm2_lm_delete_equals_retrain_from_scratch(tmp_path):
    records = facts()
    cfg = SisaConfig(shards=2, slices=2, model="smollm2-135m", epochs="1", max_length=32, batch_size=4, seed=7,
                     extra={"objective": "lm"})
    layout = plan.build_layout(((r.id, r.owner) for r in records), cfg.seed, cfg.shards, cfg.slices)
    owner_of = {r.id: r.owner for r in records}
    k = 0 if layout[0][1] else 1
    ids = [layout[k][1][0]]
    owner = next(owner_of[i] for s in layout for sl in s for i in sl if owner_of[i] != owner_of[ids[0]])
    gone = set(ids) | {r.id for r in records if r.owner == owner}

    a = SisaRun.train(LocalStore(str(tmp_path / "a")), "a", records, cfg)
    before = [s.digest for s in a.manifest.shards]
    receipt = a.delete(ids=ids, owners=[owner])
    b = SisaRun.train(LocalStore(str(tmp_path / "b")), "b", [r for r in records if r.id not in gone], cfg)

    assert [s.digest for s in a.manifest.shards] == [s.digest for s in b.manifest.shards]
    assert any(x != y for x, y in zip(before, [s.digest for s in a.manifest.shards]))
    assert sorted(receipt.ids) == sorted(gone)
    out = a.generate(["Q: Who lives in what, for person 1?\nA:"], max_new_tokens=4)
    assert out["shards"] == [s.shard for s in a.manifest.shards if s.records] and out["generations"][0]["tokens"]
