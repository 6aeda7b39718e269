"""A discrete-event simulation of a deletion-request stream through one configuration.

Pure code (numpy; no Ray, torch or I/O). It follows the coordinator's rules
(`cluster/coordinator.py`): one batch at a time; a batch starts once its oldest
pending request has waited `window_s` and the previous batch is done, and takes every
request pending at that moment. Inside a batch, SISA retrains each touched shard once,
from the earliest slice any of its requests hit, on `workers` parallel workers; ERASE
certifies every request and re-clusters each partition whose certificate failed; full
retraining trains one model on all records. The number of records is held constant:
planning looks at a steady state in which new data replaces what is deleted.

The events are batches, not requests: runs of requests that arrive to an idle pipeline
and finish before the next one arrives are settled in one vectorised step, so a year of
requests through a grid of configurations takes seconds.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from .costs import Config, Profile, fallback_probability, full_training_s, makespan, query_s, sisa_jobs
from .workload import DAY, Workload

# The saturation test. A configuration is saturated (unstable) when a deletion batch is
# applying during at least BUSY_LIMIT of the second half of the horizon [H/2, H] (its
# utilisation, `Result.busy_fraction`): the coordinator is never idle, each batch holds
# what arrived while the previous one ran, and its compute hours and time-to-forget are
# set by its workers' capacity, not by the rate (more requests only make batches bigger;
# where a batch costs more with every request, as ERASE's certificates do, the backlog
# grows without bound). Its hours a day are then no cost estimate to compare or rank.
BUSY_LIMIT = 0.99


@dataclass(frozen=True)
class Trace:
    """Per batch (in order) and per request: what happened."""
    batch_size: np.ndarray
    batch_start_s: np.ndarray
    batch_end_s: np.ndarray
    batch_jobs: np.ndarray  # shards (or partitions) retrained
    batch_fraction: np.ndarray  # retraining work, fraction of one full training
    batch_compute_s: np.ndarray  # worker-seconds
    time_to_forget_s: np.ndarray  # per request: its batch's end minus its arrival


@dataclass(frozen=True)
class Result:
    config: Config
    requests: int
    records: int
    horizon_s: float
    trace: Trace
    query_s: float  # I: compute seconds of one query

    @property
    def batches(self) -> int:
        return len(self.trace.batch_size)

    @property
    def mean_retrain_fraction(self) -> float:
        """Retraining work per request, as a fraction of one full training."""
        return float(self.trace.batch_fraction.sum() / self.requests) if self.requests else 0.0

    @property
    def compute_s_per_deletion(self) -> float:
        """U: worker-seconds per request, fixed costs included."""
        return float(self.trace.batch_compute_s.sum() / self.requests) if self.requests else 0.0

    @property
    def compute_hours_per_day(self) -> float:
        """Worker hours a day, over the horizon or, when the last batch ends after it, until
        then (so a day never holds more than workers x 24 hours)."""
        end = float(self.trace.batch_end_s.max()) if len(self.trace.batch_end_s) else 0.0
        return float(self.trace.batch_compute_s.sum() / 3600.0 / (max(self.horizon_s, end) / DAY))

    def percentile_s(self, q: float) -> float:
        return float(np.percentile(self.trace.time_to_forget_s, q)) if self.requests else 0.0

    @property
    def busy_fraction(self) -> float:
        """Utilisation: the share of the second half of the horizon [H/2, H] during which a
        batch was applying (one batch at a time, as the coordinator runs them)."""
        lo, hi = self.horizon_s / 2, self.horizon_s
        t = self.trace
        busy = np.clip(np.minimum(t.batch_end_s, hi) - np.maximum(t.batch_start_s, lo), 0, None).sum()
        return float(busy / (hi - lo))

    @property
    def stable(self) -> bool:
        """Not saturated: utilisation below BUSY_LIMIT, so the pipeline is idle at times and
        catches up with the requests. A saturated one keeps up only by ever larger batches
        that retrain whole shards back to back, its workers busy around the clock."""
        return self.busy_fraction < BUSY_LIMIT


class _Model:
    """Cost of a batch of requests lo..hi-1: (duration s, worker-seconds, retrain
    fraction, jobs); `single` gives it for every request on its own, as arrays."""

    def __init__(self, n: int):
        self.n = n

    def batch(self, lo: int, hi: int) -> tuple[float, float, float, int]:
        raise NotImplementedError

    def single(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        out = np.array([self.batch(i, i + 1) for i in range(self.n)], dtype=float).reshape(-1, 4)
        return out[:, 0], out[:, 1], out[:, 2], out[:, 3]


def _hits_by_request(hit_request: np.ndarray, n: int) -> np.ndarray:
    return np.searchsorted(hit_request, np.arange(n + 1), side="left")


class _Sisa(_Model):
    def __init__(self, workload: Workload, config: Config, profile: Profile, records: int):
        super().__init__(workload.requests)
        S, R = config.shards, config.slices
        rec = workload.recorded
        # a calibrated run's real shard sizes, when replaying that very run
        layout = profile.layout if profile.layout_shape == (S, R) and profile.layout_records == records else None
        if rec is not None and (rec.shards, rec.slices) == (S, R):
            hit_request, shard, stage = rec.hit_request, rec.shard, rec.stage
        else:
            hit_request = workload.hit_request
            shard = (workload.shard_key % np.uint64(S)).astype(np.int64)
            stage = (workload.slice_key % np.uint64(R)).astype(np.int64)
        self.jobs = sisa_jobs(profile, S, R, records, layout)
        self.bounds = _hits_by_request(hit_request, workload.requests)
        self.shard, self.stage = shard, stage
        self.shard_l, self.stage_l = shard.tolist(), stage.tolist()
        self.per_shard = self.jobs.fraction.shape[0] > 1
        self.batch_fixed = profile.batch_fixed_s
        self.workers = config.workers
        self.one_hit = bool(np.all(np.diff(self.bounds) == 1))
        self.rows, self.frac_l = self.jobs.train_s.tolist(), self.jobs.fraction.tolist()
        self.fixed_l = self.jobs.fixed_s.tolist()

    def single(self):
        if not self.one_hit:
            return super().single()
        row = self.shard if self.per_shard else 0 * self.shard
        j = self.jobs
        secs = self.batch_fixed + j.fixed_s[self.stage] + j.train_s[row, self.stage]
        return secs, secs, j.fraction[row, self.stage], np.ones(self.n)

    def batch(self, lo, hi):
        first: dict[int, int] = {}
        for h in range(self.bounds[lo], self.bounds[hi]):
            k, r = self.shard_l[h], self.stage_l[h]
            if r < first.get(k, r + 1):
                first[k] = r
        if not first:
            return self.batch_fixed, self.batch_fixed, 0.0, 0
        rows = self.rows
        secs = [self.fixed_l[r] + rows[k if self.per_shard else 0][r] for k, r in first.items()]
        frac = sum(self.frac_l[k if self.per_shard else 0][r] for k, r in first.items())
        return (self.batch_fixed + makespan(secs, self.workers), self.batch_fixed + sum(secs), frac, len(first))


class _Erase(_Model):
    def __init__(self, workload: Workload, config: Config, profile: Profile, records: int):
        super().__init__(workload.requests)
        P = config.partitions
        self.fallback = (workload.fallback_u < fallback_probability(profile, records, P)).tolist()
        self.partition = (workload.shard_key % np.uint64(P)).astype(np.int64).tolist()
        self.bounds = _hits_by_request(workload.hit_request, workload.requests)
        self.hit_request = workload.hit_request.tolist()
        self.fixed = profile.erase_batch_fixed_s
        self.cert = profile.erase_certificate_s
        self.recluster_s = profile.erase_recluster_s_per_record * records / P
        self.partitions, self.workers = P, config.workers

    def batch(self, lo, hi):
        parts = {self.partition[h] for h in range(self.bounds[lo], self.bounds[hi])
                 if self.fallback[self.hit_request[h]]}
        secs = [self.recluster_s] * len(parts)
        base = self.fixed + (hi - lo) * self.cert
        return base + makespan(secs, self.workers), base + sum(secs), len(parts) / self.partitions, len(parts)


class _Full(_Model):
    def __init__(self, workload: Workload, config: Config, profile: Profile, records: int):
        super().__init__(workload.requests)
        self.seconds = full_training_s(profile, records)

    def batch(self, lo, hi):
        return self.seconds, self.seconds, 1.0, 1

    def single(self):
        s = np.full(self.n, self.seconds)
        return s, s, np.ones(self.n), np.ones(self.n)


MODELS = {"sisa": _Sisa, "erase": _Erase, "full": _Full}


def simulate(workload: Workload, config: Config, profile: Profile, records: int) -> Result:
    a = workload.arrival_s
    n = len(a)
    W = config.window_s
    model = MODELS[config.method](workload, config, profile, records)
    dur, comp, frac, jobs = model.single() if n else (np.zeros(0),) * 4
    # a request is settled alone when it finds the pipeline idle and finishes before the next arrives
    alone = np.ones(n, dtype=bool)
    alone[:-1] = a[1:] > a[:-1] + W + dur[:-1]
    not_alone = np.flatnonzero(~alone).tolist() + [n]
    arrivals, alone_l = a.tolist(), alone.tolist()
    size, start, end = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)
    b_jobs, b_frac, b_comp = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)
    end_of = np.empty(n)
    i, b, t_free = 0, 0, -math.inf
    while i < n:
        if arrivals[i] >= t_free and alone_l[i]:  # settle the run of lone requests i..k-1 at once
            k = not_alone[bisect.bisect_left(not_alone, i)]
            m = k - i
            size[b:b + m] = 1
            start[b:b + m] = a[i:k] + W
            end[b:b + m] = end_of[i:k] = start[b:b + m] + dur[i:k]
            b_jobs[b:b + m], b_frac[b:b + m], b_comp[b:b + m] = jobs[i:k], frac[i:k], comp[i:k]
            t_free, i, b = float(end_of[k - 1]), k, b + m
            continue
        t0 = max(t_free, arrivals[i] + W)
        j = bisect.bisect_right(arrivals, t0, i)
        d, c, f, m = (dur[i], comp[i], frac[i], jobs[i]) if j == i + 1 else model.batch(i, j)
        size[b], start[b], end[b], b_jobs[b], b_frac[b], b_comp[b] = j - i, t0, t0 + d, m, f, c
        end_of[i:j] = t0 + d
        t_free, i, b = t0 + d, j, b + 1
    trace = Trace(batch_size=size[:b], batch_start_s=start[:b], batch_end_s=end[:b], batch_jobs=b_jobs[:b],
                  batch_fraction=b_frac[:b], batch_compute_s=b_comp[:b], time_to_forget_s=end_of - a)
    return Result(config=config, requests=n, records=records, horizon_s=workload.horizon_s, trace=trace,
                  query_s=query_s(profile, config))
