"""What one deletion costs: the calibration profile and the per-job cost tables.

Pure code (numpy only). A profile holds seconds measured on one machine (per core:
shard actors train with one thread) by `unlearn profile`; the tables turn them into
the cost of retraining one shard from a given stage, for a configuration and a data
size. Work is counted the way `sisa.plan.retrain_fraction` counts it: training
examples processed, as a fraction of one full training, so simulated and measured
fractions compare directly.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from core.errors import UnlearnError

# Fields a profile must carry, with what they mean (also the `unlearn profile` docs).
FIELDS = {
    "train_s_per_example": "seconds to train on one example once (forward, backward, update; batched)",
    "stage_fixed_s": "seconds per stage redone beyond its examples (optimizer rebuild, checkpoint save)",
    "shard_fixed_s": "seconds per shard retrained in a deletion (slice data read/write, checkpoint load)",
    "batch_fixed_s": "seconds per deletion batch (resolve, manifest commit, purge of old objects)",
    "query_s_per_shard": "seconds for one query through one shard model",
    "erase_certificate_s": "ERASE: seconds to certify one deletion (invariance check)",
    "erase_recluster_s_per_record": "ERASE: seconds per record to re-cluster a partition on fallback",
    "erase_fallback_p": "ERASE: probability that a deletion fails its certificate and re-clusters",
    "erase_batch_fixed_s": "ERASE: seconds per deletion batch (commit)",
    "erase_query_s": "ERASE: seconds for one query (one frozen-LM pass over a prompt with k examples)",
}


@dataclass(frozen=True)
class Profile:
    model: str
    machine: str
    date: str
    epochs: float  # epochs of one full training; the unit of retrain fractions
    train_s_per_example: float
    stage_fixed_s: float
    shard_fixed_s: float
    batch_fixed_s: float
    query_s_per_shard: float
    erase_certificate_s: float
    erase_recluster_s_per_record: float
    erase_fallback_p: float
    erase_batch_fixed_s: float
    erase_query_s: float
    erase_k: int = 4  # examples in an ERASE prompt
    erase_fallback_by_leaf: list | None = None  # [[records per partition, fallback probability], ...] measured
    sources: dict = field(default_factory=dict)  # field -> how it was obtained ("measured ...", "placeholder ...")
    layout: list | None = None  # slice sizes per shard of the run this profile was calibrated on
    notes: str = ""

    def __post_init__(self) -> None:
        for name in ("epochs", *FIELDS):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UnlearnError(f"profile field '{name}': must be a finite number >= 0, got {value!r}")
        if self.epochs <= 0:
            raise UnlearnError(f"profile field 'epochs': must be > 0, got {self.epochs!r}")
        if not 0 <= self.erase_fallback_p <= 1:
            raise UnlearnError(f"profile field 'erase_fallback_p': must be in [0, 1], got {self.erase_fallback_p!r}")
        table = self.erase_fallback_by_leaf
        if table is not None and not (isinstance(table, list) and table and all(
                isinstance(r, list) and len(r) == 2 and r[0] > 0 and 0 <= r[1] <= 1 for r in table)):
            raise UnlearnError("profile field 'erase_fallback_by_leaf': must be [[records > 0, p in [0, 1]], ...]")
        if self.layout is not None:
            ok = (isinstance(self.layout, list) and self.layout
                  and all(isinstance(s, list) and s and len(s) == len(self.layout[0]) for s in self.layout)
                  and all(isinstance(n, int) and n >= 0 for s in self.layout for n in s))
            if not ok:
                raise UnlearnError("profile field 'layout': must be slice sizes per shard, [[n, ...], ...]")

    @property
    def layout_shape(self) -> tuple[int, int] | None:
        return (len(self.layout), len(self.layout[0])) if self.layout else None

    @property
    def layout_records(self) -> int:
        return sum(sum(s) for s in self.layout) if self.layout else 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "profile") -> "Profile":
        if not isinstance(d, dict):
            raise UnlearnError(f"{where}: not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UnlearnError(f"{where}: unknown field '{unknown[0]}'")
        missing = [f for f in ("model", "epochs", *FIELDS) if f not in d]
        if missing:
            raise UnlearnError(f"{where}: missing field '{missing[0]}'")
        try:
            return cls(**d)
        except TypeError as exc:
            raise UnlearnError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Config:
    """One configuration of the deletion pipeline. `workers`: how many shard (or
    partition) retrainings run at once. Full retraining trains one model on one worker."""
    method: str  # "sisa" | "erase" | "full"
    window_s: float
    workers: int
    shards: int = 1
    slices: int = 1
    partitions: int = 1  # ERASE: divide-and-conquer k-means leaves


def stage_fractions(sizes: list[int] | np.ndarray, records: float) -> np.ndarray:
    """Work of each stage of one shard as a fraction of one full training over `records`.

    Stage j trains slices 0..j for 2e/(R+1) epochs; a full training is e epochs over all
    records, so e cancels: fraction_j = 2 * (n_0 + .. + n_j) / ((R+1) * records)."""
    sizes = np.asarray(sizes, dtype=float)
    return 2.0 * np.cumsum(sizes) / ((len(sizes) + 1) * records)


def redo_fractions(stage: np.ndarray) -> np.ndarray:
    """fraction[..., r] of retraining from stage r on (stages r..R-1): a suffix sum."""
    return np.flip(np.cumsum(np.flip(stage, axis=-1), axis=-1), axis=-1)


@dataclass(frozen=True)
class ShardJobs:
    """Cost of one shard job "retrain shard k from stage r": fraction[k, r] of a full
    training, and its seconds = fixed_s[r] + train_s[k, r] x (records now / records at
    the start). One row when every shard is the same size (the planning case), S rows
    for a calibrated run's real layout."""
    fraction: np.ndarray
    train_s: np.ndarray
    fixed_s: np.ndarray


def sisa_jobs(profile: Profile, shards: int, slices: int, records: float, layout: list | None = None) -> ShardJobs:
    if layout is not None:
        if (len(layout), len(layout[0])) != (shards, slices):
            raise UnlearnError(f"layout of {len(layout)}x{len(layout[0])} does not fit {shards} shards x "
                               f"{slices} slices")
        stage = np.stack([stage_fractions(s, records) for s in layout])
    else:
        stage = stage_fractions([records / (shards * slices)] * slices, records)[None, :]
    fraction = redo_fractions(stage)
    full_s = records * profile.epochs * profile.train_s_per_example
    fixed = profile.shard_fixed_s + profile.stage_fixed_s * (slices - np.arange(slices))
    return ShardJobs(fraction=fraction, train_s=fraction * full_s, fixed_s=fixed.astype(float))


def full_training_s(profile: Profile, records: float) -> float:
    """One full retraining (one model, one stage), fixed costs included."""
    return (profile.batch_fixed_s + profile.shard_fixed_s + profile.stage_fixed_s
            + records * profile.epochs * profile.train_s_per_example)


def fallback_probability(profile: Profile, records: float, partitions: int) -> float:
    """ERASE's chance that a deletion fails its certificate. It depends on how many
    records a partition holds (small clusters move when a point leaves), so where the
    ERASE bench measured it at several partition sizes, interpolate in log(size) and
    hold the end values beyond them; otherwise the profile's single value."""
    table = profile.erase_fallback_by_leaf
    if not table:
        return profile.erase_fallback_p
    sizes, probs = zip(*sorted(table))
    return float(np.interp(math.log(max(records / partitions, 1.0)), np.log(sizes), probs))


def query_s(profile: Profile, config: Config) -> float:
    """Inference cost of one query: SISA asks every shard model, ERASE runs one prompt."""
    if config.method == "sisa":
        return config.shards * profile.query_s_per_shard
    if config.method == "erase":
        return profile.erase_query_s
    return profile.query_s_per_shard


def expected_batch_fraction(shards: int, slices: int, k: int) -> float:
    """Expected retraining work of one batch of k uniformly placed single-record requests,
    as a fraction of one full training.

    Stage j of a shard is redone iff one of the shard's hits lies in slices 0..j. With
    m ~ Binomial(k, 1/S) hits, P(no hit in 0..j) = E[((R-1-j)/R)^m] = (1 - (j+1)/(R S))^k,
    so E = sum_j 2(j+1)/(R(R+1)) * (1 - (1 - (j+1)/(R S))^k). For k = 1 this is
    (1/S)(2R+1)/(3R); for R = 1 it is the expected share of touched shards, 1 - (1-1/S)^k."""
    j = np.arange(1, slices + 1)
    return float(np.sum(2 * j / (slices * (slices + 1)) * (1 - (1 - j / (slices * shards)) ** k)))


def makespan(jobs: list[float], workers: int) -> float:
    """Wall time of independent jobs on `workers` (longest job first onto the least
    loaded worker; the coordinator hands shards to free actors in the same spirit)."""
    if not jobs:
        return 0.0
    if len(jobs) <= workers:
        return float(max(jobs))
    loads = [0.0] * workers
    for job in sorted(jobs, reverse=True):
        heapq.heapreplace(loads, loads[0] + job)
    return float(max(loads))
