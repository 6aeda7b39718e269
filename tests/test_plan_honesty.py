"""Issue 10: the capacity planner says what it does not know, and the SeaweedFS launcher
cleans up after itself.

`unlearn plan` never ranks a saturated (unstable) configuration, charges an accuracy
cost only where it was measured at a comparable number of records, and draws one colour
per configuration; `deploy/seaweedfs.py` leaves no `weed` running when it is stopped by a
signal or killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import cluster

CODE = os.path.dirname(os.path.dirname(os.path.abspath(cluster.__file__)))  # the tree under test ($PYTHONPATH)
LAUNCHER = os.path.join(CODE, "deploy", "seaweedfs.py")


# -- the SeaweedFS launcher --------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _processes(field: int, value: int) -> list[int]:
    """Live processes whose stat field (1: ppid, 2: process group) is `value`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None and fields[0] != "Z" and int(fields[field]) == value:
                out.append(int(name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launcher_leaves_no_weed_running_after_sigterm_or_kill(tmp_path):
    """Two launchers as `make`/a user runs them (the script): one gets SIGTERM, the other
    SIGKILL. Neither may leave its `weed` (nor anything in its process group) running.
    Checked by pid and process group: other tests run weed servers of their own."""
    import glob
    import re
    import tempfile

    from seaweedfs import weed_binary

    try:
        weed_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    launchers = {sig: subprocess.Popen([sys.executable, LAUNCHER, "--dir", str(tmp_path / sig.name)],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for sig in (signal.SIGTERM, signal.SIGKILL)}
    weeds: dict[signal.Signals, int] = {}
    ports: list[int] = []
    try:
        for sig, launcher in launchers.items():
            assert launcher.stdout.readline().startswith("export AWS_"), "the launcher did not start weed"
            (weeds[sig],) = _processes(1, launcher.pid)  # its one child: weed, leader of its own group
            with open(f"/proc/{weeds[sig]}/cmdline") as f:
                ports += [int(p) for p in re.findall(r"port=(\d+)", f.read())]
        for sig, launcher in launchers.items():
            launcher.send_signal(sig)
        for launcher in launchers.values():
            launcher.wait(timeout=30)
        deadline = time.monotonic() + 15  # after SIGKILL, weed is told by the kernel and stops by itself
        while time.monotonic() < deadline and any(_processes(2, pid) for pid in weeds.values()):
            time.sleep(0.1)
        left = {sig.name: _processes(2, pid) for sig, pid in weeds.items() if _processes(2, pid)}
        assert not left, f"weed still running after the launcher got these signals: {left}"
        assert launchers[signal.SIGTERM].returncode == 0  # a clean stop, after weed was gone
    finally:
        for launcher in launchers.values():
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
        for pid in weeds.values():  # on failure, do not leak the servers of this test
            if _processes(2, pid):
                os.killpg(pid, signal.SIGKILL)
        for port in ports:  # the gRPC sockets a killed weed leaves in the temp directory
            for path in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*grpc-{port + 10000}.sock")):
                os.unlink(path)

