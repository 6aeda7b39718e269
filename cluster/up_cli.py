"""The `up` and `down` commands, and how every other command attaches to what `up` started."""
from __future__ import annotations

import json
import os
import sys

from cluster import options as opt
from cluster import up
from core.errors import UnlearnError

UP_DESCRIPTION = """Start a long-running local Ray (a head on 127.0.0.1, token authentication on, the token in
a mode-600 file of $UNLEARN_HOME) that every later command with --runtime ray and no --address
uses, instead of starting a Ray of its own: a deletion then costs its work, not a Ray start and a
model load. The runs' coordinators and shard actors stay warm on it between commands. With
--store and --run, the runs' coordinators and shard models are started now, so that the first
delete is warm too. `unlearn down` stops it. State: $UNLEARN_HOME/cluster.json (default
~/.unlearn). The started Ray processes keep the environment of this command (AWS_* for an S3
store, PYTHONPATH)."""

DOWN_DESCRIPTION = """Stop the Ray cluster `unlearn up` started: exactly its processes (found by the session and
temp dir it recorded, never `ray stop`, which stops every Ray of the machine), its warm
coordinators and shard actors with them, and remove its state and token files. Nothing up: one
line, exit 0."""


def add_parsers(sub) -> None:
    p = sub.add_parser("up", help="start a long-running local Ray that later commands use (no Ray start per command)",
                       description=UP_DESCRIPTION)
    p.add_argument("--num-cpus", type=opt.bounded(int, 1, opt.MAX_ACTOR_CPUS), default=None,
                   help="CPUs the cluster offers (default: this machine's)")
    p.add_argument("--port", type=opt.bounded(int, 1024, 65535), default=None,
                   help="port of the head (its GCS) on 127.0.0.1, 1024..65535 (default: a free one)")
    p.add_argument("--run", action="append", type=opt.run_name, default=None,
                   help="start this run's coordinator and shard models now (repeatable; needs the runs to exist)")
    p.add_argument("--store", type=opt.given, default=None,
                   help="store of the --run runs (default $UNLEARN_STORE or ./unlearn-store)")
    p.add_argument("--actor-cpus", type=opt.bounded(float, 0, opt.MAX_ACTOR_CPUS, above=True), default=None,
                   help="CPUs reserved per shard actor of the --run runs (default: the cluster's CPUs / S, at most 1)")
    p.add_argument("--window", type=opt.bounded(float, 0, opt.MAX_WINDOW_S), default=0.0,
                   help="batching window in seconds of the --run runs' coordinators (default 0, at most 3600)")
    p.add_argument("--json", action="store_true", help="print the cluster's address and files as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no messages but errors")

    p = sub.add_parser("down", help="stop the Ray cluster `unlearn up` started (only its processes)",
                       description=DOWN_DESCRIPTION)
    p.add_argument("--json", action="store_true", help="print what was stopped as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no messages but errors")


def _say(args, line: str) -> None:
    if not args.quiet:
        print(f"unlearn: {line}", file=sys.stderr, flush=True)


def _summary(state: up.ClusterState, where) -> dict:
    """What the JSON shows: where to attach and which files hold what; never the token."""
    return {"address": state.address, "num_cpus": state.num_cpus, "temp_dir": state.temp_dir,
            "state_file": str(where / up.STATE), "token_file": state.token_file}


def run(args) -> int:
    """`up` or `down`, one at a time per $UNLEARN_HOME."""
    command = {"up": up_command, "down": down_command}[args.command]
    if args.command == "up" and args.store is not None and not args.run:
        raise opt.OptionError("--store", "is for --run (the runs to start warm)")
    with up.home_lock(up.home()):
        return command(args)


def up_command(args) -> int:
    from core.store import open_store

    where = up.home()
    store = None
    if args.run:  # fail before anything starts: a run that is not there
        from core.stored_run import run_method

        store = open_store(args.store)
        for run in args.run:
            run_method(store, run)
    state, note = up.running(where)
    if note:
        _say(args, f"note: {note}")
    if state is not None:
        _say(args, f"a Ray cluster started by `unlearn up` already runs at {state.address}; "
                   f"`unlearn down` stops it")
    else:
        if note:  # a stale state: what it recorded may still hold processes or a temp dir
            stale, _ = up.read_state(where)
            if stale is not None:
                up.stop(stale)
            up.clear_state(where)
        state = up.start(where, args.num_cpus or os.cpu_count() or 1, args.port)
        _say(args, f"started a Ray cluster at {state.address} ({state.num_cpus} CPUs): commands with "
                   f"--runtime ray and no --address use it; `unlearn down` stops it")
    out = {**_summary(state, where), "runs": []}
    if args.run:
        out["runs"] = _warm(args, store, state)
    if args.json:
        print(json.dumps(out))
    return 0


def _warm(args, store, state: up.ClusterState) -> list[dict]:
    up.use_token(state)
    warm = []
    for run in args.run:
        pid = up.warm_run(store, run, args.window, args.actor_cpus, state.address)
        _say(args, f"run {run}: coordinator and shard models warm (coordinator pid {pid})")
        warm.append({"run": run, "store": store.uri, "coordinator_pid": pid})
    return warm


def down_command(args) -> int:
    where = up.home()
    state, problem = up.read_state(where)
    if state is None:
        if problem:  # nothing can be stopped from it: say so, and remove it
            up.clear_state(where)
            _say(args, f"note: {problem}; removed it (stop its processes yourself if any are left)")
        else:
            _say(args, "no Ray cluster started by `unlearn up` (nothing to stop)")
        if args.json:
            print(json.dumps({"stopped": False, "processes": 0}))
        return 0
    n = up.stop(state)
    left = up.processes(state)
    if left:
        raise UnlearnError(f"{len(left)} processes of the Ray cluster at {state.address} did not stop "
                           f"(pids {', '.join(str(p.pid) for p in left[:5])}); run `unlearn down` again")
    up.clear_state(where)
    _say(args, f"stopped the Ray cluster at {state.address} ({n} processes)")
    if args.json:
        print(json.dumps({"stopped": True, "address": state.address, "processes": n}))
    return 0


# -- every other command ------------------------------------------------------------------------

def attach(args) -> bool:
    """For a command that would start a Ray of its own (--runtime ray, no --address, no
    RAY_ADDRESS): use the cluster `up` started, if its state file names one that answers
    (one line on stderr unless --quiet). A stale or unusable state file is a one-line
    note, never an error: the command then runs exactly as without it. True if attached."""
    if getattr(args, "runtime", "ray") != "ray" or getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"):
        return False
    state, note = up.running()
    if state is None:
        if note:
            print(f"unlearn: note: {note}", file=sys.stderr, flush=True)
        return False
    up.use_token(state)
    args.address = state.address
    if not getattr(args, "quiet", False):
        print(f"unlearn: using the Ray cluster of `unlearn up` at {state.address}", file=sys.stderr, flush=True)
    return True
