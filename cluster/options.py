"""What the command line's options may be, checked before anything is read or written.

Pure functions, each usable as an argparse `type=` (a bad value is a usage error: one line,
exit 2) or called once the other options are known (`--max-length` against the model,
`--actor-cpus` against the Ray cluster). Numbers must be finite and inside a range that
can work: NaN, infinities, negative counts and absurd sizes never reach a run.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import socket
import threading
from fractions import Fraction
from typing import Callable

from core.errors import UnlearnError
from core.records import quote

MAX_SHARDS = 10_000
MAX_EMBED_WORKERS = 256  # = erase.embed.MAX_WORKERS (a test checks; importing it would load numpy at start-up)
MAX_SLICES = 1_000
MAX_EPOCHS = 1_000
MAX_SEED = 2**63 - 1
MAX_LR = 1.0
MAX_BATCH = 4_096
MIN_LENGTH, MAX_LENGTH = 8, 131_072  # tokens; the model's positions bound it further
MAX_LORA_R = 1_024
MAX_LORA_ALPHA = 65_536
MAX_SHOTS = 1_024
MAX_PARTITIONS = 1_024
MAX_ITERS = 1_000
MAX_EPS = 1.0  # embeddings are unit vectors: a coarser grid snaps every centroid to one point
MAX_WINDOW_S = 3_600.0
MAX_ACTOR_CPUS = 1_024.0
MAX_ACTOR_GPUS = 64.0
HOST_RESOLVE_S = 5.0

# Positions the presets can embed (SISA truncates each text to --max-length tokens); a
# folder's own config says; a hub id is checked only against MAX_LENGTH.
PRESET_POSITIONS = {"tiny": 512, "minilm": 512, "smollm2-135m": 8192, "tiny-lm": 2048}


class OptionError(UnlearnError):
    """An option's value that cannot work, found once the other options (the model) or the
    Ray cluster are known: a usage error like a malformed value (exit 2)."""

    def __init__(self, option: str, why: str):
        super().__init__(f"argument {option}: {why}")
        self.option, self.why = option, why


# What a number may look like: ASCII digits only (no `1_0`, no surrounding blanks, no
# Arabic-Indic or other Unicode digits, which int() and float() would take).
_INT = re.compile(r"[+-]?[0-9]+")
_DECIMAL = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_FLOAT = re.compile(rf"{_DECIMAL}|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)  # nan, inf: refused by range
_EPOCHS = re.compile(rf"{_DECIMAL}|[0-9]+/[0-9]+")


def _shown(text: str) -> str:
    return text if 0 < len(text) <= 40 and text.isprintable() and text == text.strip() else quote(text)


def bounded(convert: type, low: float, high: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: `convert` (int or float) the text and require a finite value in
    [low, high], or (low, high] with `above`."""
    kind = "an integer" if convert is int else "a number"
    where = f"{int(low)}..{int(high)}" if convert is int else f"{'(' if above else '['}{low:g}, {high:g}]"

    syntax = _INT if convert is int else _FLOAT

    def parse(text: str):
        try:
            if not syntax.fullmatch(text):
                raise ValueError(text)
            value = convert(text)
        except ValueError:  # argparse says "invalid int value: 'q'"; a long text is cut
            if len(text) <= 40:
                raise
            raise argparse.ArgumentTypeError(f"must be {kind} in {where}, got {_shown(text)}") from None
        finite = isinstance(value, int) or math.isfinite(value)
        if not finite or not ((low < value) if above else (low <= value)) or value > high:
            raise argparse.ArgumentTypeError(f"must be {kind} in {where}, got {_shown(text)}")
        return value

    parse.__name__ = convert.__name__
    return parse


def epochs(text: str) -> str:
    """Total epochs, kept as the text the run hashes (a decimal or a fraction such as 1/3):
    a number in (0, MAX_EPOCHS]. A decimal is read as a float first: Fraction("1e-999999999")
    would compute a power of ten with a billion digits."""
    try:
        ok = bool(_EPOCHS.fullmatch(text)) and ("/" in text or 0 < float(text) <= MAX_EPOCHS) \
            and 0 < Fraction(text) <= MAX_EPOCHS
    except (ValueError, ZeroDivisionError, OverflowError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"must be a number in (0, {MAX_EPOCHS}], got {_shown(text)}")
    return text


def given(text: str) -> str:
    """A value that may not be empty (`--store ''` must not mean the default store)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def labels(text: str) -> str:
    """A comma-separated label set with at least one label (`--labels ''` must not mean
    the labels in the data)."""
    if not split_values(text):
        raise argparse.ArgumentTypeError(f"needs at least one label (comma-separated), got {quote(text)}")
    return text


def run_name(text: str) -> str:
    from core.stored_run import run_name_problem

    problem = run_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{quote(text)} {problem}")
    return text


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def host_problem(text: str, resolve=socket.getaddrinfo, timeout_s: float = HOST_RESOLVE_S) -> str | None:
    """Why `text` cannot be bound: not an IP address, not a host name (RFC 1123), or a
    name that does not resolve within `timeout_s` (in a daemon thread: a stuck resolver
    cannot hold the command)."""
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(part) for part in name.split(".")):
        return f"{quote(text)} is neither an IP address nor a host name"
    result: list = []

    def lookup():
        try:
            resolve(name, None)
            result.append(None)
        except (OSError, UnicodeError) as exc:
            result.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        return f"host name {quote(text)} did not resolve within {timeout_s:g} s"
    if result[0] is not None:
        return f"host name {quote(text)} does not resolve ({getattr(result[0], 'strerror', None) or result[0]})"
    return None


def host(text: str) -> str:
    problem = host_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def model_positions(spec: str) -> int | None:
    """How many token positions model `spec` embeds: a preset's, or a folder's
    config.json (`max_position_embeddings`) and tokenizer_config.json (`model_max_length`,
    lower for models such as RoBERTa that reserve positions); None if unknown (a hub id)."""
    if spec in PRESET_POSITIONS:
        return PRESET_POSITIONS[spec]
    if not os.path.isdir(spec):
        return None
    limits = []
    for name, field in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        try:
            with open(os.path.join(spec, name), encoding="utf-8") as f:
                value = json.load(f).get(field)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**6:
            limits.append(value)
    return min(limits) if limits else None


def check_max_length(model: str, max_length: int, positions: int | None = None) -> None:
    """`--max-length` must fit the model's position embeddings (a longer text would index
    past them and fail in the middle of training)."""
    positions = model_positions(model) if positions is None else positions
    if positions is not None and max_length > positions:
        raise OptionError("--max-length", f"must be an integer in {MIN_LENGTH}..{positions} for model {quote(model)} "
                                          f"(the positions it embeds), got {max_length}")


def check_actor_cpus(requested: float, node_cpus: list[float]) -> None:
    """An actor needs its CPUs on one node: more than the largest node has can never be
    placed (Ray would leave it pending forever)."""
    largest = max(node_cpus, default=0.0)
    if requested > largest:
        raise OptionError("--actor-cpus", f"{requested:g} CPUs per actor, but the largest node of the Ray cluster "
                                          f"has {largest:g}")


def ray_node_cpus(address: str | None) -> list[float]:
    """The CPUs of each live node of the Ray cluster (started or joined here)."""
    import ray

    from cluster.runtime import init_ray

    init_ray(address)
    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def check_values(values: list[str], option: str, problem: Callable[[str], str | None]) -> list[str]:
    """Ids, owners or labels given on the command line or in a file: each must pass
    `problem` (ids: safe storage keys; owners: what the data accepts; all: valid Unicode)."""
    for value in values:
        why = problem(value)
        if why:
            raise UnlearnError(f"{option}: {quote(value)} {why}")
    return values


def check_layout(args, records) -> str | None:
    """Before training: more shards (SISA) or partitions (ERASE) than records cannot all
    hold one, and is refused. A warning (returned) when some SISA shards get no record
    anyway: a record's shard is a keyed hash of its owner, so a few owners may share one."""
    erase = args.method == "erase"
    units, option = (args.partitions, "--partitions") if erase else (args.shards, "--shards")
    what = "partitions" if erase else "shards"
    if units > len(records):
        raise UnlearnError(f"{option} {units}: more {what} than the {len(records)} records (at most {len(records)})")
    if erase:
        return None
    from sisa.plan import place

    held = {place(r.owner, args.seed, args.shards, 1).shard for r in records}
    empty = args.shards - len(held)
    if empty:
        return (f"{empty} of {args.shards} shards hold no records (a record's shard is a keyed hash of its owner; "
                f"{len({r.owner for r in records})} owners); they are left out of predictions")
    return None


def check_options(args) -> None:
    """The checks that need more than one option's value, or the Ray cluster; before the
    store is touched. Raises OptionError (exit 2)."""
    if args.command == "train" and args.method == "erase" and args.objective not in (None, "classify"):
        raise OptionError("--objective", "is a SISA option (ERASE prompts a frozen LM; it never trains one)")
    if args.command == "train":
        approx = args.method == "approx"
        if args.source is not None and not approx:
            raise OptionError("--from", "is for --method approx (start an approximate run from a trained model)")
        if args.source is not None and args.data is not None:
            raise OptionError("--data", "not with --from (the records are the source run's)")
        if args.source is None and args.data is None:
            raise OptionError("--data", "is required (a file or dataset:NAME)")
        if args.source is not None:
            explicit = [f"--{n}" for n in ("shards", "slices", "objective", "model", "labels")
                        if getattr(args, n) is not None]
            if explicit:
                raise OptionError(explicit[0], "not with --from (the source run's settings are kept)")
        for name in ("shards", "slices"):
            if approx and getattr(args, name) not in (None, 1):
                raise OptionError(f"--{name}", "must be 1 with --method approx (one model, unlearned in place)")
            if getattr(args, name) is None:
                setattr(args, name, 1 if approx else 4)
        if approx and args.objective == "classify":
            raise OptionError("--objective", "must be lm with --method approx (a LoRA adapter on a causal LM)")
        if args.objective is None:
            args.objective = "lm" if approx else "classify"
    if args.command == "train" and args.method in ("sisa", "approx"):
        if args.model is None:
            args.model = "smollm2-135m" if args.objective == "lm" else "minilm"
        check_max_length(args.model, args.max_length)
    if args.command == "train" and args.labels:
        from core.records import unencodable

        check_values(args.labels.split(","), "--labels", unencodable)
    if args.command == "delete":
        args.targets = delete_targets(args)
    if getattr(args, "runtime", None) == "ray" and getattr(args, "actor_cpus", None) is not None:
        check_actor_cpus(args.actor_cpus, ray_node_cpus(args.address))


def split_values(value: str | None) -> list[str]:
    """`a, b,,c` -> ["a", "b", "c"]: comma-separated values, blanks dropped."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def delete_targets(args) -> tuple[list[str], list[str]]:
    """`delete`'s ids and owners, from the command line or a file (`--ids-file`,
    `--owners-file`), checked before the store is touched: at least one, at most as many
    as one deletion request over HTTP carries, each valid (`check_targets`)."""
    from cluster import http_api
    from core.records import shown_path
    from core.sources import read_lines

    found, source = {}, ""
    for name in ("ids", "owners"):
        inline, path = getattr(args, name, None), getattr(args, f"{name}_file", None)
        found[name] = []
        if inline:
            found[name], source = split_values(inline), f"--{name}"
            if not found[name]:
                raise UnlearnError(f"--{name}: no values given")
        elif path:
            found[name], source = read_lines(path), f"--{name}-file {shown_path(path)}"
            if not found[name]:
                raise UnlearnError(f"{shown_path(path)}: no values (one id or owner per line)")
    ids, owners = found["ids"], found["owners"]
    count, cap = len(ids) + len(owners), http_api.MAX_NAMES
    if count > cap:
        them = "the file" if "-file" in source else "them"
        raise UnlearnError(f"{source}: {count} {'ids' if ids else 'owners'}, more than the {cap} a deletion request "
                           f"may carry; split {them} into requests of at most {cap}")
    check_targets(args, ids, owners)
    return ids, owners


def check_targets(args, ids: list[str], owners: list[str]) -> None:
    """`delete`'s ids (safe storage keys, as in the data) and owners (as the data accepts
    them), before anything is accepted: a lone surrogate or an unsafe id is one line."""
    from core.records import id_problem, owner_problem

    check_values(ids, "--ids" if args.ids else "--ids-file", id_problem)
    check_values(owners, "--owners" if args.owners else "--owners-file", owner_problem)
