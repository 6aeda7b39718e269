"""Facts about processes, for deciding whether the writer of something in the store still
runs: the run lock's holder, or the writer of a temporary file. A process is named by its
machine (host, boot, pid namespace), its pid and its start time, so a reused pid is not
mistaken for the original."""
from __future__ import annotations

import functools
import hashlib
import os
import socket


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"): pids are only comparable within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
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


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """A short, stable name for this machine and pid namespace: pids are only comparable
    within one, and a reboot makes every earlier pid dead."""
    raw = "\x1f".join((socket.gethostname(), boot_id(), pid_namespace()))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]
