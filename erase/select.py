"""Choosing the in-context examples: the retained record nearest each final centroid.

Ties go by (distance, id) and the choice is greedy over centroids in index order,
skipping records already taken, so the k examples are distinct and the result is a
function of the retained set alone. Deleting a record that was not chosen cannot
change the choice while the centroids stay put: it was never the minimum of any step.
"""
from __future__ import annotations

import numpy as np

from .fixed import sq_dists

Candidate = tuple[int, str]  # (exact squared distance, record id)


def nearest_candidates(ids: list[str], X: np.ndarray, xx: np.ndarray, centroids: np.ndarray, m: int) -> list[list[Candidate]]:
    """The m smallest (distance, id) per centroid among rows sorted by id.

    m per centroid is enough for the greedy rule: with c centroids at most c - 1 records
    are skipped before a centroid's pick, so the pick is among its c nearest overall, and
    those are among the c nearest of whichever partition holds them.
    """
    n = X.shape[0]
    if n == 0 or len(centroids) == 0 or m < 1:
        return [[] for _ in range(len(centroids))]
    dist = sq_dists(X, xx, centroids)
    take = min(m, n)
    out = []
    for j in range(dist.shape[1]):
        col = dist[:, j]
        kth = np.partition(col, take - 1)[take - 1]
        rows = np.nonzero(col <= kth)[0]  # every tie at the cut, so no tie is dropped arbitrarily
        rows = rows[np.lexsort((rows, col[rows]))][:take]
        out.append([(int(col[r]), ids[r]) for r in rows])
    return out


def greedy_select(per_centroid: list[list[Candidate]]) -> list[str]:
    """For each centroid in order, its nearest candidate not yet chosen."""
    chosen: list[str] = []
    taken: set[str] = set()
    for cands in per_centroid:
        for _, rid in sorted(cands):
            if rid not in taken:
                chosen.append(rid)
                taken.add(rid)
                break
    return chosen


def merge_candidates(parts: list[list[list[Candidate]]], n_centroids: int) -> list[list[Candidate]]:
    """Union of the partitions' candidate lists, centroid by centroid."""
    merged: list[list[Candidate]] = [[] for _ in range(n_centroids)]
    for part in parts:
        for j, cands in enumerate(part):
            merged[j].extend(cands)
    return merged
