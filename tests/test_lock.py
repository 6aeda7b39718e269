"""The run lock: a holder that is provably gone is taken over (once, by one process), a
live one never is, and a holder that lost its lock cannot commit."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import synthetic_records
from sisa.config import SisaConfig
from core.errors import UnlearnError
from core.lock import (LockLost, LockWatch, RunBusy, RunLock, force_unlock, holder_gone, process_alive,
                       process_start)
from sisa.run import SisaRun
from core.store import LocalStore

HERE = {"host": "h1", "boot_id": "b1", "pid_ns": "pid:[1]"}
HOLDER = {**HERE, "pid": 10, "pid_start": "99"}


def test_holder_gone_rules():
    alive = lambda pid, start: True  # noqa: E731
    dead = lambda pid, start: False  # noqa: E731
    assert holder_gone(HOLDER, HERE, alive, None, 30) is None
    assert "is gone" in holder_gone(HOLDER, HERE, dead, None, 30)
    assert "rebooted" in holder_gone(HOLDER, {**HERE, "boot_id": "b2"}, alive, None, 30)
    for elsewhere in ({**HOLDER, "host": "h2"}, {**HOLDER, "pid_ns": "pid:[2]"}):  # pids not comparable
        assert holder_gone(elsewhere, HERE, dead, None, 30) is None  # only a silent heartbeat tells
        assert holder_gone(elsewhere, HERE, dead, 29.9, 30) is None
        assert "no heartbeat for 30 s" in holder_gone(elsewhere, HERE, alive, 30.0, 30)
    assert holder_gone({**HOLDER, "host": "h2", "lease_s": 300}, HERE, alive, 60.0, 30) is None  # its own lease
    assert holder_gone({}, HERE, alive, 31.0, 30)  # unreadable: by its silence too


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_process_facts():
    assert process_alive(os.getpid(), process_start(os.getpid()))
    assert not process_alive(os.getpid(), "1")  # same pid, another start time: pid reused
    assert not process_alive(dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)  # exited, not reaped: kill(pid, 0) still succeeds
    assert not process_alive(zombie.pid)
    zombie.wait()


def dead_lock(store) -> dict:
    """Leave a lock of run "r" whose holder (a process of this machine) is dead."""
    with RunLock(store, "r", "delete") as first:
        pass
    stale = {**first.info, "pid": dead_pid(), "pid_start": ""}
    store.put("r/LOCK", json.dumps(stale).encode())
    return stale


def lock_of(store, run="r"):
    return json.loads(store.get(f"{run}/LOCK"))


def test_a_dead_holder_on_this_machine_is_taken_over_and_logged(tmp_path, capsys):
    store = LocalStore(str(tmp_path))
    stale = dead_lock(store)
    with RunLock(store, "r", "delete") as lock:
        assert lock.took_over["pid"] == stale["pid"] and "is gone" in lock.took_over["why"]
        assert lock_of(store)["token"] == lock.token
    assert f"took over the lock of run r: delete by {stale['holder']}" in capsys.readouterr().err
    assert not store.exists("r/LOCK") and store.list_all("r/locks/") == []


def test_a_live_holder_is_never_taken_over(tmp_path):
    store = LocalStore(str(tmp_path))
    with RunLock(store, "r", "delete"):
        with pytest.raises(RunBusy, match=r'run "r" is busy: delete by .*:\d+ since'):
            RunLock(store, "r", "delete").acquire()
        with pytest.raises(RunBusy):
            RunLock(store, "r", "delete", wait=0.5).acquire()  # waited, still alive


def test_a_remote_holder_is_taken_over_only_after_a_silent_lease(tmp_path):
    store = LocalStore(str(tmp_path))
    remote = {"token": "a" * 32, "holder": "elsewhere:1", "host": "elsewhere", "pid": 1, "command": "delete",
              "since": "then"}
    store.put("r/LOCK", json.dumps(remote).encode())
    beating = threading.Event()

    def heartbeat():  # the remote holder is alive: its heartbeat changes
        n = 0
        while not beating.is_set():
            store.put(f"r/locks/beat-{'a' * 32}", str(n).encode())
            n += 1
            time.sleep(0.1)

    thread = threading.Thread(target=heartbeat)
    thread.start()
    try:
        with pytest.raises(RunBusy):
            RunLock(store, "r", "delete", wait=1.5, lease_s=0.6, poll_s=0.05).acquire()
    finally:
        beating.set()
        thread.join()
    t0 = time.monotonic()
    lock = RunLock(store, "r", "delete", wait=10, lease_s=0.6, poll_s=0.05).acquire()
    assert lock.took_over["host"] == "elsewhere" and "no heartbeat" in lock.took_over["why"]
    assert 0.6 <= time.monotonic() - t0 < 5
    lock.release()


def test_one_of_many_racers_takes_a_dead_lock_over(tmp_path):
    store = LocalStore(str(tmp_path))
    dead_lock(store)
    won, busy, start = [], [], threading.Barrier(8)

    def race():
        lock = RunLock(store, "r", "delete", poll_s=0.01)
        start.wait()
        try:
            won.append(lock.acquire())
        except RunBusy:
            busy.append(lock)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(busy) == 7
    assert lock_of(store)["token"] == won[0].token
    won[0].release()


def test_a_holder_that_lost_its_lock_cannot_commit(tmp_path):
    store = LocalStore(str(tmp_path))
    run = SisaRun.train(store, "r", synthetic_records(12), SisaConfig(shards=1, slices=1, model="tiny",
                                                                        batch_size=4, max_length=32))
    head = store.get("r/HEAD")
    lock = RunLock(store, "r", "delete").acquire()
    store.put("r/LOCK", json.dumps({**lock.info, "token": "b" * 32, "holder": "x:2"}).encode())  # taken over
    with pytest.raises(LockLost, match="taken over"):
        run.delete(ids=["r0001"], lock=lock)
    assert store.get("r/HEAD") == head
    lock.release()
    assert lock_of(store)["token"] == "b" * 32  # the new holder's lock is left alone


def test_unlock_refuses_a_live_holder_on_this_machine(tmp_path):
    store = LocalStore(str(tmp_path))
    with RunLock(store, "r", "delete"):
        with pytest.raises(UnlearnError, match="locked by a live process"):
            force_unlock(store, "r")
        assert force_unlock(store, "r", force=True)
    assert not force_unlock(store, "r")


def test_a_coordinator_trying_again_and_again_takes_a_silent_remote_lock_over(tmp_path, monkeypatch):
    """Each try of a coordinator is a new lock attempt that does not wait; what it saw of
    the holder's heartbeat carries over, so a holder on another machine that died is
    taken over after its lease (an unreadable lock, after ours)."""
    from cluster.coordinator import Coordinator

    monkeypatch.setenv("UNLEARN_LOCK_LEASE_S", "0.5")
    store = LocalStore(str(tmp_path))
    SisaRun.train(store, "r", synthetic_records(12), SisaConfig(shards=1, slices=1, model="tiny", batch_size=4,
                                                                  max_length=32))
    coordinator = Coordinator(store, "r")
    for lock in ({"token": "c" * 32, "holder": "otherbox:7", "host": "otherbox", "pid": 7, "command": "delete",
                  "since": "then", "lease_s": 0.5}, "garbage{{"):
        store.put("r/LOCK", (json.dumps(lock) if isinstance(lock, dict) else lock).encode())
        rid = coordinator.submit(ids=[coordinator.pending() and "r0002" or "r0001"])
        t0, done = time.monotonic(), []
        while not done and time.monotonic() - t0 < 10:
            done = coordinator.apply_due()
            time.sleep(0.05)
        assert [r.request_id for r in done] == [rid] and 0.5 <= time.monotonic() - t0 < 5
        assert any("took over the run lock" in w for w in coordinator.get(rid).warnings)
        assert not store.exists("r/LOCK")


def test_a_claimer_that_died_half_way_does_not_wedge_the_run(tmp_path):
    store = LocalStore(str(tmp_path))
    stale = dead_lock(store)
    store.put(f"r/locks/takeover-{stale['token']}-0", json.dumps({**stale, "pid": dead_pid()}).encode())
    lock = RunLock(store, "r", "delete", wait=5).acquire()
    assert lock.took_over["pid"] == stale["pid"] and store.exists(f"r/locks/takeover-{stale['token']}-1")
    lock.release()
    assert store.list_all("r/") == []


def test_a_live_claimer_is_waited_for(tmp_path):
    store = LocalStore(str(tmp_path))
    stale = dead_lock(store)
    live = {**stale, "pid": os.getpid(), "pid_start": process_start(os.getpid())}  # this process
    store.put(f"r/locks/takeover-{stale['token']}-0", json.dumps(live).encode())
    with pytest.raises(RunBusy):
        RunLock(store, "r", "delete", wait=1.0, poll_s=0.05).acquire()


def test_watch_measures_silence_per_object():
    watch = LockWatch()
    assert watch.silence(b"lock", b"1") is None
    time.sleep(0.05)
    assert watch.silence(b"lock", b"1") >= 0.05
    assert watch.silence(b"lock", b"2") == 0.0  # it beat: the clock starts again
