"""One writer per run: a lock object created with an atomic test-and-set.

Two commands mutating one run at once would each garbage-collect the other's
objects. The lock object (`RUN/LOCK`, JSON) names its holder so that a user can
tell a live command from a dead one; a dead holder's lock is removed with
`unlearn unlock`.
"""
from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone

from .errors import UnlearnError
from .records import quote
from .store import Store


def lock_key(run: str) -> str:
    return f"{run}/LOCK"


class RunLock:
    """`holder` defaults to host:pid. A holder that outlives its processes (the coordinator
    of a run, restarted by Ray) passes a stable name and takes over its own stale lock."""

    def __init__(self, store: Store, run: str, command: str, holder: str | None = None):
        self.store = store
        self.run = run
        self.named = holder is not None
        self.info = {"holder": holder or f"{socket.gethostname()}:{os.getpid()}", "command": command,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def __enter__(self) -> "RunLock":
        if not self.store.put_if_absent(lock_key(self.run), json.dumps(self.info).encode()):
            try:
                held = json.loads(self.store.get(lock_key(self.run)))
                who = f"{held.get('command')} by {held.get('holder')} since {held.get('since')}"
            except (KeyError, ValueError):
                held, who = {}, "another command"
            if self.named and held.get("holder") == self.info["holder"]:
                return self  # our own lock, left by an earlier incarnation that died
            raise UnlearnError(f"run {quote(self.run)} is busy: {who}; if that process is gone, "
                               f"run `unlearn unlock --run {self.run}`")
        return self

    def __exit__(self, *exc) -> None:
        self.store.delete(lock_key(self.run))


def force_unlock(store: Store, run: str) -> bool:
    if not store.exists(lock_key(run)):
        return False
    store.delete(lock_key(run))
    return True
