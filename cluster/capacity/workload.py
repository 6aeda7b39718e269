"""Deletion-request streams: Poisson at a rate, daily peaks, campaign spikes, or the
replay of a request log exported by the coordinator (`unlearn requests --json`).

Pure code. Every random choice is a keyed hash of (seed, purpose, request id), the
request id being its position in a generated stream or its id in a replayed log, so
one stream is identical for every configuration it is run through: differences
between configurations are never sampling noise.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from cluster.options import OptionError, _shown
from core.errors import UnlearnError
from core.keys import keyed_hash, keyed_uniform
from core.records import quote

DAY = 86400.0
MAX_REQUESTS = 1e7  # arrivals are generated one by one: keep a plan to seconds, not hours
# What the options may be: finite, and small enough that a plan takes seconds to a minute.
MAX_RATE = 1e6  # requests (or queries) a second
MAX_DURATION_S = 3650 * DAY  # horizon, windows, SLA, pattern times: ten years
MAX_COUNT = 10**12  # records
MAX_LIST = 1000  # values in one comma list
MAX_SPIKES = 100
MAX_SPIKE_FACTOR = 1e6
UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "d": DAY, "day": DAY,
         "w": 7 * DAY, "week": 7 * DAY}


@dataclass(frozen=True)
class Spike:
    start_s: float
    duration_s: float
    factor: float  # the rate is multiplied by this inside [start, start + duration)


@dataclass(frozen=True)
class Pattern:
    """Shape of the arrival rate around its mean: a daily cosine (peak at `peak_s`
    seconds after midnight, rate x (1 + amplitude) at the peak) and spikes."""
    daily_amplitude: float = 0.0
    peak_s: float = 14 * 3600.0
    spikes: tuple[Spike, ...] = ()


@dataclass(frozen=True)
class Recorded:
    """Where a replayed log's requests really retrained, valid for a run of `shards` x
    `slices`: one hit per (request, shard), with the first stage redone there. A request
    whose records were all deleted before has no hit."""
    shards: int
    slices: int
    hit_request: np.ndarray
    shard: np.ndarray
    stage: np.ndarray


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival. A request deletes `records[i]` records through one or
    more hits (one per shard it touches); generated requests are single data owners,
    one hit each. `shard_key` and `slice_key` are keyed hashes per hit from which a
    configuration takes shard (or ERASE partition) and slice by modulo; `fallback_u`
    decides whether an ERASE certificate fails."""
    arrival_s: np.ndarray
    records: np.ndarray
    hit_request: np.ndarray  # request index of each hit, non-decreasing
    shard_key: np.ndarray
    slice_key: np.ndarray
    fallback_u: np.ndarray
    horizon_s: float
    description: str
    recorded: Recorded | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def requests(self) -> int:
        return len(self.arrival_s)


# -- parsing (one line naming the option, the allowed range and the value on bad input) ----
def shown(text: str) -> str:
    """A value as given, in a message: quoted where it is empty, padded or unprintable."""
    return _shown(text) if text and text.strip() == text else quote(text)


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def duration_text(seconds: float) -> str:
    """90 -> 90s, 3600 -> 1h, 86400 -> 1d: a limit as `--horizon` takes it."""
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}" + ("s" if seconds else "")


def count_text(n: float) -> str:
    return f"{n:.0e}".replace("e+0", "e").replace("e+", "e") if n >= 10**6 else f"{n:g}"


def _interval(low: float, high: float, above: bool, show=lambda v: f"{v:g}") -> str:
    return f"{'(' if above else '['}{show(low)}, {show(high)}]"


def _inside(value: float | None, low: float, high: float, above: bool) -> bool:
    return value is not None and math.isfinite(value) and (low < value if above else low <= value) and value <= high


def parse_duration(text: str, option: str = "duration", low: float = 0.0, high: float = MAX_DURATION_S,
                   above: bool = False) -> float:
    """`0`, `90s`, `5min`, `1h`, `30d`, `2w`, or a bare number of seconds, in [low, high]
    ((low, high] with `above`)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-z]*)\s*", text)
    value = _finite(m.group(1)) if m and (not m.group(2) or m.group(2) in UNITS) else None
    value = value * UNITS.get(m.group(2), 1.0) if value is not None else None
    if not _inside(value, low, high, above):
        raise OptionError(option, f"must be a duration in {_interval(low, high, above, duration_text)} (like "
                                  f"{'' if above else '0, '}90s, 5min, 1h, 30d, 2w), got {shown(text)}")
    return value + 0.0


def parse_rate(text: str, option: str = "rate", low: float = 0.0, high: float = MAX_RATE,
               above: bool = False) -> float:
    """`500/day`, `2/h`, `0.1/s`, `3/min`, `10/week`: events per second, in [low, high]
    ((low, high] with `above`)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*/\s*([a-z]+)\s*", text)
    value = _finite(m.group(1)) if m and m.group(2) in UNITS else None
    value = value / UNITS[m.group(2)] if value is not None else None
    if not _inside(value, low, high, above):
        raise OptionError(option, f"must be a rate in {_interval(low, high, above)} per second (like 500/day, 2/h, "
                                  f"0.1/s), got {shown(text)}")
    return value + 0.0


def parse_count(text: str, option: str = "count", minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """`1e6`, `1000`: a whole number in minimum..maximum."""
    value = _finite(text)
    if not _inside(value, minimum, maximum, False) or value != int(value):
        raise OptionError(option, f"must be a whole number in {count_text(minimum)}..{count_text(maximum)} "
                                  f"(like 1000 or 1e6), got {shown(text)}")
    return int(value)


def parse_list(text: str, option: str, parse, most: int = MAX_LIST) -> list:
    """A comma-separated list of `parse(item, option)` values: no empty item, no value twice."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise OptionError(option, f"empty item in the list {shown(text)}")
    if len(items) > most:
        raise OptionError(option, f"{len(items)} values; at most {most}")
    values = [parse(t, option) for t in items]
    for i, v in enumerate(values):
        if v in values[:i]:
            raise OptionError(option, f"{shown(items[i])} repeats a value of the list {shown(text)}")
    return values


PATTERNS = "poisson, daily:A[@HOUR], spike:AT,FOR,FACTOR; join with +"


def parse_pattern(text: str, option: str = "--pattern") -> Pattern:
    """`poisson`, `daily:A[@HH]` (daily cosine, peak rate x (1+A) at hour HH, default 14),
    `spike:AT,FOR,X` (rate x X from AT for FOR); combine with `+`."""
    amplitude, peak, spikes, daily = 0.0, 14 * 3600.0, [], False

    def bad(part: str, why: str):
        return OptionError(option, f"in {shown(part)}: {why}")

    for part in text.split("+"):
        part = part.strip()
        kind, _, arg = part.partition(":")
        if kind == "poisson" and not arg:
            continue
        if kind == "daily" and arg and not daily:
            daily = True
            a, _, hour = arg.partition("@")
            amplitude = _finite(a)
            if not _inside(amplitude, 0.0, 1.0, False):
                raise bad(part, f"the daily amplitude must be a number in [0, 1], got {shown(a)}")
            if hour:
                h = _finite(hour)
                if h is None or not 0 <= h < 24:
                    raise bad(part, f"the peak hour must be a number in [0, 24), got {shown(hour)}")
                peak = h * 3600.0
            continue
        if kind == "spike" and arg.count(",") == 2 and len(spikes) < MAX_SPIKES:
            at, length, factor = arg.split(",")
            f = _finite(factor)
            if not _inside(f, 0.0, MAX_SPIKE_FACTOR, False):
                raise bad(part, f"the spike factor must be a number in [0, {MAX_SPIKE_FACTOR:g}], got {shown(factor)}")
            try:
                spikes.append(Spike(parse_duration(at, option), parse_duration(length, option), f))
            except OptionError as exc:
                raise bad(part, f"the spike's start and length {exc.why}") from None
            continue
        if kind == "daily" and daily:
            raise bad(part, "a second daily cycle (give one)")
        if kind == "spike" and len(spikes) >= MAX_SPIKES:
            raise bad(part, f"more than {MAX_SPIKES} spikes")
        raise OptionError(option, f"{shown(part)} is not a pattern ({PATTERNS})")
    return Pattern(amplitude, peak, tuple(spikes))


# -- generation -------------------------------------------------------------------------------
def cumulative_intensity(rate_per_s: float, pattern: Pattern, horizon_s: float,
                         step_s: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """(times, expected arrivals by each time) on a grid, integrating the rate exactly
    for the cosine and by grid cell for spikes (whose edges are rounded to the grid)."""
    t = np.linspace(0.0, horizon_s, max(2, math.ceil(horizon_s / step_s) + 1))
    w = 2 * math.pi / DAY
    base = t + pattern.daily_amplitude / w * (np.sin(w * (t - pattern.peak_s)) - math.sin(-w * pattern.peak_s))
    rate = np.ones(len(t) - 1)
    mid = (t[:-1] + t[1:]) / 2  # increasing: a spike is the cells whose middle is in [start, start + duration)
    for sp in pattern.spikes:
        rate[np.searchsorted(mid, sp.start_s):np.searchsorted(mid, sp.start_s + sp.duration_s)] *= sp.factor
    cum = np.concatenate([[0.0], np.cumsum(np.diff(base) * rate)])
    return t, rate_per_s * cum


def request_keys(request_ids: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard key, slice key, ERASE fallback uniform) per request. Shard and slice keys
    are the low and high 32 bits of one keyed hash: independent, uniform modulo any S
    or R far below 2^32, and half the hashing of a year of requests."""
    place = np.array([keyed_hash(seed, "plan-place", r) for r in request_ids], dtype=np.uint64)
    fallback = np.array([keyed_uniform(seed, "plan-fallback", r) for r in request_ids], dtype=float)
    return place & np.uint64(0xFFFFFFFF), place >> np.uint64(32), fallback


def check_requests(expected: float, option: str = "--rate") -> None:
    """A stream of about `expected` requests must be small enough to generate in seconds."""
    if not expected <= MAX_REQUESTS:
        raise OptionError(option, f"about {expected:.3g} requests over --horizon ({option} x --horizon, shaped by "
                                  f"--pattern); at most {MAX_REQUESTS:.0e} are simulated (a shorter --horizon gives "
                                  f"the same rates a day)")


def expected_requests(rate_per_s: float, pattern: Pattern, horizon_s: float) -> float:
    """How many requests a generated stream holds on average."""
    return float(cumulative_intensity(rate_per_s, pattern, horizon_s)[1][-1])


def generate(rate_per_s: float, horizon_s: float, pattern: Pattern = Pattern(), seed: int = 0,
             description: str = "") -> Workload:
    """Arrivals of a Poisson process with the pattern's time-varying rate, by time
    rescaling: unit-rate points in expected-arrival space, mapped back through the
    inverse cumulative intensity. Point i's gap is a keyed Exp(1) of request i."""
    if not 0 < horizon_s <= MAX_DURATION_S:
        raise OptionError("--horizon", f"must be a duration in (0, {duration_text(MAX_DURATION_S)}], got "
                                       f"{horizon_s:g} s")
    t, cum = cumulative_intensity(rate_per_s, pattern, horizon_s)
    total = cum[-1]
    check_requests(total)
    points: list[float] = []
    s, i = 0.0, 0
    while True:
        s += -math.log(keyed_uniform(seed, "plan-arrival", i))
        if s >= total:
            break
        points.append(s)
        i += 1
    arrival = np.interp(np.array(points), cum, t) if points else np.zeros(0)
    ids = [f"req{i}" for i in range(len(points))]
    shard, slice_, fallback = request_keys(ids, seed)
    n = len(ids)
    return Workload(arrival_s=arrival, records=np.ones(n, dtype=np.int64), hit_request=np.arange(n),
                    shard_key=shard, slice_key=slice_, fallback_u=fallback, horizon_s=horizon_s,
                    description=description)


def _epoch_s(text: str, where: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        raise UnlearnError(f"{where}: 'accepted' is not an ISO time: {text!r}") from None


def from_log(log: dict, seed: int = 0, shape: tuple[int, int] | None = None, where: str = "request log") -> Workload:
    """A workload from `unlearn requests --json`: arrival at each request's accepted time
    (relative to the first), records deleted as in its receipt. With `shape` (the run's
    shards x slices) and a receipt for every request, configurations of that shape
    replay the shards and first stages really retrained; other configurations place each
    request by keyed hash of its id. Failed requests deleted nothing and are left out."""
    entries = log.get("requests") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise UnlearnError(f"{where}: expected {{\"requests\": [...]}} as written by `unlearn requests --json`")
    rows, notes = [], []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "request_id" not in e or "accepted" not in e:
            raise UnlearnError(f"{where}: request {n} lacks 'request_id' or 'accepted'")
        if not isinstance(e["request_id"], str) or not e["request_id"]:
            raise UnlearnError(f"{where}: request {n}: 'request_id' is not a string")
        if not isinstance(e.get("shards") or [], list):
            raise UnlearnError(f"{where}: request {e['request_id']!r}: 'shards' is not a list")
        if e.get("status") != "failed":
            rows.append(e)
    seen = [e["request_id"] for e in entries]
    if len(set(seen)) != len(seen):
        dup = next(r for r in seen if seen.count(r) > 1)
        raise UnlearnError(f"{where}: request {dup!r} appears twice")
    if not rows:
        raise UnlearnError(f"{where}: no requests to replay")
    if len(rows) < len(entries):
        notes.append(f"{len(entries) - len(rows)} failed requests left out")
    times = {e["request_id"]: _epoch_s(e["accepted"], f"{where}: request {e['request_id']!r}") for e in rows}
    rows.sort(key=lambda e: (times[e["request_id"]], e["request_id"]))
    t0 = times[rows[0]["request_id"]]
    arrival = np.array([times[e["request_id"]] - t0 for e in rows])
    records = np.array([_records(e, where) for e in rows], dtype=np.int64)
    recorded = None
    if shape is not None:
        if all(e.get("status") == "done" for e in rows):
            recorded = _recorded(rows, shape, where)
        else:
            notes.append("some requests have no receipt yet: every request is placed by keyed hash")
    ids = [e["request_id"] for e in rows]
    shard, slice_, fallback = request_keys(ids, seed)
    span = float(arrival[-1])
    if span < DAY:  # rates a day (hours a day, stability) need at least a day to mean anything
        notes.append(f"the log spans {span:.0f} s: it is read as one day of requests")
        span = DAY
    return Workload(arrival_s=arrival, records=records, hit_request=np.arange(len(rows)), shard_key=shard,
                    slice_key=slice_, fallback_u=fallback, horizon_s=span,
                    description=f"replay of {len(rows)} requests ({where})", recorded=recorded, notes=tuple(notes))


def _records(e: dict, where: str) -> int:
    """Records a request deleted (its receipt), or asked for while still pending; at least 1."""
    try:
        done = int(e.get("records_deleted") or 0)
        asked = sum(int(v) for v in (e.get("requested") or {}).values())
        if done < 0 or asked < 0:
            raise ValueError
    except (TypeError, ValueError, AttributeError):
        raise UnlearnError(f"{where}: request {e['request_id']!r}: 'records_deleted' or 'requested' is not a "
                           f"count") from None
    return max(1, done or asked)


def _recorded(rows: list[dict], shape: tuple[int, int], where: str) -> Recorded:
    hit_request, shard, stage = [], [], []
    for i, e in enumerate(rows):
        redone = e.get("stages_redone") or {}
        for k in e.get("shards") or []:
            stages = redone.get(str(k)) or [] if isinstance(redone, dict) else []
            if (not isinstance(k, int) or isinstance(k, bool) or not stages
                    or not all(isinstance(j, int) and not isinstance(j, bool) for j in stages)):
                raise UnlearnError(f"{where}: request {e['request_id']!r}: shard {k!r} without stages redone")
            if not (0 <= k < shape[0] and 0 <= min(stages) < shape[1]):
                raise UnlearnError(f"{where}: request {e['request_id']!r} retrained shard {k} from stage "
                                   f"{min(stages)}, outside {shape[0]} shards x {shape[1]} slices")
            hit_request.append(i)
            shard.append(k)
            stage.append(min(stages))
    return Recorded(shape[0], shape[1], np.array(hit_request, dtype=np.int64), np.array(shard, dtype=np.int64),
                    np.array(stage, dtype=np.int64))
