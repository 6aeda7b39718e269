"""One writer per run: a lock object whose holder can be proven gone.

Two commands mutating one run at once would each garbage-collect the other's objects,
so every mutation (train, delete, drop) holds `RUN/LOCK`, created with an atomic
create-if-absent. The lock names its holder: host, boot id, process id and the
process's start time. A process that dies (`kill -9`, a lost node) cannot release it,
and a lock that needs a human to remove it loses deletions in the meantime, so a lock
whose holder is provably gone is taken over automatically, and the takeover is logged:

- a holder on this machine (same host name, boot and pid namespace) is gone when its
  process is dead (or is a zombie, or the pid now belongs to a process started later),
  or when the machine rebooted since;
- any other holder (another machine, another container's pid namespace, an unreadable
  lock) is gone when its heartbeat object (`RUN/locks/beat-<token>`, rewritten every
  lease/3 seconds while the lock is held) has not changed for a whole lease, the
  holder's own, as observed on this machine's own clock (no clock comparison across
  hosts). A process that waits keeps watching across attempts (`LockWatch`).

Two processes that find the same dead holder race through claim objects
(`RUN/locks/takeover-<token>-<n>`, create-if-absent): exactly one wins and replaces the
lock. A claimer that dies half-way is itself judged like a holder, and the next claim
number is used, so a dead claimer cannot wedge the run. A holder checks that the lock is
still its own right before it commits (`check`), so a holder that was presumed dead (a
partitioned node) cannot overwrite the work of the one that took over.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

from .errors import UnlearnError
from .procs import boot_id, pid_namespace, process_alive, process_start  # noqa: F401 (re-export)
from .keys import sha256_hex
from .records import quote
from .store import Store

DEFAULT_LEASE_S = 30.0


def lock_key(run: str) -> str:
    return f"{run}/LOCK"


def _beat_key(run: str, token: str) -> str:
    return f"{run}/locks/beat-{token}"


def _claim_key(run: str, token: str, n: int) -> str:
    return f"{run}/locks/takeover-{token}-{n}"


_TOKEN = re.compile(r"[0-9a-f]{32}")


class RunBusy(UnlearnError):
    """Another live process holds the run's lock."""


class LockLost(UnlearnError):
    """The lock was taken over while this process held it (it was presumed dead): the
    work in flight must not be committed. Transient: the new holder carries on."""


# -- the pure decision ---------------------------------------------------------------------
def holder_gone(held: dict, here: dict, alive: Callable[[int, str], bool], silent_for_s: float | None,
                lease_s: float) -> str | None:
    """Why the lock's holder is provably gone, or None if it may still be working.

    `held` is the lock object (may be empty: unreadable); `here` this process's `host`,
    `boot_id` and `pid_ns`; `silent_for_s` how long this process has watched the holder's
    heartbeat without seeing it change (None: not yet watched). A holder that states its
    own lease is judged by it, not by ours."""
    if (held.get("host") == here.get("host") and held.get("boot_id") and here.get("boot_id")
            and held["boot_id"] != here["boot_id"]):
        return "its machine has rebooted since"
    if same_pids(held, here):
        if not alive(held["pid"], str(held.get("pid_start") or "")):
            return f"process {held['pid']} on this machine is gone"
        return None
    if silent_for_s is not None and silent_for_s >= lease_of(held, lease_s):
        return f"no heartbeat for {silent_for_s:.0f} s"
    return None


def same_pids(held: dict, here: dict) -> bool:
    """The holder's pid can be checked here: same host and pid namespace."""
    return (held.get("host") == here.get("host") and isinstance(held.get("pid"), int)
            and held.get("pid_ns", here.get("pid_ns")) == here.get("pid_ns"))


def lease_of(held: dict, default: float) -> float:
    """The lease the holder stated (a sane positive number), else `default`."""
    theirs = held.get("lease_s")
    return float(theirs) if isinstance(theirs, (int, float)) and 0 < theirs < float("inf") else default


class LockWatch:
    """What a waiting process has seen of other holders' heartbeats, kept across its
    attempts: a holder elsewhere is judged by how long its heartbeat stayed the same."""

    def __init__(self):
        self._seen: dict[bytes, tuple[bytes | None, float]] = {}  # lock or claim bytes -> (beat, since)

    def silence(self, raw: bytes, beat: bytes | None) -> float | None:
        """Seconds `beat` has been seen unchanged for the object `raw` (None at first sight)."""
        now = time.monotonic()
        seen = self._seen.get(raw)
        if seen is None or seen[0] != beat:
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[raw] = (beat, now)
            return None if seen is None else 0.0
        return now - seen[1]


def describe(held: dict) -> str:
    if not held:
        return "an unreadable lock"
    who = held.get("holder") or f"{held.get('host')}:{held.get('pid')}"
    return f"{held.get('command', 'a command')} by {who} since {held.get('since', '?')}"


def _parse(raw: bytes) -> dict:
    try:
        held = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return held if isinstance(held, dict) else {}


class RunLock:
    """Hold a run's lock: `with RunLock(store, run, "delete"):`.

    `wait`: False fails at once with RunBusy when a live process holds it; True (or a
    number of seconds) waits, calling `on_wait(description)` once. A dead holder's lock
    is taken over in either case (`took_over` then describes it)."""

    def __init__(self, store: Store, run: str, command: str, wait: bool | float = False,
                 on_wait: Callable[[str], None] | None = None, lease_s: float | None = None,
                 poll_s: float = 0.25, watch: LockWatch | None = None):
        """`watch`: observations of other holders' heartbeats to continue from (a process
        that tries again and again, like a coordinator, passes the same one each time)."""
        self.store = store
        self.run = run
        self.wait = wait
        self.on_wait = on_wait
        self.lease_s = lease_s if lease_s is not None else float(os.environ.get("UNLEARN_LOCK_LEASE_S", DEFAULT_LEASE_S))
        self.poll_s = poll_s
        self.watch = watch if watch is not None else LockWatch()
        self.token = uuid.uuid4().hex
        pid = os.getpid()
        self.here = {"host": socket.gethostname(), "boot_id": boot_id(), "pid_ns": pid_namespace()}
        self.info = {"token": self.token, "holder": f"{self.here['host']}:{pid}", **self.here, "pid": pid,
                     "pid_start": process_start(pid), "command": command,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "lease_s": self.lease_s}
        self.took_over: dict | None = None
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- acquiring -----------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        deadline = None if self.wait is True or self.wait is False else time.monotonic() + float(self.wait)
        told, contested = False, 0
        mine = json.dumps(self.info).encode()
        while True:
            if self.store.put_if_absent(lock_key(self.run), mine):
                return self._start()
            try:
                raw = self.store.get(lock_key(self.run))
            except KeyError:
                continue  # released meanwhile: try again at once
            held = _parse(raw)
            why = self._gone(raw, held)
            if why:
                if self._take_over(raw, held, why, mine):
                    return self._start()
                contested += 1  # another process took it over, or is doing so: look at the lock again
                if contested < 3 or not (self.wait is False or (deadline is not None and time.monotonic() > deadline)):
                    continue
                raise RunBusy(f"run {quote(self.run)} is busy: another process is taking over the lock of "
                              f"{describe(held)} ({why}); try again in a moment")
            if self.wait is False or (deadline is not None and time.monotonic() > deadline):
                remote = "" if same_pids(held, self.here) else (
                    " (not a process of this machine: taken over once its heartbeat has been silent for "
                    f"{lease_of(held, self.lease_s):g} s; a waiting delete or resume does that)")
                raise RunBusy(f"run {quote(self.run)} is busy: {describe(held)}{remote}; try again when it finishes "
                              f"(if that process is gone for good: `unlearn unlock --run {self.run}`)")
            if not told and self.on_wait:
                self.on_wait(describe(held))
                told = True
            time.sleep(self.poll_s)

    def _gone(self, raw: bytes, held: dict) -> str | None:
        """Why the holder of the lock `raw` is provably gone (None: it may be working)."""
        beat = None
        token = held.get("token")
        if not same_pids(held, self.here) and isinstance(token, str) and _TOKEN.fullmatch(token):
            try:
                beat = self.store.get(_beat_key(self.run, token))
            except (KeyError, UnlearnError):
                beat = None
        return holder_gone(held, self.here, process_alive, self.watch.silence(raw, beat), self.lease_s)

    def _take_over(self, raw: bytes, held: dict, why: str, mine: bytes) -> bool:
        """Replace the dead holder's lock, racing other takers through numbered claims:
        the first to create claim n goes on; claim n+1 is tried only once claim n's own
        writer is provably gone (it died half-way), so a dead claimer cannot wedge the run."""
        token = held.get("token")
        if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
            token = sha256_hex(raw)[:32]  # an old or unreadable lock: claim it by its content
        prefix = f"{self.run}/locks/takeover-{token}-"
        numbers = sorted(int(k[len(prefix):]) for k in self.store.list(f"{self.run}/locks/")
                         if k.startswith(prefix) and k[len(prefix):].isdigit())
        if numbers:
            last = _claim_key(self.run, token, numbers[-1])
            try:
                claim_raw = self.store.get(last)
            except KeyError:
                return False
            claimer = _parse(claim_raw)
            if holder_gone(claimer, self.here, process_alive, self.watch.silence(claim_raw, None),
                           self.lease_s) is None:
                time.sleep(self.poll_s)  # another process is taking it over
                return False
        n = numbers[-1] + 1 if numbers else 0
        claim = json.dumps({**self.info, "why": why}).encode()
        if not self.store.put_if_absent(_claim_key(self.run, token, n), claim):
            time.sleep(self.poll_s)
            return False
        try:
            if self.store.get(lock_key(self.run)) != raw:
                return False  # replaced meanwhile
        except KeyError:
            return False
        self.store.delete(lock_key(self.run))
        if not self.store.put_if_absent(lock_key(self.run), mine):
            return False
        if isinstance(held.get("token"), str) and _TOKEN.fullmatch(held["token"]):
            self.store.delete(_beat_key(self.run, held["token"]))  # the dead holder's heartbeat
        self.took_over = {**held, "why": why}
        print(f"unlearn: took over the lock of run {self.run}: {describe(held)} ({why})", file=sys.stderr, flush=True)
        return True

    def _start(self) -> "RunLock":
        self.held = True
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"unlearn-lock-{self.run}", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        n = 0
        while True:
            try:
                self.store.put(_beat_key(self.run, self.token), json.dumps({"beat": n}).encode())
            except Exception:  # a store hiccup: the next beat tries again
                pass
            n += 1
            if self._stop.wait(max(0.5, self.lease_s / 3)):
                return

    # -- holding -------------------------------------------------------------------------
    def check(self) -> None:
        """Raise LockLost unless the lock is still this holder's (call right before a commit)."""
        try:
            held = _parse(self.store.get(lock_key(self.run)))
        except KeyError:
            held = {}
        if held.get("token") != self.token:
            raise LockLost(f"run {quote(self.run)}: the lock was taken over ({describe(held)}) while this "
                           f"process held it; nothing was committed")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        try:
            ours = _parse(self.store.get(lock_key(self.run))).get("token") == self.token
        except KeyError:
            ours = False
        if ours:
            self.store.delete(lock_key(self.run))
        # our heartbeat; and if the lock was still ours, the claims of locks taken over before
        # it (those locks are gone, so a late claimer finds the lock changed and gives up)
        for key in self.store.list_all(f"{self.run}/locks/"):
            if key == _beat_key(self.run, self.token) or (ours and key.rsplit("/", 1)[1].startswith("takeover-")):
                self.store.delete(key)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(store: Store, run: str) -> dict | None:
    """The lock object of `run` ({} if unreadable), or None if the run is not locked."""
    try:
        return _parse(store.get(lock_key(run)))
    except KeyError:
        return None


def force_unlock(store: Store, run: str, force: bool = False) -> bool:
    """Remove a run's lock by hand (a holder on another machine that will never come back,
    without waiting for its lease). Refuses a live holder on this machine unless `force`."""
    held = read_lock(store, run)
    if held is None:
        return False
    here = {"host": socket.gethostname(), "boot_id": boot_id(), "pid_ns": pid_namespace()}
    same = (held.get("host") == here["host"] and isinstance(held.get("pid"), int)
            and held.get("pid_ns", here["pid_ns"]) == here["pid_ns"])
    if not force and same and holder_gone(held, here, process_alive, None, float("inf")) is None:
        raise UnlearnError(f"run {quote(run)} is locked by a live process: {describe(held)}; it releases the "
                           f"lock when it finishes (--force removes it anyway)")
    store.delete(lock_key(run))
    return True
