"""From simulation results to the rows, tables and JSON of `unlearn plan`.

Pure code. The holistic cost follows the ERASE paper's argument: a method's cost is
deletions x U + queries x I (U: compute per deletion, I: compute per query), because
SISA makes deletions cheap by asking S models at every query.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .simulate import Result
from .workload import DAY


@dataclass(frozen=True)
class Accuracy:
    """Measured accuracies to charge configurations with: SISA's vote accuracy per
    (shards, slices), the single model's, ERASE's; `source` says where they come from."""
    sisa: dict = field(default_factory=dict)  # (S, R) -> accuracy
    single: float | None = None
    erase: float | None = None
    source: str = ""

    def of(self, method: str, shards: int, slices: int) -> float | None:
        if method == "sisa":
            return self.sisa.get((shards, slices))
        return self.erase if method == "erase" else self.single


@dataclass(frozen=True)
class Demand:
    sla_s: float | None = None
    queries_per_day: float = 0.0
    price_per_hour: float | None = None


def row(result: Result, demand: Demand, accuracy: Accuracy) -> dict:
    c, t = result.config, result.trace
    inference_h = demand.queries_per_day * result.query_s / 3600.0
    holistic = result.compute_hours_per_day + inference_h
    acc = accuracy.of(c.method, c.shards, c.slices)
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
        "accuracy": acc,
        "accuracy_cost": (round(accuracy.single - acc, 4) if acc is not None and accuracy.single is not None
                          else None),
    }
    return out


def human_duration(seconds: float) -> str:
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


COLUMNS = ("method", "S", "R", "P", "window", "workers", "retrain/req", "p50 forget", "p99 forget",
           "deletion h/day", "stable", "SLA misses", "acc. cost", "holistic h/day")


def cells(r: dict) -> list[str]:
    dash = "-"
    late = (dash if r["sla_violations"] is None
            else f"{r['sla_violations']} ({100 * r['sla_violation_fraction']:.1f}%)")
    acc = dash if r["accuracy_cost"] is None else f"{r['accuracy_cost']:+.3f}"
    holistic = f"{r['holistic_hours_per_day']:.3g}"
    if r["cost_per_day"] is not None:
        holistic += f" ({r['cost_per_day']:g}/day)"
    return [r["method"], str(r["shards"] or dash), str(r["slices"] or dash), str(r["partitions"] or dash),
            human_duration(r["window_s"]) if r["window_s"] else "0", str(r["workers"]),
            f"{r['mean_retrain_fraction']:.4g}", human_duration(r["time_to_forget_p50_s"]),
            human_duration(r["time_to_forget_p99_s"]), f"{r['compute_hours_per_day']:.3g}",
            "yes" if r["stable"] else "NO", late, acc, holistic]


def text_table(rows: list[dict]) -> str:
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in table)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)
