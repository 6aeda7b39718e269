"""Pure SISA planning: where a record lives, what a stage trains on, what a deletion redoes.

No I/O, no torch, no Ray. Every decision here depends only on the seed, the
configuration and record identities, which is what lets an incremental deletion
reproduce a from-scratch run bit for bit (ALGORITHMS.md rules 1 and 2).

Indexing is 0-based everywhere: shard k in 0..S-1, slice j in 0..R-1, and
stage j trains on slices 0..j together, starting from the state after stage j-1
(stage -1 is the keyed initial state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Sequence

from core.keys import keyed_hash, sha256_hex
from core.records import quote

Layout = list[list[list[str]]]  # layout[shard][slice] = sorted record ids


@dataclass(frozen=True)
class Placement:
    shard: int
    slice: int


def place(owner: str, seed: int, shards: int, slices: int) -> Placement:
    """Shard and slice of every record of `owner`: one owner never spans shards or slices,
    so forgetting a data owner retrains one shard from one slice on."""
    return Placement(
        shard=keyed_hash(seed, "shard", owner) % shards,
        slice=keyed_hash(seed, "slice", owner) % slices,
    )


def build_layout(records: Iterable[tuple[str, str]], seed: int, shards: int, slices: int) -> Layout:
    """Group (id, owner) pairs into layout[shard][slice], ids sorted."""
    layout: Layout = [[[] for _ in range(slices)] for _ in range(shards)]
    for rid, owner in records:
        p = place(owner, seed, shards, slices)
        layout[p.shard][p.slice].append(rid)
    for shard in layout:
        for ids in shard:
            ids.sort()
    return layout


def placement_problems(shard: int, slices: Sequence[tuple[Sequence[str], Sequence[str]]], seed: int,
                       shards: int) -> list[str]:
    """How a stored shard's layout differs from what placement by owner gives: `slices` is
    the manifest's (ids, owners) per slice. A retrain on a wrong layout reproduces the
    stored digests, so verify must re-derive where each record belongs, not trust it."""
    problems = []
    R = len(slices)
    for j, (ids, owners) in enumerate(slices):
        for rid, owner in zip(ids, owners):
            p = place(owner, seed, shards, R)
            if (p.shard, p.slice) != (shard, j):
                problems.append(f"record {quote(rid)} (owner {quote(owner)}) is stored in slice {j}; placement by owner "
                                f"puts it in shard {p.shard}, slice {p.slice}")
        if list(ids) != sorted(ids):
            problems.append(f"slice {j}: ids are not in sorted order")
    return problems


def epochs_per_stage(epochs: Fraction, slices: int) -> Fraction:
    """e' = 2e/(R+1), as in the reference code: with cumulative stages, stage j sees
    (j+1)/R of the shard, so the R stages add up to exactly e epochs over the shard and
    total training compute is the same for every R."""
    return Fraction(2) * Fraction(epochs) / (slices + 1)


def stage_pass_sizes(epochs: Fraction, slices: int, n: int) -> list[int]:
    """How many examples each pass of a stage over `n` records takes.

    A fractional epoch is a final pass truncated to round(frac * n) examples of that
    pass's keyed order (round half up, computed exactly with fractions). Depends only
    on n, the number of records the stage trains on."""
    e = epochs_per_stage(epochs, slices)
    full = math.floor(e)
    frac = e - full
    sizes = [n] * full
    if frac:
        sizes.append(math.floor(frac * n + Fraction(1, 2)))
    return sizes


def pass_order(ids: Iterable[str], seed: int, stage: int, pass_index: int) -> list[str]:
    """Training order of one pass: sorted by a keyed hash of the id (ties by id)."""
    return sorted(ids, key=lambda rid: (keyed_hash(seed, "order", stage, pass_index, rid), rid))


def stage_ids(shard_layout: Sequence[Sequence[str]], stage: int) -> list[str]:
    """Ids stage `stage` trains on: slices 0..stage, sorted."""
    return sorted(rid for j in range(stage + 1) for rid in shard_layout[j])


def checkpoint_key(config_digest: str, shard: int, stage: int, shard_layout: Sequence[Sequence[str]]) -> str:
    """Content key of the checkpoint after `stage`: hash of the configuration and the
    sorted retained ids of slices 0..stage. A prefix that still held a deleted record
    has a different key, so it can never be reused after the deletion."""
    ids = "\n".join(stage_ids(shard_layout, stage))
    return sha256_hex(f"{config_digest}\x1f{shard}\x1f{stage}\x1f{ids}")


@dataclass(frozen=True)
class ShardDeletion:
    shard: int
    first_stage: int  # stages first_stage..R-1 are redone from the checkpoint of first_stage-1
    removed: tuple[str, ...]


def locate(layout: Layout) -> dict[str, Placement]:
    return {rid: Placement(k, j) for k, shard in enumerate(layout) for j, ids in enumerate(shard) for rid in ids}


def plan_deletion(layout: Layout, ids: Iterable[str]) -> list[ShardDeletion]:
    """Which shards a deletion touches and from which stage each must be retrained.
    Ids not in the layout are ignored here; the caller decides whether that is an error."""
    return plan_located(locate(layout).get, ids)


def plan_located(where: Callable[[str], Placement | None], ids: Iterable[str]) -> list[ShardDeletion]:
    """`plan_deletion` with `where(id)` telling each id's placement (None: not held), so a
    run need not build a table of every record (sisa/run.py asks the per-shard indexes)."""
    per_shard: dict[int, list[str]] = {}
    first: dict[int, int] = {}
    for rid in set(ids):
        p = where(rid)
        if p is None:
            continue
        per_shard.setdefault(p.shard, []).append(rid)
        first[p.shard] = min(first.get(p.shard, p.slice), p.slice)
    return [ShardDeletion(k, first[k], tuple(sorted(per_shard[k]))) for k in sorted(per_shard)]


def apply_deletion(layout: Layout, ids: Iterable[str]) -> Layout:
    """The layout without `ids` (a new object; the input is not modified)."""
    gone = set(ids)
    return [[[rid for rid in ids_ if rid not in gone] for ids_ in shard] for shard in layout]


def retrain_fraction(redone_stage_sizes: Iterable[int], slices: int, total_records: int) -> float:
    """Training examples processed by the redone stages, as a fraction of one full
    training over `total_records` (every stage runs 2e/(R+1) epochs; e cancels)."""
    if total_records <= 0:
        return 0.0
    return float(Fraction(2 * sum(redone_stage_sizes), (slices + 1) * total_records))


def expected_retrain_fraction(shards: int, slices: int) -> float:
    """Expected cost of deleting one uniformly random record, in units of one full
    training over all the data: (1/S) * (2R+1)/(3R) (ALGORITHMS.md)."""
    return (1 / shards) * (2 * slices + 1) / (3 * slices)

