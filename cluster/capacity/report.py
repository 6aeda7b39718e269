"""From simulation results to the rows, tables and JSON of `unlearn plan`.

Pure code. The holistic cost follows the ERASE paper's argument: a method's cost is
deletions x U + queries x I (U: compute per deletion, I: compute per query), because
SISA makes deletions cheap by asking S models at every query.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .simulate import Result
from .workload import DAY


# An accuracy measured on n records is charged at a plan of N records only when
# N / ACCURACY_SPAN <= n <= N x ACCURACY_SPAN: accuracy moves with the data size (a shard
# of 600 / 8 = 75 records is not a shard of 1e6 / 8), and nothing here models how.
ACCURACY_SPAN = 10.0


def comparable(measured: int | None, records: int) -> bool:
    """Whether a measurement on `measured` records may stand for `records` (within 10x)."""
    return measured is not None and records / ACCURACY_SPAN <= measured <= records * ACCURACY_SPAN


@dataclass(frozen=True)
class Accuracy:
    """Measured accuracies to charge configurations with: SISA's vote accuracy per
    (shards, slices) and the single model's, measured on `records` training records;
    ERASE's, on a pool of `erase_records`; `source` says where they come from."""
    sisa: dict = field(default_factory=dict)  # (S, R) -> accuracy
    single: float | None = None
    erase: float | None = None
    source: str = ""
    records: int | None = None  # training records of the SISA bench (its single model too)
    erase_records: int | None = None  # candidate pool of the ERASE bench

    def of(self, method: str, shards: int, slices: int) -> float | None:
        if method == "sisa":
            return self.sisa.get((shards, slices))
        return self.erase if method == "erase" else self.single

    def charge(self, method: str, shards: int, slices: int, records: int) -> tuple[float | None, int | None,
                                                                                   str | None]:
        """(accuracy cost, records it was measured on, why it is not charged) at a plan of
        `records`. Full retraining is the single model, the reference: its cost is 0. A
        cost is charged only where both accuracies it subtracts were measured on a number
        of records comparable to `records`; otherwise None, with a note."""
        acc = self.of(method, shards, slices)
        if acc is None or self.single is None:
            return None, None, None  # not measured at all: no column
        if method == "full":
            return 0.0, self.records, None
        sizes = [self.records] + ([self.erase_records] if method == "erase" else [])
        measured = max((n for n in sizes if n is not None), default=None)
        if not all(comparable(n, records) for n in sizes):
            where = (f"measured on {', '.join(f'{n:,}' for n in dict.fromkeys(sizes) if n is not None)} records"
                     if measured is not None else "measured on an unknown number of records")
            return None, measured, f"{where}, not within {ACCURACY_SPAN:g}x of the {records:,} planned"
        return round(self.single - acc, 4), measured, None


@dataclass(frozen=True)
class Demand:
    sla_s: float | None = None
    queries_per_day: float = 0.0
    price_per_hour: float | None = None


def row(result: Result, demand: Demand, accuracy: Accuracy) -> dict:
    c, t = result.config, result.trace
    inference_h = demand.queries_per_day * result.query_s / 3600.0
    holistic = result.compute_hours_per_day + inference_h
    acc_cost, acc_records, acc_note = accuracy.charge(c.method, c.shards, c.slices, result.records)
    late = int((t.time_to_forget_s > demand.sla_s).sum()) if demand.sla_s is not None else None
    out = {
        "method": c.method, "shards": c.shards if c.method == "sisa" else None,
        "slices": c.slices if c.method == "sisa" else None,
        "partitions": c.partitions if c.method == "erase" else None,
        "window_s": c.window_s, "workers": c.workers,
        "requests": result.requests, "batches": result.batches,
        "mean_batch_size": round(result.requests / result.batches, 3) if result.batches else 0.0,
        "mean_retrain_fraction": round(result.mean_retrain_fraction, 6),
        "time_to_forget_p50_s": round(result.percentile_s(50), 3),
        "time_to_forget_p99_s": round(result.percentile_s(99), 3),
        "time_to_forget_max_s": round(float(t.time_to_forget_s.max()), 3) if result.requests else 0.0,
        "compute_hours_per_day": round(result.compute_hours_per_day, 4),
        "deletion_compute_s": round(result.compute_s_per_deletion, 4),
        "query_s": result.query_s,
        "inference_hours_per_day": round(inference_h, 4),
        "holistic_hours_per_day": round(holistic, 4),
        "cost_per_day": round(holistic * demand.price_per_hour, 2) if demand.price_per_hour is not None else None,
        "busy_fraction": round(result.busy_fraction, 4),
        "stable": result.stable,
        "sla_s": demand.sla_s,
        "sla_violations": late,
        "sla_violation_fraction": (None if late is None else round(late / result.requests, 6) if result.requests
                                   else 0.0),
        "accuracy": accuracy.of(c.method, c.shards, c.slices) if acc_cost is not None else None,
        "accuracy_cost": acc_cost,
        "accuracy_records": acc_records,
        "accuracy_note": acc_note,
        "rank": None,  # set by rank(): only stable configurations within the SLA are ranked
    }
    return out


def rankable(r: dict) -> bool:
    """A configuration whose cost may be compared: stable (not saturated, so its hours a
    day are what the rate asks, not its capacity) and, with an SLA, late for no request."""
    return bool(r["stable"]) and not r["sla_violations"]


def rank(rows: list[dict]) -> dict | None:
    """Number the rankable rows by holistic cost (1: cheapest; ties keep their order), and
    return the cheapest, or None. Saturated configurations are never ranked."""
    for r in rows:
        r["rank"] = None
    ranked = sorted((r for r in rows if rankable(r)), key=lambda r: r["holistic_hours_per_day"])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked[0] if ranked else None


def describe(r: dict) -> str:
    """A configuration in words: `sisa S=16 R=4 window 0 workers 8`."""
    size = {"sisa": f" S={r['shards']} R={r['slices']}", "erase": f" P={r['partitions']}"}.get(r["method"], "")
    window = human_duration(r["window_s"]) if r["window_s"] else "0"
    return f"{r['method']}{size} window {window} workers {r['workers']}"


def human_duration(seconds: float) -> str:
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


COLUMNS = ("method", "S", "R", "P", "window", "workers", "retrain/req", "p50 forget", "p99 forget",
           "deletion h/day", "stable", "SLA misses", "acc. cost", "holistic h/day", "rank")
UNSTABLE = "UNSTABLE (saturated)"


def cells(r: dict) -> list[str]:
    dash = "-"
    late = (dash if r["sla_violations"] is None
            else f"{r['sla_violations']} ({100 * r['sla_violation_fraction']:.1f}%)")
    acc = (f"{r['accuracy_cost']:+.3f}" if r["accuracy_cost"] is not None
           else "not at N" if r.get("accuracy_note") else dash)
    holistic = f"{r['holistic_hours_per_day']:.3g}"
    if r["cost_per_day"] is not None:
        holistic += f" ({r['cost_per_day']:g}/day)"
    return [r["method"], str(r["shards"] or dash), str(r["slices"] or dash), str(r["partitions"] or dash),
            human_duration(r["window_s"]) if r["window_s"] else "0", str(r["workers"]),
            f"{r['mean_retrain_fraction']:.4g}", human_duration(r["time_to_forget_p50_s"]),
            human_duration(r["time_to_forget_p99_s"]), f"{r['compute_hours_per_day']:.3g}",
            "yes" if r["stable"] else UNSTABLE, late, acc, holistic,
            dash if r.get("rank") is None else str(r["rank"])]


def text_table(rows: list[dict]) -> str:
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in table)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)
