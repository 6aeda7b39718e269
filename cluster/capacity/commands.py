"""`unlearn profile` and `unlearn plan`: argument parsing, file reading, rendering.

The imperative shell of capacity planning: it reads profiles, request logs and bench
results, hands plain values to the pure simulator (`simulate.py`) and prints or draws
what comes back. `add_parsers` and `run` plug into the `unlearn` CLI; `main` runs
stand-alone (`python -m cluster.capacity.commands plan ...`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from core.errors import UnlearnError

from .costs import FIELDS, Config, Profile
from .report import ACCURACY_SPAN, UNSTABLE, Accuracy, Demand, describe, markdown_table, rank, row, text_table
from .simulate import BUSY_LIMIT, simulate
from .workload import (DAY, Workload, from_log, generate, parse_count, parse_duration, parse_list, parse_pattern,
                       parse_rate)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROFILES = os.path.join(HERE, "profiles")
RESULTS = os.path.join(ROOT, "bench", "results")
METHODS = ("sisa", "erase", "full")

PLAN_DESCRIPTION = """\
Simulate a stream of deletion requests through every combination of the options'
comma lists and print, per configuration: retraining work per request (fraction of one
full training), p50 and p99 time-to-forget (acceptance to committed deletion), worker
compute hours a day for deletions, whether the pipeline is stable (not saturated), SLA
misses, the accuracy given up (where a bench measured it at a comparable number of
records), the holistic cost (deletions x U + queries x I, in compute hours a day) and
the rank by that cost of the stable configurations.

Methods: SISA (S shards x R slices: a deletion retrains its shard from its slice on),
ERASE (a certificate check per deletion; with the fallback probability, re-clustering
one of P partitions), and full retraining of one model (the baseline). The coordinator's
rules are simulated: one batch at a time, a batch starts when its oldest request has
waited the window, and takes every pending request; the shards of a batch retrain on
--workers workers in parallel; full retraining trains one model on one worker."""

PLAN_EPILOG = f"""\
values: rates like 500/day, 2/h, 0.1/s, 3/min, 10/week; durations like 0, 90s, 5min,
1h, 30d, 2w (a bare number is seconds); counts like 1e6; lists are comma-separated.

stable: not saturated, i.e. a deletion batch is applying less than {BUSY_LIMIT:.0%} of the second
half of the horizon (JSON busy_fraction). A saturated one, marked {UNSTABLE},
keeps up only by batching ever more requests and retraining whole shards back to back:
its hours a day are its workers' capacity, not what the rate costs; it is never ranked.
rank: by holistic cost among the stable configurations that miss no --sla (1: cheapest).
acc. cost: charged only where the bench measured it on N/{ACCURACY_SPAN:g} to N x {ACCURACY_SPAN:g} records
(N = --records); else "not at N".

example:
  unlearn plan --rate 500/day --records 1e6 --shards 8,16,32 --slices 1,4,8 \\
               --window 0,1h --workers 4 --sla 30d --queries 1e5/day"""

PROFILE_DESCRIPTION = """\
Measure on this machine what the planner needs (seconds, per core: shard actors train
with one thread): training seconds per example, the fixed seconds of a stage (optimizer
rebuild, checkpoint save), of a retrained shard (slice data, checkpoint load) and of a
deletion batch (commit, purge), measured with real deletions on a scratch store; the
inference seconds of one query through one shard model; and one forward pass over a
prompt of k examples (ERASE's query cost, meaningful for a causal LM such as
smollm2-135m). ERASE's deletion fields come from bench/results/erase_deletion.json when
it exists, else documented placeholders. Writes the profile JSON that `unlearn plan
--profile` reads."""


def _profile_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PROFILES) if f.endswith(".json")) if os.path.isdir(PROFILES) else []


def add_parsers(sub) -> None:
    """Add `profile` and `plan` to the `unlearn` sub-command parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("profile", help="measure training, deletion and inference costs here; write a profile JSON",
                       description=PROFILE_DESCRIPTION, formatter_class=fmt,
                       epilog="fields written:\n" + "\n".join(f"  {k}: {v}" for k, v in FIELDS.items()))
    p.add_argument("--model", default="minilm", help="preset (tiny, minilm, smollm2-135m), a Hugging Face folder or a "
                                                     "hub id (default minilm); ignored with --run")
    p.add_argument("--data", default=None, help="records to time on, as `unlearn train --data` takes them (default "
                                                "dataset:rotten_tomatoes?split=train&limit=RECORDS)")
    p.add_argument("--records", default="96", help="how many records to time on (default 96)")
    p.add_argument("--epochs", default="3", help="epochs of one full training, as `unlearn train --epochs` (default 3)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    p.add_argument("--k", type=int, default=4, help="ERASE: examples in a prompt, for the per-query cost (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each timing; the minimum is kept (default 2)")
    p.add_argument("--run", default=None,
                   help="calibrate on this existing run instead: its model, configuration, a sample of its records "
                        "and its shard/slice sizes (the run is not modified)")
    p.add_argument("--store", default=None, help="store of --run (default $UNLEARN_STORE or ./unlearn-store)")
    p.add_argument("--erase-results", default=RESULTS, help="folder with ERASE bench results to take ERASE fields "
                                                            "from (default bench/results)")
    p.add_argument("--refresh-erase", default=None, metavar="PROFILE",
                   help="measure nothing: rewrite the ERASE fields of this profile from --erase-results")
    p.add_argument("--out", default=None, help="write the profile here (default ./unlearn-profile-MODEL.json; "
                                               "with --refresh-erase, the profile itself)")
    p.add_argument("--json", action="store_true", help="also print the profile JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress messages")

    p = sub.add_parser("plan", help="size a deletion pipeline: simulate a request stream through configurations",
                       description=PLAN_DESCRIPTION, epilog=PLAN_EPILOG, formatter_class=fmt)
    g = p.add_argument_group("workload")
    g.add_argument("--rate", default=None, help="mean rate of deletion requests, e.g. 500/day (one data owner each)")
    g.add_argument("--pattern", default="poisson",
                   help="shape of the rate: poisson (default); daily:A[@HOUR] a daily cycle peaking at (1+A) x the "
                        "mean at HOUR (default 14); spike:AT,FOR,X the rate x X from AT for FOR (e.g. "
                        "spike:30d,2d,20); join with +")
    g.add_argument("--replay", default=None, help="replay a request log (`unlearn requests --run R --json > LOG`) "
                                                  "instead of --rate; configurations of the profile's calibrated "
                                                  "shape replay the shards and stages the log records")
    g.add_argument("--horizon", default="90d", help="how long requests arrive (default 90d; a replay lasts as long "
                                                    "as its log)")
    g.add_argument("--records", default=None,
                   help="training records N, e.g. 1e6 (default: the profile's calibrated run)")
    g.add_argument("--queries", default="0/day",
                   help="rate of inference queries, for the holistic cost (default 0/day)")
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals and placements (default 0)")
    g = p.add_argument_group("configurations (comma lists; every combination is simulated)")
    g.add_argument("--methods", default=",".join(METHODS), help="which of sisa, erase, full (default all)")
    g.add_argument("--shards", default="8", help="SISA shards S (default 8)")
    g.add_argument("--slices", default="4", help="SISA slices per shard R (default 4)")
    g.add_argument("--partitions", default="8", help="ERASE partitions P of divide-and-conquer k-means (default 8)")
    g.add_argument("--window", default="0", help="batching window of the coordinator (default 0: apply at once)")
    g.add_argument("--workers", default="4", help="shard or partition retrainings that run at once (default 4)")
    g.add_argument("--fallback", default=None,
                   help="ERASE fallback probability per deletion (default: the profile's, by records per partition "
                        "where the ERASE bench measured it)")
    g = p.add_argument_group("costs and limits")
    g.add_argument("--profile", default="minilm",
                   help=f"a profile JSON from `unlearn profile`, or a shipped one ({', '.join(_profile_names())}; "
                        f"default minilm)")
    g.add_argument("--sla", default=None, help="time-to-forget limit; requests over it are counted (e.g. 30d)")
    g.add_argument("--price", default=None, help="price of one compute hour, to print a cost a day")
    g.add_argument("--accuracy", default=os.path.join(RESULTS, "sisa.json"),
                   help="SISA bench results to charge the accuracy cost of S and R from, where they were "
                        "measured on N/10 to 10N records (N: --records); ERASE's from erase_accuracy.json beside "
                        "it (default bench/results/sisa.json; `none` to leave it out)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help='print {"configs": [...]} on stdout instead of a table')
    g.add_argument("--markdown", action="store_true", help="print the table as markdown")
    g.add_argument("--plot", default=None, help="draw p99 time-to-forget and holistic cost against the rate, one "
                                                "line and colour per configuration, open markers where it is "
                                                "saturated, into this PNG (needs matplotlib)")
    g.add_argument("--plot-rates", default=None, help="rates for --plot (default 7 from rate/10 to rate x 10)")


# -- reading --------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UnlearnError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UnlearnError(f"{what} {path}: unreadable ({str(exc).splitlines()[0]})") from None


def profile_path(spec: str, option: str = "--profile") -> str:
    """A profile file, or a shipped profile's name."""
    path = spec if os.path.exists(spec) or spec.endswith(".json") else os.path.join(PROFILES, f"{spec}.json")
    if not os.path.exists(path):
        shipped = ", ".join(_profile_names())
        raise UnlearnError(f"{option} {spec!r}: no such file and not a shipped profile ({shipped})")
    return path


def load_profile(spec: str, option: str = "--profile") -> Profile:
    path = profile_path(spec, option)
    return Profile.from_json(_read_json(path, option), f"{option} {path}")


def load_accuracy(path: str) -> Accuracy:
    if path == "none":
        return Accuracy()
    if not os.path.exists(path):
        if os.path.abspath(path) == os.path.abspath(os.path.join(RESULTS, "sisa.json")):
            return Accuracy()  # the default, where no bench has run: no accuracy column
        raise UnlearnError(f"--accuracy {path}: no such file (give SISA bench results, or none)")
    d = _read_json(path, "--accuracy")
    try:
        sisa = {(int(r["shards"]), int(r["slices"])): float(r["accuracy_vote"]) for r in d["rows"]}
        source = f"{os.path.relpath(path, ROOT)}: {d.get('model')}, {d.get('records')} records, {d.get('date')}"
        records = int(d["records"]) if d.get("records") is not None else None
        return Accuracy(sisa=sisa, single=float(d["single_model_accuracy"]), source=source, records=records)
    except (KeyError, TypeError, ValueError):
        raise UnlearnError(f"--accuracy {path}: not SISA bench results (records, rows of shards, slices, "
                           f"accuracy_vote)") from None


def erase_measurements(folder: str) -> dict:
    """ERASE profile fields measured by the ERASE benches, as {field: (value, source)}.

    bench/results/erase_deletion.json: at its largest N and most partitions, the p50 of
    certified deletions (the certificate), the fallback rate, and re-clustering seconds
    per record (from scratch, all N). bench/results/holistic.json: ERASE's seconds per
    query on rotten_tomatoes (frozen SmolLM2, cached example prefix). A field these files
    do not give keeps its placeholder."""
    out: dict = {}
    path = os.path.join(folder, "erase_deletion.json")
    if os.path.exists(path):
        d = _read_json(path, "ERASE results")
        try:
            rows = d["rows"]
            big = max(r["N"] for r in rows)
            row = max((r for r in rows if r["N"] == big), key=lambda r: r["P"])
            src = f"measured: {os.path.relpath(path, ROOT)} (N={big}, P={row['P']}, {d.get('machine', '')})"
            if row.get("p50_certified_ms") is not None:
                out["erase_certificate_s"] = (row["p50_certified_ms"] / 1000, src + ": p50 certified deletion")
            out["erase_fallback_p"] = (float(row["fallback_rate"]), src + ": fallback rate")
            by_leaf: dict[float, list[float]] = {}
            for r in rows:
                by_leaf.setdefault(r["N"] / r["P"], []).append(float(r["fallback_rate"]))
            table = [[size, sum(p) / len(p)] for size, p in sorted(by_leaf.items())]
            out["erase_fallback_by_leaf"] = (table, f"measured: {os.path.relpath(path, ROOT)}: fallback rate "
                                                    f"by records per partition (N/P)")
            out["erase_recluster_s_per_record"] = (row["recluster_s"] / big, src + ": re-cluster from scratch / N")
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise UnlearnError(f"ERASE results {path}: not erase_deletion_bench output (rows of N, P, "
                               f"p50_certified_ms, fallback_rate, recluster_s)") from None
    path = os.path.join(folder, "holistic.json")
    if os.path.exists(path):
        d = _read_json(path, "ERASE results")
        try:
            task = next(t for t in d["tasks"] if t["task"] == "rotten_tomatoes")
            source = (f"measured: {os.path.relpath(path, ROOT)} (rotten_tomatoes, frozen LM, cached prefix, "
                      f"{d.get('date', '')})")
            out["erase_query_s"] = (float(task["holistic"]["I_s"]["erase"]), source)
            acc_path = os.path.join(folder, "erase_accuracy.json")
            shots = _read_json(acc_path, "ERASE results").get("shots") if os.path.exists(acc_path) else None
            if isinstance(shots, int):
                out["erase_k"] = (shots, f"measured: {os.path.relpath(acc_path, ROOT)}: shots of that query cost")
        except (KeyError, TypeError, ValueError, StopIteration):
            raise UnlearnError(f"ERASE results {path}: not holistic bench output (tasks with holistic.I_s)") from None
    return out


def erase_accuracy(folder: str, sisa: Accuracy) -> Accuracy:
    """ERASE's rotten_tomatoes accuracy from bench/results/erase_accuracy.json, if there
    (with contextual calibration where the bench reports it: what a deployment would use)."""
    from dataclasses import replace

    path = os.path.join(folder, "erase_accuracy.json")
    if not os.path.exists(path):
        return sisa
    d = _read_json(path, "ERASE results")
    try:
        task = next(t for t in d["tasks"] if t["task"] == "rotten_tomatoes")
        erase = task["methods"]["erase"]
        calibrated = erase.get("accuracy_calibrated") is not None
        acc = float(erase["accuracy_calibrated"] if calibrated else erase["accuracy"])
        pool = int(task["pool"]) if task.get("pool") is not None else None
    except (KeyError, TypeError, ValueError, StopIteration):
        raise UnlearnError(f"ERASE results {path}: not erase_accuracy_bench output") from None
    source = (sisa.source + "; " if sisa.source else "") + (
        f"ERASE: {os.path.relpath(path, ROOT)} ({d.get('lm')}, k={d.get('shots')}, pool of {pool} records, "
        f"{task.get('test')} queries{', contextual calibration' if calibrated else ''})")
    return replace(sisa, erase=acc, erase_records=pool, source=source)


# -- planning -------------------------------------------------------------------------------
def configs(args) -> list[Config]:
    methods = parse_list(args.methods, "--methods", lambda t, o: t)
    for m in methods:
        if m not in METHODS:
            raise UnlearnError(f"--methods {m!r}: not one of {', '.join(METHODS)}")
    windows = parse_list(args.window, "--window", parse_duration)
    workers = parse_list(args.workers, "--workers", parse_count)
    out = []
    for w in windows:
        if "sisa" in methods:
            for S in parse_list(args.shards, "--shards", parse_count):
                for R in parse_list(args.slices, "--slices", parse_count):
                    out += [Config("sisa", w, n, shards=S, slices=R) for n in workers]
        if "erase" in methods:
            for P in parse_list(args.partitions, "--partitions", parse_count):
                out += [Config("erase", w, n, partitions=P) for n in workers]
        if "full" in methods:
            out.append(Config("full", w, 1))
    return out


def plan_inputs(args) -> tuple[Profile, int, Demand, Accuracy]:
    from dataclasses import replace

    profile = load_profile(args.profile)
    if args.fallback is not None:
        p = float(parse_nonnegative(args.fallback, "--fallback"))
        if not 0 <= p <= 1:
            raise UnlearnError(f"--fallback {args.fallback!r}: must be in [0, 1]")
        profile = replace(profile, erase_fallback_p=p, erase_fallback_by_leaf=None)
    if args.records is not None:
        records = parse_count(args.records, "--records")
    elif profile.layout:
        records = profile.layout_records
    else:
        raise UnlearnError("--records: required (the profile was not calibrated on a run)")
    sla = parse_duration(args.sla, "--sla") if args.sla is not None else None
    price = parse_nonnegative(args.price, "--price") if args.price is not None else None
    demand = Demand(sla_s=sla, queries_per_day=parse_rate(args.queries, "--queries") * DAY, price_per_hour=price)
    accuracy = load_accuracy(args.accuracy)
    if args.accuracy != "none":
        accuracy = erase_accuracy(os.path.dirname(os.path.abspath(args.accuracy)), accuracy)
    for config in configs(args):  # more slices than records would plan empty slices (and huge tables)
        if config.shards * config.slices > records:
            raise UnlearnError(f"--shards {config.shards} x --slices {config.slices}: more slices than the "
                               f"{records} records")
    return profile, records, demand, accuracy


def parse_nonnegative(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UnlearnError(f"{option} {text!r}: not a number") from None
    if not (value >= 0 and value != float("inf")):
        raise UnlearnError(f"{option} {text!r}: must be a finite number >= 0")
    return value


def workload_for(args, profile: Profile, rate: float | None = None) -> Workload:
    if args.replay:
        if args.rate is not None:
            raise UnlearnError("--replay and --rate: give one of them")
        log = _read_json(args.replay, "--replay")
        return from_log(log, args.seed, profile.layout_shape, where=args.replay)
    if args.rate is None and rate is None:
        raise UnlearnError("--rate: required (or --replay a request log)")
    r = rate if rate is not None else parse_rate(args.rate, "--rate")
    horizon = parse_duration(args.horizon, "--horizon")
    desc = f"{args.rate} ({args.pattern}) for {args.horizon}"
    return generate(r, horizon, parse_pattern(args.pattern), args.seed, desc)


def plan(args, inputs: tuple[Profile, int, Demand, Accuracy], grid: list[Config]) -> dict:
    profile, records, demand, accuracy = inputs
    workload = workload_for(args, profile)
    rows = [row(simulate(workload, c, profile, records), demand, accuracy) for c in grid]
    cheapest = rank(rows)
    notes = list(workload.notes)
    deleted = int(workload.records.sum())
    if deleted > 0.1 * records:
        notes.append(f"the requests delete {deleted:,} records, {deleted / records:.0%} of {records:,}; the plan "
                     f"holds N constant (new data replacing deleted data)")
    return {
        "workload": {"description": workload.description, "requests": workload.requests,
                     "horizon_s": workload.horizon_s, "records": records, "notes": notes,
                     "queries_per_day": demand.queries_per_day},
        "profile": {"model": profile.model, "machine": profile.machine, "date": profile.date, "path": args.profile},
        "accuracy_source": accuracy.source or None,
        "cheapest": describe(cheapest) if cheapest else None,
        "configs": rows,
    }


def sweep(args, inputs: tuple[Profile, int, Demand, Accuracy], grid: list[Config]) -> dict:
    """p99 time-to-forget and holistic cost per configuration at each plotted rate."""
    profile, records, demand, accuracy = inputs
    if args.replay:
        raise UnlearnError("--plot draws against the rate: use it with --rate, not --replay")
    base = parse_rate(args.rate, "--rate")
    rates = (parse_list(args.plot_rates, "--plot-rates", parse_rate) if args.plot_rates
             else [base * 10 ** (e / 3) for e in range(-3, 4)])
    out = {"rates_per_day": [r * DAY for r in rates], "lines": []}
    results = {c: [] for c in grid}
    for r in rates:
        w = workload_for(args, profile, rate=r)
        for c in grid:
            results[c].append(row(simulate(w, c, profile, records), demand, accuracy))
    for c, rows in results.items():
        out["lines"].append({"label": label(c), **line_style(c, grid),
                             "p99_s": [x["time_to_forget_p99_s"] for x in rows],
                             "holistic_hours_per_day": [x["holistic_hours_per_day"] for x in rows],
                             "stable": [x["stable"] for x in rows]})
    return out


# tab10's colours, then tab20's light ones: distinct for up to 20 configurations
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]


def colors(grid: list[Config]) -> dict[Config, str]:
    """One colour per configuration, the same in both panels: the palette in grid order,
    or, for more than 20 configurations, hues spread evenly around the colour wheel."""
    import colorsys

    configs = list(dict.fromkeys(grid))
    if len(configs) <= len(PALETTE):
        return dict(zip(configs, PALETTE))
    out = {}
    for i, c in enumerate(configs):
        r, g, b = colorsys.hsv_to_rgb(i / len(configs), 0.85 if i % 2 else 0.6, 0.8 if i % 2 else 0.95)
        out[c] = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
    return out


def line_style(c: Config, grid: list[Config]) -> dict:
    """Colour by configuration (one each); line style by window and marker by method, as
    further cues."""
    windows = sorted({g.window_s for g in grid})
    return {"color": colors(grid)[c], "linestyle": ["-", "--", ":", "-."][windows.index(c.window_s) % 4],
            "marker": {"sisa": "o", "erase": "s", "full": "D"}[c.method]}


def label(c: Config) -> str:
    w = f"w={c.window_s:g}s" if c.window_s < 3600 else f"w={c.window_s / 3600:g}h"
    if c.method == "sisa":
        return f"SISA S={c.shards} R={c.slices} {w} n={c.workers}"
    if c.method == "erase":
        return f"ERASE P={c.partitions} {w} n={c.workers}"
    return f"full {w}"


def figure(data: dict, title: str, sla_s: float | None):
    """The plot's matplotlib figure (Agg): one line per configuration in each panel, in
    its colour; points where it is saturated drawn as open markers."""
    try:
        import matplotlib
    except ImportError:
        raise UnlearnError("--plot needs matplotlib: pip install 'unlearn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.4))
    x = data["rates_per_day"]
    for line in data["lines"]:
        style = dict(color=line["color"], linestyle=line["linestyle"], marker=line["marker"], ms=4)
        ys = ([max(v, 1e-3) / 3600 for v in line["p99_s"]], [max(v, 1e-6) for v in line["holistic_hours_per_day"]])
        for ax, y in zip((ax1, ax2), ys):
            ax.plot(x, y, label=line["label"], **style)
            off = [i for i, ok in enumerate(line.get("stable", [])) if not ok]
            if off:  # saturated points: open markers over the line
                ax.plot([x[i] for i in off], [y[i] for i in off], linestyle="none", marker=line["marker"], ms=7,
                        markerfacecolor="white", markeredgecolor=line["color"], label="_unstable")
    handles, labels = ax1.get_legend_handles_labels()
    if any(not ok for line in data["lines"] for ok in line.get("stable", [])):
        handles.append(Line2D([], [], linestyle="none", marker="o", ms=7, markerfacecolor="white",
                              markeredgecolor="black"))
        labels.append(UNSTABLE)
    if sla_s:
        handles.append(ax1.axhline(sla_s / 3600, color="black", lw=0.8, linestyle=(0, (6, 3))))
        labels.append("SLA")
    for ax, ylabel in ((ax1, "p99 time-to-forget (hours)"), (ax2, "compute hours a day (deletions + queries)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("deletion requests a day")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", lw=0.3)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return fig


def draw(data: dict, path: str, title: str, sla_s: float | None) -> None:
    import matplotlib.pyplot as plt

    fig = figure(data, title, sla_s)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise UnlearnError(f"--plot {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"unlearn: {message}", file=sys.stderr, flush=True)


def run_plan(args) -> int:
    inputs, grid = plan_inputs(args), configs(args)
    out = plan(args, inputs, grid)
    if args.plot:
        data = sweep(args, inputs, grid)
        title = (f"{out['workload']['records']:,} records, profile {out['profile']['model']} "
                 f"({out['profile']['machine']}, {out['profile']['date']}), pattern {args.pattern}, "
                 f"horizon {args.horizon}, queries {args.queries}")
        draw(data, args.plot, title, out["configs"][0]["sla_s"] if out["configs"] else None)
        out["plot"] = {"path": args.plot, **data}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    w = out["workload"]
    head = (f"{w['description']}: {w['requests']} requests over {w['horizon_s'] / DAY:.3g} days, "
            f"{w['records']:,} records; profile {out['profile']['model']} ({out['profile']['machine']}, "
            f"{out['profile']['date']})")
    print(head + "\n")
    print(markdown_table(out["configs"]) if args.markdown else text_table(out["configs"]))
    notes = list(w["notes"])
    rows = out["configs"]
    ranked = sum(r["rank"] is not None for r in rows)
    unstable = sum(not r["stable"] for r in rows)
    late = sum(bool(r["stable"] and r["sla_violations"]) for r in rows)
    notes.append(f"cheapest: {out['cheapest']} (rank 1 of {ranked}: holistic h/day among the stable configurations"
                 f"{' within the SLA' if args.sla is not None else ''})" if out["cheapest"]
                 else "cheapest: none ranked (no configuration is stable"
                      f"{' and within the SLA' if args.sla is not None else ''})")
    if unstable or late:
        notes.append(f"not ranked: {unstable} {UNSTABLE}" + (f", {late} over the SLA" if late else "") +
                     f"; saturated: a batch applying >= {BUSY_LIMIT:.0%} of the second half of the horizon, so "
                     f"its h/day is its workers' capacity, not what the rate costs")
    if out["accuracy_source"]:
        notes.append(f"acc. cost: single-model accuracy minus the method's, from {out['accuracy_source']}")
    for note in dict.fromkeys(r["accuracy_note"] for r in rows if r["accuracy_note"]):
        notes.append(f'acc. cost "not at N" (not measured at this N): {note}')
    notes.append("retrain/req: retraining work per request, fraction of one full training; "
                 "h/day: worker compute hours a day")
    if args.plot:
        notes.append(f"plot: {args.plot}")
    print("\n" + "\n".join(notes))
    return 0


def refresh_erase(profile: Profile, erase: dict) -> Profile:
    """The profile with its ERASE fields (and their sources) taken from `erase`."""
    from dataclasses import replace

    if not erase:
        raise UnlearnError("--refresh-erase: no ERASE results in --erase-results (erase_deletion.json, holistic.json)")
    return replace(profile, **{k: v for k, (v, _src) in erase.items()},
                   sources={**profile.sources, **{k: src for k, (_v, src) in erase.items()}})


def run_profile(args) -> int:
    from dataclasses import replace

    from sisa.config import SisaConfig
    from core.sources import load_records
    from core.records import with_labels

    from .profile import calibrate_run, measure

    erase = erase_measurements(args.erase_results)

    def progress(message: str) -> None:
        _say(args, message)

    n = parse_count(args.records, "--records", minimum=16)
    if args.refresh_erase:
        profile = refresh_erase(load_profile(args.refresh_erase, "--refresh-erase"), erase)
        args.out = args.out or profile_path(args.refresh_erase, "--refresh-erase")  # in place, shipped or not
    elif args.run:
        from core.store import open_store

        profile = calibrate_run(open_store(args.store), args.run, erase, sample=n, repeats=args.repeats,
                                progress=progress)
    else:
        config = SisaConfig(shards=2, slices=2, epochs=args.epochs, model=args.model, batch_size=args.batch_size,
                            max_length=args.max_length)
        records = load_records(args.data or f"dataset:rotten_tomatoes?split=train&limit={n}")[:n]
        config = with_labels(config, records)
        profile = measure(config, records, erase, repeats=args.repeats, k=args.k, progress=progress)
        profile = replace(profile, notes=profile.notes + f"; data {args.data or 'dataset:rotten_tomatoes'}")
    out = args.out or f"unlearn-profile-{os.path.basename(profile.model.rstrip('/'))}.json"
    try:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(profile.to_json(), f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise UnlearnError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    _say(args, f"profile of {profile.model} written to {out}")
    if args.json:
        print(json.dumps(profile.to_json(), indent=1))
    return 0


def run(args) -> int:
    """Run `profile` or `plan`; raises UnlearnError for user errors."""
    if args.command == "plan":
        return run_plan(args)
    if args.command == "profile":
        return run_profile(args)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn", description="capacity planning (profile, plan)")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UnlearnError as exc:
        print(f"unlearn: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
