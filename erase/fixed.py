"""Fixed-point arithmetic: the reason a deletion can reproduce a from-scratch fit bit for bit.

Embeddings are rounded to integers once. After that every reduction (sums over a
cluster, dot products, squared distances) is integer arithmetic, which is exact and
does not depend on the order or batch shape in which it is evaluated, so "the stored
sum minus x" is the same integer as the sum recomputed without x. Floating point is
used only elementwise (a mean, a blend, a snap to the grid): the same inputs give
the same outputs whatever array they sit in.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from core.errors import UnlearnError
from core.keys import keyed_hash

COORD_LIMIT = 1.001  # rows are L2-normalised, so |coordinate| <= 1 (float32 rounding aside)
_INT64_HEADROOM = 2**62
_MASK64 = (1 << 64) - 1


def to_fixed(X: object, scale: int) -> np.ndarray:
    """Round embeddings to int32 fixed point, rejecting anything that could overflow later."""
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        raise UnlearnError(f"embeddings must be a 2-D numpy array [n, d], got {_describe(X)}")
    if not np.issubdtype(X.dtype, np.floating):
        raise UnlearnError(f"embeddings must be floating point, got dtype {X.dtype}")
    if X.shape[1] < 1:
        raise UnlearnError("embeddings have 0 dimensions")
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        raise UnlearnError(f"embedding row {int(np.argmin(finite))} contains NaN or infinity")
    big = (np.abs(X) > COORD_LIMIT).any(axis=1)
    if big.any():
        raise UnlearnError(
            f"embedding row {int(np.argmax(big))} has a coordinate beyond +-{COORD_LIMIT}: rows must be L2-normalised"
        )
    return np.round(X.astype(np.float64) * scale).astype(np.int32)


def check_capacity(d: int, total_weight: int, scale: int, eps_units: int) -> None:
    """Weight times squared distance (the seeding race) must stay inside int64."""
    bound = math.ceil(COORD_LIMIT * scale) + eps_units
    if total_weight * d * (2 * bound) ** 2 >= _INT64_HEADROOM:
        raise UnlearnError(
            f"{total_weight} records in {d} dimensions at scale {scale} could overflow int64: lower 'scale'"
        )


def sq_norms(X: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", X, X, dtype=np.int64)


def sq_dists(X: np.ndarray, xx: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Exact squared distances [n, c] between integer rows and integer centroids."""
    C = np.asarray(C, dtype=np.int64)
    if len(C) == 1:  # numpy's matrix-vector path is several times faster than the general one
        cross = np.einsum("nd,d->n", X, C[0], dtype=np.int64)[:, None]
    else:
        cross = np.einsum("nd,cd->nc", X, C, dtype=np.int64)
    return xx[:, None] - 2 * cross + sq_norms(C)[None, :]


def nearest(x: np.ndarray, C: np.ndarray) -> int:
    """Index of the nearest centroid to one point; ties go to the lowest index."""
    diff = C.astype(np.int64) - x.astype(np.int64)[None, :]
    return int(np.argmin(np.einsum("cd,cd->c", diff, diff)))


def snap(target: np.ndarray, offset: np.ndarray, eps_units: int) -> np.ndarray:
    """The grid point offset + eps * q nearest to target (halves round up), as int64."""
    q = np.floor((target - offset) / eps_units + 0.5)
    return offset + eps_units * q.astype(np.int64)


def race_keys(seed: int, scope: str, ids: list[str]) -> np.ndarray:
    """One keyed 64-bit hash per point: the root of all of its seeding-race variates."""
    return np.array([keyed_hash(seed, "erase-race", scope, i) for i in ids], dtype=np.uint64)


def race_exponentials(keys: np.ndarray, round_index: int) -> np.ndarray:
    """Exp(1) variates for one round of the race, a function of (point key, round) only.

    splitmix64 spreads the per-point key over rounds with exact uint64 arithmetic, and the
    logarithm is taken one scalar at a time with the C library, so a point's variate does
    not depend on which other points share the array.
    """
    with np.errstate(over="ignore"):
        z = keys + np.uint64(((round_index + 1) * 0x9E3779B97F4A7C15) & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    return np.fromiter((-math.log(v) for v in u.tolist()), dtype=np.float64, count=len(u))


def grid_offset(seed: int, scope: str, d: int, eps_units: int) -> np.ndarray:
    """The grid's random phase, one integer in [0, eps) per dimension, keyed by scope and dimension."""
    return np.array([keyed_hash(seed, "erase-grid", scope, j) % eps_units for j in range(d)], dtype=np.int64)


class Digest:
    """A canonical sha256: every item is tagged with its kind, shape and length, so two
    different states can never serialise to the same byte stream."""

    def __init__(self, kind: str) -> None:
        self._h = hashlib.sha256()
        self.text(kind)

    def text(self, value: str) -> "Digest":
        data = value.encode("utf-8")
        self._h.update(b"s%d:" % len(data) + data)
        return self

    def json(self, value: object) -> "Digest":
        return self.text(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True))

    def array(self, a: np.ndarray) -> "Digest":
        a = np.ascontiguousarray(a, dtype="<i8")
        self._h.update(b"a" + json.dumps(list(a.shape)).encode() + b":" + a.tobytes())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _describe(X: object) -> str:
    if isinstance(X, np.ndarray):
        return f"an array of shape {X.shape}"
    return type(X).__name__
