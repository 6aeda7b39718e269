"""One divide-and-conquer leaf: a set of records, their fixed-point rows, and its clustering.

A partition is the unit that a Ray actor holds (the lead's pool), so everything it
returns is small: its output (k centroids and weights), candidates, deltas, digests.
It keeps the fixed-point rows of its records, so a deletion never needs re-embedding.
Deleted rows are only masked until the next refit or save, which keeps a certified
deletion O(T k d) instead of O(n d) for copying arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UnlearnError

from . import qkmeans
from .fixed import Digest, race_keys, sq_norms
from .qkmeans import QKParams, QKState
from .select import Candidate, nearest_candidates


@dataclass(frozen=True)
class LeafOutput:
    """What the root sees of a leaf: every final centroid and its final weight (0 = empty)."""

    point_ids: tuple[str, ...]  # "c0000", "c0001", ...: the cluster index, canonical and padded
    centroids: np.ndarray  # int64 [m, d]
    weights: np.ndarray  # int64 [m]

    def same_positions(self, other: "LeafOutput") -> bool:
        return self.point_ids == other.point_ids and np.array_equal(self.centroids, other.centroids)


@dataclass(frozen=True)
class PartitionDelta:
    certified: int  # deletions settled by the certificate
    refit: bool  # the leaf was re-clustered from scratch on its retained records
    output_changed: bool  # a final centroid moved (not just a weight): the root must refit
    output: LeafOutput


class Partition:
    def __init__(self, params: QKParams) -> None:
        self.params = params
        self._set_rows([], np.zeros((0, 0), np.int32))
        self._state = qkmeans.empty_state(0)

    # -- the pool's methods -------------------------------------------------------------
    def fit(self, ids: list[str], X_fixed: np.ndarray) -> LeafOutput:
        if not isinstance(X_fixed, np.ndarray) or X_fixed.ndim != 2 or X_fixed.dtype != np.int32:
            raise UnlearnError(f"partition {self.params.scope}: rows must be an int32 array [n, d]")
        if len(ids) != X_fixed.shape[0]:
            raise UnlearnError(f"partition {self.params.scope}: {len(ids)} ids but {X_fixed.shape[0]} rows")
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self._set_rows([ids[i] for i in order], X_fixed[order])
        if len(self._row) != len(ids):
            raise UnlearnError(f"partition {self.params.scope}: duplicate ids")
        self._refit()
        return self.output()

    def delete(self, ids: list[str]) -> PartitionDelta:
        rows = []
        for rid in ids:
            row = self._row.get(rid)
            if row is None or not self._alive[row]:
                raise UnlearnError(f"partition {self.params.scope}: unknown id {rid!r}")
            rows.append(row)
        if len(set(rows)) != len(rows):
            raise UnlearnError(f"partition {self.params.scope}: an id is listed twice")
        before = self.output()
        certified, failed = 0, False
        for rid, row in zip(ids, rows):
            self._alive[row] = False
            if failed:
                continue
            new = qkmeans.certify_decrement(self.params, self._state, rid, self._X[row], 1)
            if new is None:
                failed = True
            else:
                self._state = new
                certified += 1
        if failed:
            self._compact()
            self._refit()
        after = self.output()
        return PartitionDelta(certified, failed, not after.same_positions(before), after)

    def output(self) -> LeafOutput:
        st = self._state
        m = st.centroids.shape[1]
        weights = st.counts[-1].copy() if st.counts.shape[0] else np.zeros(m, np.int64)
        return LeafOutput(tuple(f"c{j:04d}" for j in range(m)), st.final.copy(), weights)

    def candidates(self, centroids: np.ndarray, m: int) -> list[list[Candidate]]:
        live = np.nonzero(self._alive)[0]
        ids = [self._ids[r] for r in live]
        return nearest_candidates(ids, self._X[live], self._xx[live], centroids, m)

    def seeds(self) -> list[str]:
        return list(self._state.seeds)

    def ids(self) -> list[str]:
        return [rid for rid, alive in zip(self._ids, self._alive) if alive]

    def digest(self) -> str:
        return Digest("partition").json(self.params.to_json()).json(self.ids()).text(self._state.digest()).hexdigest()

    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict]:
        self._compact()
        st = self._state
        tensors = {"x": self._X, "centroids": st.centroids, "sums": st.sums, "counts": st.counts}
        meta = {"params": self.params.to_json(), "ids": list(self._ids), "seeds": list(st.seeds), "n_total": st.n_total}
        return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], meta: dict) -> "Partition":
        try:
            part = cls(QKParams.from_json(meta["params"]))
            X, cents, sums, counts = (tensors[k] for k in ("x", "centroids", "sums", "counts"))
            ids, seeds, n_total = list(meta["ids"]), tuple(meta["seeds"]), int(meta["n_total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UnlearnError(f"partition tensors or metadata incomplete: missing {exc}") from None
        scope = part.params.scope
        d = X.shape[1] if X.ndim == 2 else -1
        t = sums.shape[0] if sums.ndim == 3 else -1
        m = cents.shape[1] if cents.ndim == 3 else -1
        shapes_ok = (
            X.dtype == np.int32 and X.shape[0] == len(ids) and ids == sorted(set(ids))
            and cents.dtype == sums.dtype == counts.dtype == np.int64
            and cents.shape == (t + 1, m, d) and sums.shape == (t, m, d) and counts.shape == (t, m)
            and n_total == len(ids) and set(seeds) <= set(ids) and m == len(seeds)
        )
        if not shapes_ok:
            raise UnlearnError(f"partition {scope}: stored tensors are inconsistent with their metadata")
        part._set_rows(ids, X)
        part._state = QKState(seeds, cents, sums, counts, n_total)
        return part

    # -- internals ----------------------------------------------------------------------
    def _set_rows(self, ids: list[str], X: np.ndarray) -> None:
        self._ids = ids
        self._row = {rid: r for r, rid in enumerate(ids)}
        self._X = X
        self._xx = sq_norms(X)
        self._alive = np.ones(len(ids), bool)
        self._keys = race_keys(self.params.seed, self.params.scope, ids)

    def _compact(self) -> None:
        if self._alive.all():
            return
        live = np.nonzero(self._alive)[0]
        ids, X, keys = [self._ids[r] for r in live], self._X[live], self._keys[live]
        self._ids, self._X, self._keys = ids, X, keys
        self._row = {rid: r for r, rid in enumerate(ids)}
        self._xx = self._xx[live]
        self._alive = np.ones(len(ids), bool)

    def _refit(self) -> None:
        n = len(self._ids)
        self._state = qkmeans.fit(self.params, self._ids, self._X, np.ones(n, np.int64), self._keys)


def apply_call(part: Partition | None, method: str, args: tuple) -> tuple[Partition, object]:
    """Run one pool call; "fit" (args: params JSON, ids, int32 rows) and "from_tensors"
    (args: tensors, meta) create the partition and answer its output. Shared by every
    pool so that in-process and actor partitions behave the same."""
    if method == "fit":
        params, ids, X = args
        part = Partition(QKParams.from_json(params))
        return part, part.fit(list(ids), X)
    if method == "from_tensors":
        part = Partition.from_tensors(*args)
        return part, part.output()
    if part is None:
        raise UnlearnError(f"partition call {method!r} before the partition was created")
    if method not in _METHODS:
        raise UnlearnError(f"unknown partition method {method!r}")
    return part, getattr(part, method)(*args)


_METHODS = frozenset({"delete", "output", "candidates", "seeds", "ids", "digest", "to_tensors"})
