"""EraseModel: after any deletions, the state equals a from-scratch fit on the retained records."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erase.clustering import ClusteringConfig
from erase.model import EraseModel, LocalPool
from core.errors import UnlearnError

LABELS = ["neg", "neu", "pos"]


def fresh(model_ids, data, cfg):
    """A from-scratch fit on the records of `data` whose id is in model_ids."""
    ids, labels, X = data
    keep = [i for i, rid in enumerate(ids) if rid in set(model_ids)]
    return EraseModel.fit([ids[i] for i in keep], [labels[i] for i in keep], X[keep], cfg, label_set=LABELS)


def assert_same_as_fresh(m, data, cfg):
    ref = fresh(m.ids, data, cfg)
    assert m.selected_ids == ref.selected_ids
    assert m.selected_by_group == ref.selected_by_group
    assert m.digest() == ref.digest()


def seeds_of(m):
    return sorted(s for part in m.pool.parts.values() for s in part.seeds())


@st.composite
def small_data(draw):
    """Integer-ish coordinates (quarters) and duplicates, so distance ties are common."""
    n = draw(st.integers(1, 60))
    d = draw(st.integers(2, 6))
    grid = st.lists(st.integers(-4, 4), min_size=d, max_size=d)
    distinct = draw(st.lists(grid, min_size=1, max_size=max(1, n // 2)))
    X = np.array([distinct[draw(st.integers(0, len(distinct) - 1))] for _ in range(n)], np.float32) / 4
    labels = [draw(st.sampled_from(LABELS)) for _ in range(n)]
    return [f"id{i:03d}" for i in range(n)], labels, X


@st.composite
def configs(draw):
    return ClusteringConfig(
        shots=draw(st.integers(3, 5)),
        partitions=draw(st.sampled_from([1, 3])),
        eps=draw(st.sampled_from([0.125, 0.25, 0.5, 1.0])),
        gamma=draw(st.sampled_from([0.0, 0.2, 1.0])),
        iters=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2)),
        scale=8,
        per_label=draw(st.booleans()),
    )


@settings(max_examples=70, deadline=None)
@given(small_data(), configs(), st.data())
def test_every_deletion_sequence_matches_a_fresh_fit(data, cfg, draw):
    ids, labels, X = data
    m = EraseModel.fit(ids, labels, X, cfg, label_set=LABELS)
    for _ in range(draw.draw(st.integers(1, 5))):
        if not m.ids:
            break
        kind = draw.draw(st.sampled_from(["random", "selected", "seed", "label", "batch"]))
        if kind == "random":
            gone = [draw.draw(st.sampled_from(m.ids))]
        elif kind == "selected" and m.selected_ids:
            gone = [draw.draw(st.sampled_from(m.selected_ids))]
        elif kind == "seed" and seeds_of(m):
            gone = [draw.draw(st.sampled_from(seeds_of(m)))]
        elif kind == "label":
            label = draw.draw(st.sampled_from(LABELS))
            gone = [rid for rid, lab in zip(ids, labels) if lab == label and rid in set(m.ids)] or m.ids[:1]
        else:
            gone = draw.draw(st.lists(st.sampled_from(m.ids), min_size=1, max_size=4, unique=True))
        report = m.delete(gone)
        assert 0 <= report.certified <= len(gone)
        assert set(gone).isdisjoint(m.ids) and set(gone).isdisjoint(m.selected_ids)
        assert_same_as_fresh(m, data, cfg)


def _mixture(n, d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    X = centres[rng.integers(0, 6, n)] + 0.5 * rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ids = [f"r{i:04d}" for i in range(n)]
    labels = [LABELS[i % 3] for i in range(n)]
    return ids, labels, X.astype(np.float32)


@pytest.mark.parametrize("partitions", [1, 4])
def test_both_paths_are_taken_and_exact_on_realistic_data(partitions):
    """A stream of single deletions exercises the certificate, leaf refits and (with P > 1) the root."""
    data = _mixture(800, 8, seed=2)
    cfg = ClusteringConfig(shots=6, partitions=partitions, eps=0.1)
    m = EraseModel.fit(*data, cfg)
    rng = np.random.default_rng(7)
    certified, refits, root_certified = 0, 0, 0
    for step in range(40):
        victim = m.selected_ids[0] if step % 10 == 9 else m.ids[int(rng.integers(len(m.ids)))]
        report = m.delete([victim])
        certified += report.certified
        refits += len(report.reclustered_partitions)
        root_certified += report.root_certified
        assert report.seconds >= 0
        if step % 10 == 9:
            assert report.selection_changed
    assert certified >= 20 and refits >= 1
    if partitions > 1:
        assert root_certified >= 10  # measured 19: leaf refits that move a centroid refit the root
    ref = fresh(m.ids, data, cfg)
    assert m.digest() == ref.digest() and m.selected_ids == ref.selected_ids


def test_seed_deletion_always_refits_its_leaf():
    data = _mixture(300, 6, seed=4)
    cfg = ClusteringConfig(shots=4, partitions=2, eps=0.1)
    m = EraseModel.fit(*data, cfg)
    for _ in range(3):
        report = m.delete([seeds_of(m)[0]])
        assert report.certified == 0 and len(report.reclustered_partitions) == 1
    ref = fresh(m.ids, data, cfg)
    assert m.digest() == ref.digest()


def test_input_order_does_not_matter():
    ids, labels, X = _mixture(200, 5, seed=1)
    cfg = ClusteringConfig(shots=5, partitions=3, per_label=True)
    perm = np.random.default_rng(0).permutation(len(ids))
    a = EraseModel.fit(ids, labels, X, cfg)
    b = EraseModel.fit([ids[i] for i in perm], [labels[i] for i in perm], X[perm], cfg)
    assert a.digest() == b.digest() and a.selected_ids == b.selected_ids
    assert len(a.selected_ids) == 5 and set(a.selected_by_group) == set(LABELS)
    assert a.digest() != EraseModel.fit(ids, labels, X, ClusteringConfig(shots=5, partitions=3, per_label=True, seed=1)).digest()


def test_deleting_a_whole_label_keeps_its_empty_group():
    data = _mixture(120, 4, seed=3)
    cfg = ClusteringConfig(shots=6, partitions=2, per_label=True)
    m = EraseModel.fit(*data, cfg)
    m.delete([rid for rid, lab in zip(data[0], data[1]) if lab == "neu"])
    assert m.selected_by_group["neu"] == [] and len(m.selected_ids) == 4
    assert_same_as_fresh(m, data, cfg)


@pytest.mark.parametrize("partitions", [1, 3])
def test_tensor_round_trip_keeps_digest_and_later_deletions(partitions):
    data = _mixture(300, 6, seed=6)
    cfg = ClusteringConfig(shots=5, partitions=partitions, per_label=partitions > 1)
    m = EraseModel.fit(*data, cfg)
    m.delete(m.ids[:3])
    tensors, meta = m.to_tensors()
    assert all(isinstance(v, np.ndarray) and v.dtype in (np.int32, np.int64) for v in tensors.values())
    import json

    loaded = EraseModel.from_tensors(tensors, json.loads(json.dumps(meta)), pool=LocalPool())
    assert loaded.digest() == m.digest() and loaded.selected_ids == m.selected_ids and loaded.ids == m.ids
    gone = m.ids[:2]
    for model in (m, loaded):
        model.delete(gone)
        model.delete([model.selected_ids[0]])
    assert loaded.digest() == m.digest()
    assert_same_as_fresh(loaded, data, cfg)


def test_empty_and_tiny_inputs():
    cfg = ClusteringConfig(shots=4, partitions=2)
    empty = EraseModel.fit([], [], np.zeros((0, 3), np.float32), cfg)
    assert empty.selected_ids == [] and empty.ids == []
    one = EraseModel.fit(["a"], ["pos"], np.array([[0.6, 0.8, 0.0]], np.float32), cfg)
    assert one.selected_ids == ["a"]
    one.delete(["a"])
    assert one.digest() == empty.digest()


def _bad(**over):
    ids, labels, X = ["a", "b"], ["pos", "neg"], np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    args = {"ids": ids, "labels": labels, "X": X, "config": ClusteringConfig(shots=2)}
    args.update(over)
    return EraseModel.fit(**args)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"ids": ["a", "a"]}, "duplicate id 'a'"),
        ({"ids": ["a"]}, "1 ids but 2 labels"),
        ({"X": np.zeros((3, 2), np.float32)}, "2 ids but 3 embedding rows"),
        ({"X": np.array([[1.0, 0.0], [np.nan, 0.0]], np.float32)}, "row 1 contains NaN"),
        ({"X": np.zeros((2, 2, 2), np.float32)}, "2-D numpy array"),
        ({"ids": ["a", 3]}, "record id 3 is not a non-empty string"),
        ({"config": {"shots": 2}}, "config must be a ClusteringConfig"),
        ({"config": ClusteringConfig(shots=1, per_label=True)}, "1 shots cannot cover 2 labels"),
        ({"config": ClusteringConfig(shots=2, per_label=True), "label_set": ["pos"]}, "label 'neg' of record 'b' is not in label_set"),
    ],
)
def test_bad_fit_input_is_one_line(over, message):
    with pytest.raises(UnlearnError, match=message) as err:
        _bad(**over)
    assert "\n" not in str(err.value)


def test_unknown_id_on_delete_changes_nothing():
    data = _mixture(60, 4, seed=0)
    m = EraseModel.fit(*data, ClusteringConfig(shots=3, partitions=2))
    before = m.digest()
    with pytest.raises(UnlearnError, match="unknown id 'nope'") as err:
        m.delete([data[0][0], "nope"])
    assert "\n" not in str(err.value) and m.digest() == before
    m.delete([data[0][0], data[0][0]])  # a repeated id in one request is one deletion
    with pytest.raises(UnlearnError, match="already deleted"):
        m.delete([data[0][0]])


def test_inconsistent_tensors_are_rejected():
    data = _mixture(90, 4, seed=8)
    m = EraseModel.fit(*data, ClusteringConfig(shots=3, partitions=2))
    tensors, meta = m.to_tensors()
    broken = [
        ({**tensors, "root/all/weights": tensors["root/all/weights"][:-1]}, meta, "root of group 'all'"),
        ({k: v for k, v in tensors.items() if k != "part/all/0/x"}, meta, "incomplete"),
        ({**tensors, "part/all/1/x": tensors["part/all/1/x"].astype(np.int64)}, meta, "partition all/1"),
        (tensors, {**meta, "format": "other"}, "not an ERASE model"),
    ]
    for t, mt, message in broken:
        with pytest.raises(UnlearnError, match=message) as err:
            EraseModel.from_tensors(t, mt)
        assert "\n" not in str(err.value)
