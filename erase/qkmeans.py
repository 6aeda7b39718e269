"""Quantized k-means (Ginart et al. 2019) in exact integer arithmetic, and its deletion certificate.

Fit: k-means++ seeding by an exponential race, then Lloyd iterations whose centroids are
snapped to an integer grid with a keyed random phase; a cluster lighter than
gamma * n / m moves only part of the way to its mean (balance). Every iteration keeps
its centroids, its integer cluster sums and its counts.

Certificate: removing weight w of a point that was not a seed is replayed through the
stored iterations in O(T k d). If every iteration's quantised centroids come out the
same, every other point's assignment is unchanged too (each assignment depends only on
the previous centroids), so the stored sums minus the point equal the sums a fit
without it would compute, and the updated state *is* that fit, bit for bit.

Early stop: iterations end at an exact fixed point (C_t == C_{t-1}). The grid phase is
the same in every iteration, so a fixed point repeats forever and the stop loses
nothing; and because a certified deletion reproduces every stored centroid, the refit
would stop at the same iteration. Sharing the phase also means iterations after
convergence cannot fail a certificate independently, which keeps the fallback rate low.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from core.errors import UnlearnError

from .fixed import Digest, grid_offset, nearest, race_exponentials, snap, sq_dists, sq_norms


@dataclass(frozen=True)
class QKParams:
    """What a single quantized k-means needs; scope names it in every keyed choice."""

    scope: str
    k: int
    eps_units: int
    gamma: float
    iters: int
    seed: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "QKParams":
        try:
            p = cls(**d)
        except TypeError as exc:
            raise UnlearnError(f"bad quantized k-means parameters {json.dumps(d, sort_keys=True)}: {exc}") from None
        if p.k < 1 or p.eps_units < 1 or p.iters < 1 or not 0.0 <= p.gamma <= 1.0:
            raise UnlearnError(f"bad quantized k-means parameters {json.dumps(d, sort_keys=True)}")
        return p


@dataclass(frozen=True)
class QKState:
    """The complete result of a fit; t is the number of iterations that ran (<= iters)."""

    seeds: tuple[str, ...]  # ids of the race winners, in the order they were chosen
    centroids: np.ndarray  # int64 [t + 1, m, d]; [0] = seed positions, [s] = after iteration s
    sums: np.ndarray  # int64 [t, m, d]: weighted sums of each cluster in iteration s + 1
    counts: np.ndarray  # int64 [t, m]: weights of each cluster in iteration s + 1
    n_total: int

    @property
    def final(self) -> np.ndarray:
        return self.centroids[-1]

    def digest(self) -> str:
        return (
            Digest("qkstate")
            .json(list(self.seeds))
            .array(self.centroids)
            .array(self.sums)
            .array(self.counts)
            .json(self.n_total)
            .hexdigest()
        )


def empty_state(d: int) -> QKState:
    return QKState((), np.zeros((1, 0, d), np.int64), np.zeros((0, 0, d), np.int64), np.zeros((0, 0), np.int64), 0)


def fit(params: QKParams, ids: list[str], X: np.ndarray, weights: np.ndarray, keys: np.ndarray) -> QKState:
    """Fit on points sorted by id (ties everywhere go to the lower id, i.e. the lower row).

    X: integer rows [n, d]; weights: positive int64 [n]; keys: race keys [n].
    """
    n, d = X.shape
    if n == 0:
        return empty_state(d)
    xx = sq_norms(X)
    chosen = _race(params, X, xx, weights, keys)
    offset = grid_offset(params.seed, params.scope, d, params.eps_units)
    cents = [X[chosen].astype(np.int64)]
    sums, counts = [], []
    n_total = int(weights.sum())
    for _ in range(params.iters):
        prev = cents[-1]
        assign = np.argmin(sq_dists(X, xx, prev), axis=1)
        s, c = _cluster_sums(X, weights, assign, len(prev))
        sums.append(s)
        counts.append(c)
        cents.append(next_centroids(prev, s, c, n_total, params.gamma, offset, params.eps_units))
        if np.array_equal(cents[-1], prev):
            break
    return QKState(tuple(ids[i] for i in chosen), np.stack(cents), np.stack(sums), np.stack(counts), n_total)


def next_centroids(
    prev: np.ndarray, sums: np.ndarray, counts: np.ndarray, n_total: int, gamma: float, offset: np.ndarray, eps: int
) -> np.ndarray:
    """One quantised update. Elementwise only: a row's result depends on that row and the
    scalars, so the certificate recomputes it exactly as the fit did."""
    out = prev.copy()
    live = counts > 0
    if not live.any():
        return out
    c = counts[live].astype(np.float64)[:, None]
    mean = sums[live] / c
    threshold = gamma * n_total / len(prev)
    light = (c < threshold)[:, 0]
    target = mean.copy()
    if light.any():
        base = prev[live][light].astype(np.float64)
        target[light] = base + (c[light] / threshold) * (mean[light] - base)
    out[live] = snap(target, offset, eps)
    return out


def certify_decrement(params: QKParams, state: QKState, point_id: str, x: np.ndarray, w: int) -> QKState | None:
    """The state of a fit without weight w of point x, or None when a refit is needed.

    O(t k d): x is replayed alone through the stored iterations.
    """
    if point_id in state.seeds or w <= 0 or w > state.n_total:
        return None
    offset = grid_offset(params.seed, params.scope, x.shape[0], params.eps_units)
    n_total = state.n_total - w
    sums = state.sums.copy()
    counts = state.counts.copy()
    xw = x.astype(np.int64) * w
    for s in range(sums.shape[0]):
        prev = state.centroids[s]
        j = nearest(x, prev)
        sums[s, j] -= xw
        counts[s, j] -= w
        if counts[s, j] < 0:
            return None
        if not np.array_equal(
            next_centroids(prev, sums[s], counts[s], n_total, params.gamma, offset, params.eps_units),
            state.centroids[s + 1],
        ):
            return None
    return QKState(state.seeds, state.centroids, sums, counts, n_total)


def _cluster_sums(X: np.ndarray, weights: np.ndarray, assign: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted integer sums and weights per cluster (exact: the order of addition is irrelevant)."""
    sums = np.zeros((m, X.shape[1]), np.int64)
    counts = np.zeros(m, np.int64)
    unit = bool((weights == 1).all())
    for j in range(m):
        rows = assign == j
        counts[j] = weights[rows].sum()
        if unit:
            sums[j] = X[rows].sum(axis=0, dtype=np.int64)
        else:
            sums[j] = np.einsum("n,nd->d", weights[rows], X[rows], dtype=np.int64)
    return sums, counts


def _race(params: QKParams, X: np.ndarray, xx: np.ndarray, weights: np.ndarray, keys: np.ndarray) -> list[int]:
    """k-means++ by an exponential race: round r picks argmin E_r(id) / (w * D).

    D is the exact squared distance to the nearest chosen centre (1 in round 0). A point
    that loses a round and is then removed, or loses weight, could not have won it, so
    the winners of a fit without it are the same. Fewer than k winners when fewer
    distinct positions carry weight (every other point sits on a chosen one).
    """
    n = X.shape[0]
    dist = np.ones(n, np.int64)
    chosen: list[int] = []
    for r in range(min(params.k, n)):
        den = weights * dist
        live = np.nonzero(den > 0)[0]
        if len(live) == 0:
            break
        score = race_exponentials(keys[live], r) / den[live].astype(np.float64)
        i = int(live[np.argmin(score)])
        chosen.append(i)
        to_new = sq_dists(X, xx, X[i : i + 1])[:, 0]
        dist = to_new if r == 0 else np.minimum(dist, to_new)
    return chosen
