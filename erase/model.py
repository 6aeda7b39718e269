"""EraseModel: the selected in-context examples, and exact deletion of training records.

Records are split into groups (one per label with per_label, else "all"); each group's
records are split into P leaves by a keyed hash of their id. With P = 1 the single
leaf's clustering is the group's clustering and there is no root. With P > 1 a root
clusters the leaves' outputs: one weighted point per non-empty leaf cluster (its final
centroid, weight = its final count), named "p<leaf>/c<cluster>".

A deletion runs the certificate in the record's leaf. If the leaf's centroids did not
move, the root only sees weights decrease, and runs the same certificate for each
decrement (a weight that reaches 0 removes the point: an absent point and a 0-weight
point are the same to the race and to Lloyd); otherwise the root is refit, which costs
P * k points. The examples are recomputed only when a centroid moved or a selected
record was deleted. Every step either provably reproduces a from-scratch fit or is one,
so `digest()` after any deletions equals the digest of `fit` on the retained records.

The model talks to leaves only through a PartitionPool, so the lead can put each leaf in
a Ray actor; calls and answers are small (outputs, candidates, deltas, digests).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from core.errors import UnlearnError
from core.keys import keyed_hash

from . import qkmeans
from .clustering import ClusteringConfig
from .fixed import Digest, check_capacity, race_keys, to_fixed
from .partition import LeafOutput, Partition, PartitionDelta, apply_call
from .qkmeans import QKParams, QKState
from .select import greedy_select, merge_candidates

FORMAT = "erase-model-1"


class PartitionPool(Protocol):
    def call(self, calls: dict[str, tuple[str, tuple]]) -> dict[str, object]:
        """Run Partition method calls {partition key: (method name, args)}, possibly in parallel,
        and return {partition key: result}. Method "fit" creates the partition."""
        ...


class LocalPool:
    """In-process partitions (the default): one Partition per key, called in key order."""

    def __init__(self) -> None:
        self.parts: dict[str, Partition] = {}

    def call(self, calls: dict[str, tuple[str, tuple]]) -> dict[str, object]:
        out = {}
        for key in sorted(calls):
            method, args = calls[key]
            self.parts[key], out[key] = apply_call(self.parts.get(key), method, tuple(args))
        return out


@dataclass(frozen=True)
class DeletionReport:
    certified: int  # records whose leaf certificate held (no re-clustering of their leaf)
    reclustered_partitions: list[str]  # leaves re-clustered from scratch
    root_refit: bool  # some group's root was re-clustered (P > 1)
    selection_changed: bool
    seconds: float
    root_certified: int = 0  # root weight decrements settled by the root's certificate


@dataclass(frozen=True)
class Root:
    """A group's root clustering over its leaves' outputs (P > 1 only)."""

    point_ids: tuple[str, ...]  # sorted
    points: np.ndarray  # int64 [r, d]
    weights: np.ndarray  # int64 [r], all > 0
    state: QKState

    def digest(self) -> str:
        return (
            Digest("root").json(list(self.point_ids)).array(self.points).array(self.weights)
            .text(self.state.digest()).hexdigest()
        )


@dataclass
class _Group:
    name: str
    k: int
    keys: list[str]  # partition keys, leaf 0..P-1
    outputs: dict[str, LeafOutput] = field(default_factory=dict)
    root: Root | None = None
    selected: list[str] = field(default_factory=list)

    def centroids(self) -> np.ndarray:
        if self.root is not None:
            return self.root.state.final
        return self.outputs[self.keys[0]].centroids


class EraseModel:
    def __init__(self, config: ClusteringConfig, label_set: tuple[str, ...], d: int, pool: PartitionPool | None):
        self.config = config
        self.label_set = label_set
        self.d = d
        self.pool: PartitionPool = pool if pool is not None else LocalPool()
        self._groups: dict[str, _Group] = {}
        self._where: dict[str, str] = {}  # record id -> partition key

    # -- construction -------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        ids: list[str],
        labels: list[str],
        X: np.ndarray,
        config: ClusteringConfig,
        pool: PartitionPool | None = None,
        label_set: list[str] | None = None,
    ) -> "EraseModel":
        """Cluster the records and select the examples.

        label_set fixes the groups when per_label is on (default: the sorted labels of the
        records); a from-scratch fit on retained records must pass the same label_set to
        reproduce a state in which some label lost all its records.
        """
        if not isinstance(config, ClusteringConfig):
            raise UnlearnError(f"config must be a ClusteringConfig, got {type(config).__name__}")
        ids, labels = _check_records(ids, labels)
        Xf = to_fixed(X, config.scale)
        if Xf.shape[0] != len(ids):
            raise UnlearnError(f"{len(ids)} ids but {Xf.shape[0]} embedding rows")
        check_capacity(Xf.shape[1], len(ids), config.scale, config.eps_units)
        labs = _check_label_set(labels, ids, label_set) if config.per_label else ()
        model = cls(config, labs, Xf.shape[1], pool)
        shots = config.group_shots(list(labs))
        for name in sorted(shots):
            model._groups[name] = _Group(name, shots[name], [f"{name}/{p}" for p in range(config.partitions)])
        members: dict[str, list[int]] = {key: [] for g in model._groups.values() for key in g.keys}
        for i, (rid, label) in enumerate(zip(ids, labels)):
            key = model._key_of(rid, label)
            members[key].append(i)
            model._where[rid] = key
        calls = {
            key: ("fit", (model._leaf_params(key).to_json(), [ids[i] for i in rows], Xf[rows]))
            for key, rows in members.items()
        }
        outputs = model.pool.call(calls)
        for g in model._groups.values():
            g.outputs = {key: outputs[key] for key in g.keys}
            g.root = model._fit_root(g) if config.partitions > 1 else None
        model._reselect(list(model._groups))
        return model

    # -- the public state ---------------------------------------------------------------
    @property
    def selected_ids(self) -> list[str]:
        return sorted(rid for g in self._groups.values() for rid in g.selected)

    @property
    def selected_by_group(self) -> dict[str, list[str]]:
        """Per group (label, or "all"), the examples in centroid order."""
        return {name: list(g.selected) for name, g in sorted(self._groups.items())}

    @property
    def ids(self) -> list[str]:
        return sorted(self._where)

    def digest(self) -> str:
        parts = self.pool.call({key: ("digest", ()) for g in self._groups.values() for key in g.keys})
        h = Digest("erase-model").text(self.config.digest()).json(list(self.label_set)).json(self.d)
        for name, g in sorted(self._groups.items()):
            h.text(name).json(g.k).json([parts[key] for key in g.keys])
            h.text(g.root.digest() if g.root is not None else "no root").json(g.selected)
        return h.hexdigest()

    # -- deletion -----------------------------------------------------------------------
    def delete(self, ids: list[str]) -> DeletionReport:
        """Forget records; the state afterwards equals a fit on the retained records."""
        start = time.perf_counter()
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
            raise UnlearnError("ids to delete must be a list of strings")
        ids = list(dict.fromkeys(ids))  # a repeated id in one request is one deletion
        unknown = [rid for rid in ids if rid not in self._where]
        if unknown:
            raise UnlearnError(f"unknown id {unknown[0]!r}: not in the clustering (already deleted?)")
        by_key: dict[str, list[str]] = {}
        for rid in ids:
            by_key.setdefault(self._where[rid], []).append(rid)
        deltas: dict[str, PartitionDelta] = self.pool.call({key: ("delete", (lst,)) for key, lst in by_key.items()})
        for rid in ids:
            del self._where[rid]
        deleted = set(ids)
        reselect, root_refit, root_certified = [], False, 0
        for g in self._groups.values():
            touched = [key for key in g.keys if key in deltas]
            if not touched:
                continue
            before = g.centroids().copy()
            old = dict(g.outputs)
            for key in touched:
                g.outputs[key] = deltas[key].output
            if g.root is not None:
                g.root, refit, certified = self._update_root(g, old, touched)
                root_refit |= refit
                root_certified += certified
            if not np.array_equal(before, g.centroids()) or deleted.intersection(g.selected):
                reselect.append(g.name)
        previous = self.selected_ids
        self._reselect(reselect)
        return DeletionReport(
            certified=sum(d.certified for d in deltas.values()),
            reclustered_partitions=sorted(key for key, d in deltas.items() if d.refit),
            root_refit=root_refit,
            selection_changed=self.selected_ids != previous,
            seconds=time.perf_counter() - start,
            root_certified=root_certified,
        )

    # -- persistence --------------------------------------------------------------------
    @property
    def partition_keys(self) -> list[str]:
        return [key for g in self._groups.values() for key in g.keys]

    def head_tensors(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything but the leaves: configuration, groups, roots, selection. Small (P * k
        points), so a store can rewrite it on every deletion and keep the leaves apart."""
        tensors: dict[str, np.ndarray] = {}
        meta: dict = {
            "format": FORMAT,
            "config": self.config.to_json(),
            "label_set": list(self.label_set),
            "d": self.d,
            "groups": {},
        }
        for name, g in sorted(self._groups.items()):
            gm = {"k": g.k, "keys": g.keys, "selected": g.selected, "partitions": {}, "root": None}
            if g.root is not None:
                r = g.root
                gm["root"] = {"point_ids": list(r.point_ids), "seeds": list(r.state.seeds), "n_total": r.state.n_total}
                for tname, arr in (("points", r.points), ("weights", r.weights), ("centroids", r.state.centroids),
                                   ("sums", r.state.sums), ("counts", r.state.counts)):
                    tensors[f"root/{name}/{tname}"] = np.ascontiguousarray(arr)
            meta["groups"][name] = gm
        return tensors, meta

    def partition_tensors(self, keys: list[str]) -> dict[str, tuple[dict[str, np.ndarray], dict]]:
        """The named leaves' (tensors, meta), fetched through the pool."""
        return self.pool.call({key: ("to_tensors", ()) for key in keys})

    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict]:
        tensors, meta = self.head_tensors()
        parts = self.partition_tensors(self.partition_keys)
        for gm in meta["groups"].values():
            for key in gm["keys"]:
                part_tensors, part_meta = parts[key]
                gm["partitions"][key] = part_meta
                for tname, arr in part_tensors.items():
                    tensors[f"part/{key}/{tname}"] = arr
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], meta: dict, pool: PartitionPool | None = None) -> "EraseModel":
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UnlearnError(f"not an ERASE model (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        try:
            config = ClusteringConfig.from_json(meta["config"])
            model = cls(config, tuple(meta["label_set"]), int(meta["d"]), pool)
            calls = {}
            for name, gm in meta["groups"].items():
                g = _Group(name, int(gm["k"]), list(gm["keys"]), selected=list(gm["selected"]))
                model._groups[name] = g
                for key in g.keys:
                    prefix = f"part/{key}/"
                    sub = {t[len(prefix):]: a for t, a in tensors.items() if t.startswith(prefix)}
                    calls[key] = ("from_tensors", (sub, gm["partitions"][key]))
                    model._where.update((rid, key) for rid in gm["partitions"][key]["ids"])
                if gm["root"] is not None:
                    g.root = _load_root(name, gm["root"], tensors, model.d)
            if sorted(model._groups) != sorted(config.group_shots(list(model.label_set))):
                raise UnlearnError("ERASE model groups do not match its configuration and label set")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UnlearnError(f"ERASE model metadata or tensors incomplete: {exc!r}") from None
        outputs = model.pool.call(calls)
        for g in model._groups.values():
            g.outputs = {key: outputs[key] for key in g.keys}
        return model

    # -- internals ----------------------------------------------------------------------
    def _key_of(self, rid: str, label: str) -> str:
        group = label if self.config.per_label else "all"
        return f"{group}/{keyed_hash(self.config.seed, 'erase-partition', rid) % self.config.partitions}"

    def _params(self, scope: str, k: int) -> QKParams:
        c = self.config
        return QKParams(scope, k, c.eps_units, float(c.gamma), c.iters, c.seed)

    def _leaf_params(self, key: str) -> QKParams:
        group = key.rsplit("/", 1)[0]
        return self._params(key, self._groups[group].k)

    def _root_params(self, g: _Group) -> QKParams:
        return self._params(f"{g.name}/root", g.k)

    def _fit_root(self, g: _Group) -> Root:
        names, rows, weights = [], [], []
        for p, key in enumerate(g.keys):
            out = g.outputs[key]
            for pid, c, w in zip(out.point_ids, out.centroids, out.weights):
                if w > 0:
                    names.append(f"p{p:04d}/{pid}")
                    rows.append(c)
                    weights.append(int(w))
        order = sorted(range(len(names)), key=names.__getitem__)
        ids = [names[i] for i in order]
        points = np.array([rows[i] for i in order], np.int64).reshape(len(ids), self.d)
        w = np.array([weights[i] for i in order], np.int64)
        params = self._root_params(g)
        state = qkmeans.fit(params, ids, points, w, race_keys(params.seed, params.scope, ids))
        return Root(tuple(ids), points, w, state)

    def _update_root(self, g: _Group, old: dict[str, LeafOutput], touched: list[str]) -> tuple[Root, bool, int]:
        """Certify each leaf weight decrement at the root, or refit the root."""
        decrements: list[tuple[str, int]] = []
        for key in touched:
            before, after = old[key], g.outputs[key]
            if not after.same_positions(before) or (after.weights > before.weights).any():
                return self._fit_root(g), True, 0
            p = g.keys.index(key)
            decrements += [
                (f"p{p:04d}/{pid}", int(b - a))
                for pid, b, a in zip(before.point_ids, before.weights, after.weights)
                if b > a
            ]
        root, params, certified = g.root, self._root_params(g), 0
        for pid, dec in decrements:
            i = root.point_ids.index(pid)
            state = qkmeans.certify_decrement(params, root.state, pid, root.points[i], dec)
            if state is None:
                return self._fit_root(g), True, certified
            weights = root.weights.copy()
            weights[i] -= dec
            keep = weights > 0
            root = Root(
                tuple(pid_ for pid_, k in zip(root.point_ids, keep) if k), root.points[keep], weights[keep], state
            )
            certified += 1
        return root, False, certified

    def _reselect(self, names: list[str]) -> None:
        groups = [self._groups[n] for n in names]
        calls = {
            key: ("candidates", (g.centroids(), len(g.centroids())))
            for g in groups
            for key in g.keys
        }
        answers = self.pool.call(calls) if calls else {}
        for g in groups:
            merged = merge_candidates([answers[key] for key in g.keys], len(g.centroids()))
            g.selected = greedy_select(merged)


def _load_root(name: str, rm: dict, tensors: dict[str, np.ndarray], d: int) -> Root:
    t = {n: tensors[f"root/{name}/{n}"] for n in ("points", "weights", "centroids", "sums", "counts")}
    state = QKState(tuple(rm["seeds"]), t["centroids"], t["sums"], t["counts"], int(rm["n_total"]))
    root = Root(tuple(rm["point_ids"]), t["points"], t["weights"], state)
    r, m, iters = len(root.point_ids), len(state.seeds), state.sums.shape[0] if state.sums.ndim == 3 else -1
    consistent = (
        all(a.dtype == np.int64 for a in t.values())
        and root.points.shape == (r, d) and root.weights.shape == (r,) and bool((root.weights > 0).all())
        and state.centroids.shape == (iters + 1, m, d) and state.sums.shape == (iters, m, d)
        and state.counts.shape == (iters, m) and int(root.weights.sum()) == state.n_total
        and list(root.point_ids) == sorted(set(root.point_ids)) and set(state.seeds) <= set(root.point_ids)
    )
    if not consistent:
        raise UnlearnError(f"ERASE model root of group {name!r}: stored tensors are inconsistent with their metadata")
    return root


def _check_records(ids: object, labels: object) -> tuple[list[str], list[str]]:
    if not isinstance(ids, (list, tuple)) or not isinstance(labels, (list, tuple)):
        raise UnlearnError("ids and labels must be lists of strings")
    if len(ids) != len(labels):
        raise UnlearnError(f"{len(ids)} ids but {len(labels)} labels")
    seen: set[str] = set()
    for rid, label in zip(ids, labels):
        if not isinstance(rid, str) or not rid:
            raise UnlearnError(f"record id {rid!r} is not a non-empty string")
        if not isinstance(label, str):
            raise UnlearnError(f"label {label!r} of record {rid!r} is not a string")
        if rid in seen:
            raise UnlearnError(f"duplicate id {rid!r}")
        seen.add(rid)
    return list(ids), list(labels)


def _check_label_set(labels: list[str], ids: list[str], label_set: object) -> tuple[str, ...]:
    if label_set is None:
        return tuple(sorted(set(labels)))
    if not isinstance(label_set, (list, tuple)) or not all(isinstance(x, str) for x in label_set):
        raise UnlearnError("label_set must be a list of strings")
    if len(set(label_set)) != len(label_set):
        raise UnlearnError(f"label_set has a repeated label: {sorted(label_set)}")
    allowed = set(label_set)
    for rid, label in zip(ids, labels):
        if label not in allowed:
            raise UnlearnError(f"label {label!r} of record {rid!r} is not in label_set {sorted(allowed)}")
    return tuple(sorted(label_set))
