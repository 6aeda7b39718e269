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
import secrets
import sys
from functools import partial
from typing import Callable, Sequence

from cluster import options as opt
from cluster.options import OptionError
from core.errors import UnlearnError
from core.records import quote

from .costs import FIELDS, Config, Profile
from .profile import MAX_PROFILE_EXAMPLES, check_examples
from .report import ACCURACY_SPAN, UNSTABLE, Accuracy, Demand, describe, markdown_table, rank, row, text_table
from .simulate import BUSY_LIMIT, simulate
from .workload import (DAY, MAX_LIST, MAX_REQUESTS, Workload, check_requests, expected_requests, from_log, generate, parse_count,
                       parse_duration, parse_list, parse_pattern, parse_rate)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROFILES = os.path.join(HERE, "profiles")
RESULTS = os.path.join(ROOT, "bench", "results")
METHODS = ("sisa", "erase", "full")

# What a plan may simulate: a plan takes seconds to a minute, not hours.
MAX_CONFIGS = 1000  # every combination of the comma lists
MAX_WORK = 5e7  # requests x configurations, over every rate --plot draws
MAX_PLOT_RATES = 20
MAX_WORKERS = 10_000
MAX_PRICE = 1e6
# What a profile may measure: its timings train on --records records for --epochs, --repeats times.
PROFILE_RECORDS = (16, 10_000)
MAX_REPEATS = 10


# -- option values: each an argparse type (a bad one is one line, exit 2) -------------------
def _type(parse: Callable, text: bool = False) -> Callable[[str], object]:
    """An argparse type from a parser here (which raises OptionError): the parsed value,
    or with `text` the text itself once it parses (descriptions show it as given)."""
    def convert(value: str):
        try:
            parsed = parse(value, "")
        except OptionError as exc:
            raise argparse.ArgumentTypeError(exc.why) from None
        return value if text else parsed

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def request_rate(text: str, option: str = "--rate") -> float:
    return parse_rate(text, option, above=True)


def query_rate(text: str, option: str = "--queries") -> float:
    return parse_rate(text, option)


def horizon(text: str, option: str = "--horizon") -> float:
    return parse_duration(text, option, above=True)


def method(text: str, option: str = "--methods") -> str:
    if text not in METHODS:
        raise OptionError(option, f"must be one of {', '.join(METHODS)}, got {opt._shown(text)}")
    return text


def counts(most: int) -> Callable:
    """A comma list of whole numbers in 1..most."""
    return partial(parse_list, parse=partial(parse_count, maximum=most))

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

limits: --rate and --plot-rates in (0, 1e6] a second, --queries in [0, 1e6]; --horizon
and --sla in (0, 3650d], --window in [0, 3650d]; --records 1..1e12; --shards
1..{opt.MAX_SHARDS}, --slices 1..{opt.MAX_SLICES}, --partitions 1..{opt.MAX_PARTITIONS}, --workers 1..{MAX_WORKERS}; a list holds
at most {MAX_LIST} values, none twice. A plan simulates at most {MAX_CONFIGS} configurations,
{MAX_REQUESTS:.0e} requests a rate, {MAX_WORK:.0e} requests x configurations over its rates (--plot's
included), and no more slices (S x R) or partitions than --records.

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
    p.add_argument("--records", type=_type(partial(parse_count, minimum=PROFILE_RECORDS[0],
                                                   maximum=PROFILE_RECORDS[1])), default="96",
                   help=f"how many records to time on, {PROFILE_RECORDS[0]}..{PROFILE_RECORDS[1]} (default 96)")
    p.add_argument("--epochs", type=opt.epochs, default="3",
                   help="epochs of one full training, as `unlearn train --epochs` (default 3); --epochs x --records "
                        f"at most {MAX_PROFILE_EXAMPLES:,}")
    p.add_argument("--batch-size", type=opt.bounded(int, 1, opt.MAX_BATCH), default=16,
                   help=f"training batch size, 1..{opt.MAX_BATCH} (default 16)")
    p.add_argument("--max-length", type=opt.bounded(int, opt.MIN_LENGTH, opt.MAX_LENGTH), default=64,
                   help="tokens per text, at most the model's positions (default 64)")
    p.add_argument("--k", type=opt.bounded(int, 1, opt.MAX_SHOTS), default=4,
                   help=f"ERASE: examples in a prompt, for the per-query cost, 1..{opt.MAX_SHOTS} (default 4)")
    p.add_argument("--repeats", type=opt.bounded(int, 1, MAX_REPEATS), default=2,
                   help=f"repeats of each timing, 1..{MAX_REPEATS}; the minimum is kept (default 2)")
    p.add_argument("--run", default=None, type=opt.run_name,
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
    g.add_argument("--rate", type=_type(request_rate, text=True), default=None,
                   help="mean rate of deletion requests, e.g. 500/day (one data owner each)")
    g.add_argument("--pattern", type=_type(parse_pattern, text=True), default="poisson",
                   help="shape of the rate: poisson (default); daily:A[@HOUR] a daily cycle peaking at (1+A) x the "
                        "mean at HOUR (default 14); spike:AT,FOR,X the rate x X from AT for FOR (e.g. "
                        "spike:30d,2d,20); join with +")
    g.add_argument("--replay", default=None, help="replay a request log (`unlearn requests --run R --json > LOG`) "
                                                  "instead of --rate; configurations of the profile's calibrated "
                                                  "shape replay the shards and stages the log records")
    g.add_argument("--horizon", type=_type(horizon, text=True), default="90d",
                   help="how long requests arrive (default 90d; a replay lasts as long as its log)")
    g.add_argument("--records", type=_type(parse_count), default=None,
                   help="training records N, e.g. 1e6 (default: the profile's calibrated run)")
    g.add_argument("--queries", type=_type(query_rate, text=True), default="0/day",
                   help="rate of inference queries, for the holistic cost (default 0/day)")
    g.add_argument("--seed", type=opt.bounded(int, 0, opt.MAX_SEED), default=0,
                   help="seed of arrivals and placements (default 0)")
    g = p.add_argument_group("configurations (comma lists; every combination is simulated)")
    g.add_argument("--methods", type=_type(partial(parse_list, parse=method)), default=",".join(METHODS),
                   help="which of sisa, erase, full (default all)")
    g.add_argument("--shards", type=_type(counts(opt.MAX_SHARDS)), default="8", help="SISA shards S (default 8)")
    g.add_argument("--slices", type=_type(counts(opt.MAX_SLICES)), default="4",
                   help="SISA slices per shard R (default 4)")
    g.add_argument("--partitions", type=_type(counts(opt.MAX_PARTITIONS)), default="8",
                   help="ERASE partitions P of divide-and-conquer k-means (default 8)")
    g.add_argument("--window", type=_type(partial(parse_list, parse=parse_duration)), default="0",
                   help="batching window of the coordinator (default 0: apply at once)")
    g.add_argument("--workers", type=_type(counts(MAX_WORKERS)), default="4",
                   help="shard or partition retrainings that run at once (default 4)")
    g.add_argument("--fallback", type=opt.bounded(float, 0, 1), default=None,
                   help="ERASE fallback probability per deletion, in [0, 1] (default: the profile's, by records per "
                        "partition where the ERASE bench measured it)")
    g = p.add_argument_group("costs and limits")
    g.add_argument("--profile", default="minilm",
                   help=f"a profile JSON from `unlearn profile`, or a shipped one ({', '.join(_profile_names())}; "
                        f"default minilm)")
    g.add_argument("--sla", type=_type(horizon), default=None,
                   help="time-to-forget limit; requests over it are counted (e.g. 30d)")
    g.add_argument("--price", type=opt.bounded(float, 0, MAX_PRICE), default=None,
                   help="price of one compute hour, to print a cost a day")
    g.add_argument("--accuracy", default=os.path.join(RESULTS, "sisa.json"),
                   help="SISA bench results to charge the accuracy cost of S and R from, where they were "
                        "measured on N/10 to 10N records (N: --records); ERASE's from erase_accuracy.json beside "
                        "it (default bench/results/sisa.json; `none` to leave it out)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help='print {"configs": [...]} on stdout instead of a table')
    g.add_argument("--markdown", action="store_true", help="print the table as markdown")
    g.add_argument("--plot", default=None, help="draw p99 time-to-forget and holistic cost against the rate, one "
                                                "line and colour per configuration, open markers where it is "
                                                "saturated, into this .png file (needs matplotlib)")
    g.add_argument("--plot-rates", type=_type(partial(parse_list, parse=request_rate, most=MAX_PLOT_RATES)),
                   default=None, help=f"rates for --plot, at most {MAX_PLOT_RATES} (default 7 from rate/10 to "
                                      f"rate x 10)")


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
GRID = "--methods x --shards x --slices x --partitions x --window x --workers"


def configs(args) -> list[Config]:
    """Every combination of the comma lists (parsed by their argparse types), at most
    MAX_CONFIGS of them (counted before any is made)."""
    methods, windows, workers = args.methods, args.window, args.workers
    count = len(windows) * (len(args.shards) * len(args.slices) * len(workers) * ("sisa" in methods)
                            + len(args.partitions) * len(workers) * ("erase" in methods) + ("full" in methods))
    if count > MAX_CONFIGS:
        raise OptionError(GRID, f"{count:,} configurations (every combination is simulated); at most {MAX_CONFIGS}")
    out = []
    for w in windows:
        if "sisa" in methods:
            for S in args.shards:
                for R in args.slices:
                    out += [Config("sisa", w, n, shards=S, slices=R) for n in workers]
        if "erase" in methods:
            for P in args.partitions:
                out += [Config("erase", w, n, partitions=P) for n in workers]
        if "full" in methods:
            out.append(Config("full", w, 1))
    return out


def check_plan(args) -> None:
    """The checks that need more than one option, before any file is read: one of --rate
    and --replay; --plot's file (a .png in a folder that exists) and matplotlib."""
    if args.replay is not None and args.rate is not None:
        raise OptionError("--replay", "give --replay or --rate, not both")
    if args.replay is None and args.rate is None:
        raise OptionError("--rate", "required (or --replay a request log)")
    if args.plot_rates is not None and args.plot is None:
        raise OptionError("--plot-rates", "only with --plot")
    if args.plot is None:
        return
    if args.replay is not None:
        raise OptionError("--plot", "draws against the rate: use it with --rate, not --replay")
    if not args.plot.lower().endswith(".png"):
        raise OptionError("--plot", f"must name a .png file, got {quote(args.plot)}")
    check_writable(args.plot, "--plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UnlearnError("--plot needs matplotlib: pip install 'unlearn[plot]'") from None


def check_writable(path: str, option: str) -> None:
    """An output file whose folder exists and can be written: found before the work, not
    after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UnlearnError(f"{option} {path}: is a folder, not a file")
    if not os.path.isdir(folder):
        raise UnlearnError(f"{option} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UnlearnError(f"{option} {path}: cannot write in {folder}")


def write_atomically(path: str, option: str, write: Callable[[str], None]) -> None:
    """`write(temporary path)` beside `path`, then renamed over it: a failed or interrupted
    write leaves no file, and no half of one."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise UnlearnError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plan_inputs(args, grid: list[Config]) -> tuple[Profile, int, Demand, Accuracy]:
    from dataclasses import replace

    profile = load_profile(args.profile)
    if args.fallback is not None:
        profile = replace(profile, erase_fallback_p=args.fallback, erase_fallback_by_leaf=None)
    if args.records is not None:
        records = args.records
    elif profile.layout:
        records = profile.layout_records
    else:
        raise OptionError("--records", "required (the profile was not calibrated on a run)")
    demand = Demand(sla_s=args.sla, queries_per_day=query_rate(args.queries) * DAY, price_per_hour=args.price)
    accuracy = load_accuracy(args.accuracy)
    if args.accuracy != "none":
        accuracy = erase_accuracy(os.path.dirname(os.path.abspath(args.accuracy)), accuracy)
    for config in grid:  # more slices or partitions than records would plan empty ones (train refuses them)
        if config.method == "sisa" and config.shards * config.slices > records:
            raise OptionError(f"--shards {config.shards} x --slices {config.slices}",
                              f"more slices than the {records:,} records (--records)")
        if config.method == "erase" and config.partitions > records:
            raise OptionError(f"--partitions {config.partitions}", f"more partitions than the {records:,} records "
                                                                   f"(--records)")
    return profile, records, demand, accuracy


def plot_rates(args) -> list[float]:
    """The rates --plot draws, per second."""
    if args.plot_rates is not None:
        return args.plot_rates
    base = request_rate(args.rate)
    return [base * 10 ** (e / 3) for e in range(-3, 4)]


def check_work(args, grid: list[Config], requests: float | None = None) -> None:
    """Refuse a plan that would take more than a minute or so: requests x configurations
    over every simulated rate (the plan's, and --plot's) at most MAX_WORK. Generated
    streams are counted from their expected size, before any is generated; a replay by
    its log."""
    if requests is None:  # a generated stream: its size grows with the rate
        per_rate = expected_requests(1.0, parse_pattern(args.pattern), horizon(args.horizon))
        rates = [request_rate(args.rate)]
        check_requests(rates[0] * per_rate)
        if args.plot is not None:
            rates += plot_rates(args)
            check_requests(max(rates) * per_rate, "--plot-rates" if args.plot_rates else "--plot")
        requests = sum(rates) * per_rate
        what, option = f"at {len(rates)} rates" if len(rates) > 1 else "", "--rate x --horizon"
    else:
        what, option = "", "--replay"
    work = requests * len(grid)
    if work > MAX_WORK:
        raise OptionError(option, f"about {requests:.3g} requests{' ' + what if what else ''} through {len(grid)} "
                                  f"configurations is {work:.3g} simulated; at most {MAX_WORK:.0e} (a shorter "
                                  f"--horizon gives the same rates a day; or fewer configurations)")


def workload_for(args, profile: Profile, rate: float | None = None) -> Workload:
    if args.replay:
        log = _read_json(args.replay, "--replay")
        return from_log(log, args.seed, profile.layout_shape, where=args.replay)
    r = rate if rate is not None else request_rate(args.rate)
    desc = f"{args.rate} ({args.pattern}) for {args.horizon}"
    return generate(r, horizon(args.horizon), parse_pattern(args.pattern), args.seed, desc)


def plan(args, inputs: tuple[Profile, int, Demand, Accuracy], grid: list[Config]) -> dict:
    profile, records, demand, accuracy = inputs
    workload = workload_for(args, profile)
    if args.replay:
        check_work(args, grid, workload.requests)
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
    rates = plot_rates(args)
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
        write_atomically(path, "--plot", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"unlearn: {message}", file=sys.stderr, flush=True)


def run_plan(args) -> int:
    check_plan(args)
    grid = configs(args)
    inputs = plan_inputs(args, grid)
    if not args.replay:
        check_work(args, grid)
    out = plan(args, inputs, grid)
    if args.plot is not None:
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


def check_profile(args) -> None:
    """Before anything is read or loaded: --max-length against the model's positions, the
    training a timing takes, and --out's folder."""
    if not args.refresh_erase and not args.run:  # with --run, the run's configuration
        opt.check_max_length(args.model, args.max_length)
        check_examples(args.epochs, args.records)
    if args.out is not None or not args.refresh_erase:  # by default the profile goes to this folder
        check_writable(args.out if args.out is not None else "unlearn-profile.json", "--out")


def run_profile(args) -> int:
    from dataclasses import replace

    from sisa.config import SisaConfig
    from core.sources import load_records
    from core.records import with_labels

    from .profile import calibrate_run, measure

    check_profile(args)
    erase = erase_measurements(args.erase_results)

    def progress(message: str) -> None:
        _say(args, message)

    n = args.records
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

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(profile.to_json(), f, indent=1)
            f.write("\n")

    write_atomically(out, "--out", write)
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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), as `unlearn` says them."""

    def error(self, message: str):
        self.exit(2, f"unlearn: error: {self.prog.removeprefix('unlearn').strip() or 'usage'}: {message}; "
                     f"see {self.prog} --help\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="unlearn", description="capacity planning (profile, plan)")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except OptionError as exc:  # found after parsing: said the way argparse says them
        print(f"unlearn: error: {args.command}: {exc}; see unlearn {args.command} --help", file=sys.stderr)
        return 2
    except UnlearnError as exc:
        print(f"unlearn: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
