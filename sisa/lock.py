"""One writer per run: a lock object whose holder can be proven gone.

Two commands mutating one run at once would each garbage-collect the other's objects,
so every mutation (train, delete, drop) holds `RUN/LOCK`, created with an atomic
create-if-absent. The lock names its holder: host, boot id, process id and the
process's start time. A process that dies (`kill -9`, a lost node) cannot release it,
and a lock that needs a human to remove it loses deletions in the meantime, so a lock
whose holder is provably gone is taken over automatically, and the takeover is logged:

- a holder on this machine is gone when its process is dead (or is a zombie, or the
  pid now belongs to a process started later, or the machine rebooted since);
- a holder elsewhere is gone when its heartbeat object (`RUN/locks/beat-<token>`,
  rewritten every lease/3 seconds while the lock is held) has not changed for a whole
  lease, as observed on this machine's own clock (no clock comparison across hosts).

Two processes that find the same dead holder race through a claim object
(`RUN/locks/takeover-<token>`, create-if-absent): exactly one wins and replaces the
lock. A holder checks that the lock is still its own right before it commits
(`check`), so a holder that was presumed dead (a partitioned node) cannot overwrite
the work of the one that took over.
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
from .keys import sha256_hex
from .records import quote
from .store import Store

DEFAULT_LEASE_S = 30.0


def lock_key(run: str) -> str:
    return f"{run}/LOCK"


def _beat_key(run: str, token: str) -> str:
    return f"{run}/locks/beat-{token}"


def _claim_key(run: str, token: str) -> str:
    return f"{run}/locks/takeover-{token}"


class RunBusy(UnlearnError):
    """Another live process holds the run's lock."""


class LockLost(UnlearnError):
    """The lock was taken over while this process held it (it was presumed dead): the
    work in flight must not be committed. Transient: the new holder carries on."""


# -- facts about processes (the impure part of the liveness decision) -------------------
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), "" if unknown: with the
    pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_alive(pid: int, start: str = "") -> bool:
    """True while `pid` runs (not a zombie) and, if `start` is given, is that process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return not start or process_start(pid) in ("", start)


# -- the pure decision ---------------------------------------------------------------------
def holder_gone(held: dict, host: str, boot: str, alive: Callable[[int, str], bool],
                silent_for_s: float | None, lease_s: float) -> str | None:
    """Why the lock's holder is provably gone, or None if it may still be working.

    `held` is the lock object (may be empty: unreadable); `silent_for_s` how long this
    process has watched the holder's heartbeat without seeing it change (None: not yet
    watched)."""
    if held.get("host") == host and isinstance(held.get("pid"), int):
        if held.get("boot_id") and boot and held["boot_id"] != boot:
            return "its machine has rebooted since"
        if not alive(held["pid"], str(held.get("pid_start") or "")):
            return f"process {held['pid']} on this machine is gone"
        return None
    if silent_for_s is not None and silent_for_s >= lease_s:
        return f"no heartbeat for {silent_for_s:.0f} s"
    return None


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
                 poll_s: float = 0.25):
        self.store = store
        self.run = run
        self.wait = wait
        self.on_wait = on_wait
        self.lease_s = lease_s if lease_s is not None else float(os.environ.get("UNLEARN_LOCK_LEASE_S", DEFAULT_LEASE_S))
        self.poll_s = poll_s
        self.host, self.boot = socket.gethostname(), boot_id()
        self.token = uuid.uuid4().hex
        pid = os.getpid()
        self.info = {"token": self.token, "holder": f"{self.host}:{pid}", "host": self.host, "boot_id": self.boot,
                     "pid": pid, "pid_start": process_start(pid), "command": command,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "lease_s": self.lease_s}
        self.took_over: dict | None = None
        self.held = False
        self._watch: dict[bytes, tuple[bytes | None, float]] = {}  # lock bytes -> (beat seen, since)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- acquiring -----------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        deadline = None if self.wait is True or self.wait is False else time.monotonic() + float(self.wait)
        told = False
        mine = json.dumps(self.info).encode()
        while True:
            if self.store.put_if_absent(lock_key(self.run), mine):
                return self._start()
            try:
                raw = self.store.get(lock_key(self.run))
            except KeyError:
                continue  # released meanwhile: try again at once
            held = _parse(raw)
            why = holder_gone(held, self.host, self.boot, process_alive, self._silence(raw, held), self.lease_s)
            if why:
                if self._take_over(raw, held, why, mine):
                    return self._start()
                continue
            if self.wait is False or (deadline is not None and time.monotonic() > deadline):
                raise RunBusy(f"run {quote(self.run)} is busy: {describe(held)}; try again when it finishes "
                              f"(if that process is gone for good: `unlearn unlock --run {self.run}`)")
            if not told and self.on_wait:
                self.on_wait(describe(held))
                told = True
            time.sleep(self.poll_s)

    def _silence(self, raw: bytes, held: dict) -> float | None:
        """How long the heartbeat of the lock `raw` has been seen unchanged (None at first sight)."""
        token = held.get("token")
        beat = None
        if isinstance(token, str):
            try:
                beat = self.store.get(_beat_key(self.run, token))
            except (KeyError, ValueError, UnlearnError):
                beat = None
        seen = self._watch.get(raw)
        now = time.monotonic()
        if seen is None or seen[0] != beat:
            self._watch[raw] = (beat, now)
            return None if seen is None else 0.0
        return now - seen[1]

    def _take_over(self, raw: bytes, held: dict, why: str, mine: bytes) -> bool:
        token = held.get("token")
        if not (isinstance(token, str) and re.fullmatch(r"[0-9a-f]{32}", token)):
            token = sha256_hex(raw)[:32]  # an old or unreadable lock: claim it by its content
        claim = json.dumps({"by": self.info["holder"], "why": why}).encode()
        if not self.store.put_if_absent(_claim_key(self.run, token), claim):
            time.sleep(self.poll_s)  # another process is taking it over
            return False
        try:
            if self.store.get(lock_key(self.run)) != raw:
                return False  # replaced meanwhile
        except KeyError:
            return False
        self.store.delete(lock_key(self.run))
        if not self.store.put_if_absent(lock_key(self.run), mine):
            return False
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
            if _parse(self.store.get(lock_key(self.run))).get("token") == self.token:
                self.store.delete(lock_key(self.run))
        except KeyError:
            pass
        # our heartbeat, and the claims of locks taken over before ours (those locks are gone)
        for key in self.store.list_all(f"{self.run}/locks/"):
            if key == _beat_key(self.run, self.token) or key.rsplit("/", 1)[1].startswith("takeover-"):
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
    if not force and held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) \
            and holder_gone(held, socket.gethostname(), boot_id(), process_alive, None, float("inf")) is None:
        raise UnlearnError(f"run {quote(run)} is locked by a live process: {describe(held)}; it releases the "
                           f"lock when it finishes (--force removes it anyway)")
    store.delete(lock_key(run))
    return True
