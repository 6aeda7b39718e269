"""The pure planning core: placement, stage schedule, deletion plans."""
from fractions import Fraction

import pytest

from sisa import plan


def test_owner_records_share_shard_and_slice():
    a = plan.place("alice", seed=3, shards=8, slices=4)
    assert a == plan.place("alice", seed=3, shards=8, slices=4)
    layout = plan.build_layout([("x1", "alice"), ("x2", "alice"), ("y", "bob")], seed=3, shards=8, slices=4)
    assert "x1" in layout[a.shard][a.slice] and "x2" in layout[a.shard][a.slice]


def test_placement_depends_on_seed_and_spreads():
    owners = [f"o{i}" for i in range(4000)]
    shards = [plan.place(o, 0, 8, 4).shard for o in owners]
    counts = [shards.count(k) for k in range(8)]
    assert min(counts) > 400 and max(counts) < 600  # about 500 each
    assert shards != [plan.place(o, 1, 8, 4).shard for o in owners]


def test_deleting_a_record_moves_no_other_record():
    recs = [(f"id{i}", f"o{i % 50}") for i in range(300)]
    full = plan.build_layout(recs, 7, 5, 3)
    gone = {"id3", "id104", "id250"}
    rest = plan.build_layout([r for r in recs if r[0] not in gone], 7, 5, 3)
    assert plan.apply_deletion(full, gone) == rest


def test_epochs_per_stage_add_up_to_e():
    for R in (1, 2, 4, 8):
        e = Fraction(3, 2)
        per = plan.epochs_per_stage(e, R)
        assert sum(per * Fraction(j + 1, R) for j in range(R)) == e


def test_stage_pass_sizes_fractional():
    assert plan.stage_pass_sizes(Fraction(1), 1, 10) == [10]
    assert plan.stage_pass_sizes(Fraction(1), 4, 10) == [4]  # 0.4 epoch of 10 records
    assert plan.stage_pass_sizes(Fraction(3), 1, 10) == [10, 10, 10]
    assert plan.stage_pass_sizes(Fraction(2), 2, 9) == [9, 3]  # 4/3 epochs: 9 + round(3)
    assert plan.stage_pass_sizes(Fraction(1), 8, 0) == [0]


def test_pass_order_is_keyed_by_identity():
    ids = [f"id{i}" for i in range(50)]
    order = plan.pass_order(ids, 0, stage=1, pass_index=0)
    assert sorted(order) == sorted(ids) and order != sorted(ids)
    without = plan.pass_order([i for i in ids if i != "id7"], 0, 1, 0)
    assert without == [i for i in order if i != "id7"]  # removing one keeps the others' order
    assert order != plan.pass_order(ids, 0, stage=1, pass_index=1)


def test_checkpoint_key_changes_only_for_prefixes_that_held_the_record():
    shard = [["a", "b"], ["c"], ["d", "e"]]
    keys = [plan.checkpoint_key("cfg", 0, s, shard) for s in range(3)]
    after = [["a", "b"], ["c"], ["e"]]  # d deleted from slice 2
    assert [plan.checkpoint_key("cfg", 0, s, after) for s in range(3)][:2] == keys[:2]
    assert plan.checkpoint_key("cfg", 0, 2, after) != keys[2]
    assert plan.checkpoint_key("other", 0, 0, shard) != keys[0]
    assert plan.checkpoint_key("cfg", 1, 0, shard) != keys[0]


def test_plan_deletion_earliest_slice_per_shard():
    layout = [[["a"], ["b"], ["c"]], [["d"], ["e"], ["f"]], [["g"], [], ["h"]]]
    got = plan.plan_deletion(layout, ["c", "b", "f", "zzz"])
    assert got == [plan.ShardDeletion(0, 1, ("b", "c")), plan.ShardDeletion(1, 2, ("f",))]


@pytest.mark.parametrize("S,R", [(1, 1), (8, 8), (4, 2)])
def test_expected_fraction_matches_mean_retrain_work(S, R):
    """Average the work of deleting from each slice position of one of S equal shards
    (slices of n records): it must equal the analytic (1/S)(2R+1)/(3R)."""
    n = 10
    total = S * R * n
    mean = sum(plan.retrain_fraction([(j + 1) * n for j in range(first, R)], R, total) for first in range(R)) / R
    assert plan.expected_retrain_fraction(S, R) == pytest.approx(mean)


def test_retrain_fraction_counts_examples():
    # R=3: a stage runs 2e/4 epochs; redoing stages of 10 and 20 records out of 40 total
    assert plan.retrain_fraction([10, 20], 3, 40) == pytest.approx(0.375)  # 30 examples x 2/4 epochs / 40
    # redoing all R stages of a single shard holding everything costs exactly one training
    assert plan.retrain_fraction([10, 20, 30], 3, 30) == 1.0
    assert plan.retrain_fraction([30], 1, 30) == 1.0
    assert plan.retrain_fraction([], 4, 0) == 0.0


def test_placement_problems_name_a_record_stored_where_its_owner_does_not_place_it():
    a = plan.place("alice", seed=3, shards=4, slices=2)
    right = [([], []), ([], [])]
    right[a.slice] = (["x1"], ["alice"])
    assert plan.placement_problems(a.shard, right, seed=3, shards=4) == []
    wrong_slice = [right[1], right[0]]
    assert "placement by owner puts it in shard" in plan.placement_problems(a.shard, wrong_slice, 3, 4)[0]
    assert plan.placement_problems((a.shard + 1) % 4, right, 3, 4)  # another shard
    unsorted = [([], []), ([], [])]
    unsorted[a.slice] = (["x2", "x1"], ["alice", "alice"])
    assert plan.placement_problems(a.shard, unsorted, 3, 4) == ["slice %d: ids are not in sorted order" % a.slice]
