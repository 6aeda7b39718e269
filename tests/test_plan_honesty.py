"""Issue 10: the capacity planner says what it does not know, and the SeaweedFS launcher
cleans up after itself.

`unlearn plan` never ranks a saturated (unstable) configuration, charges an accuracy
cost only where it was measured at a comparable number of records, and draws one colour
per configuration; `deploy/seaweedfs.py` leaves no `weed` running when it is stopped by a
signal or killed."""
from __future__ import annotations

import json
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


# -- unlearn plan ------------------------------------------------------------------------------
def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    from cluster.capacity.commands import main

    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# The README's worked example, shortened: full retraining (one worker, 2.3 h a training)
# cannot keep up with 200 requests a day and sits at 24 h/day, all its capacity; SISA
# S=8 R=1 keeps up, idle at night, at ~50 h/day. The saturated one reads cheaper.
SATURATED = ["--profile", "minilm", "--rate", "200/day", "--pattern", "daily:0.8", "--records", "1e5",
             "--shards", "8", "--slices", "1", "--methods", "sisa,full", "--workers", "8", "--horizon", "20d",
             "--queries", "1e5/day", "--accuracy", "none"]


def test_saturated_configurations_are_marked_and_never_ranked_cheapest(capsys):
    from cluster.capacity.simulate import BUSY_LIMIT

    rc, out, _ = _plan(capsys, *SATURATED, "--json")
    assert rc == 0
    plan = json.loads(out)
    sisa, full = plan["configs"]
    assert not full["stable"] and full["busy_fraction"] >= BUSY_LIMIT  # saturated: never idle
    assert sisa["stable"] and sisa["busy_fraction"] < BUSY_LIMIT
    assert full["holistic_hours_per_day"] < sisa["holistic_hours_per_day"]  # what made it read cheaper
    assert full["rank"] is None and sisa["rank"] == 1
    assert plan["cheapest"] == "sisa S=8 R=1 window 0 workers 8"
    for r in plan["configs"]:  # "stable" is exactly "not saturated"
        assert r["stable"] == (r["busy_fraction"] < BUSY_LIMIT)
    rc, out, _ = _plan(capsys, *SATURATED)
    full_line = next(line for line in out.splitlines() if line.startswith("full"))
    assert "UNSTABLE (saturated)" in full_line and full_line.split()[-1] == "-"  # marked, no rank
    assert "cheapest: sisa S=8 R=1 window 0 workers 8" in out
    assert "not ranked: 1 UNSTABLE (saturated)" in out


def test_rank_skips_unstable_and_late_configurations():
    from cluster.capacity.report import rank

    rows = [{"stable": False, "sla_violations": 0, "holistic_hours_per_day": 1.0},
            {"stable": True, "sla_violations": 3, "holistic_hours_per_day": 2.0},
            {"stable": True, "sla_violations": None, "holistic_hours_per_day": 9.0},
            {"stable": True, "sla_violations": 0, "holistic_hours_per_day": 5.0}]
    assert rank(rows) is rows[3]
    assert [r["rank"] for r in rows] == [None, None, 2, 1]
    assert rank(rows[:2]) is None and [r["rank"] for r in rows[:2]] == [None, None]


def _bench_results(folder, records: int, pool: int) -> str:
    """A SISA bench result (single model 0.80, S=8 R=4 0.70) and an ERASE one (0.75)."""
    (folder / "sisa.json").write_text(json.dumps({
        "model": "minilm", "records": records, "date": "d", "single_model_accuracy": 0.80,
        "rows": [{"shards": 8, "slices": 4, "accuracy_vote": 0.70}]}))
    (folder / "erase_accuracy.json").write_text(json.dumps({"lm": "x", "shots": 8, "tasks": [
        {"task": "rotten_tomatoes", "pool": pool, "test": 200, "methods": {"erase": {"accuracy": 0.75}}}]}))
    return str(folder / "sisa.json")


def test_accuracy_cost_is_charged_only_at_a_comparable_number_of_records(capsys, tmp_path):
    accuracy = _bench_results(tmp_path, records=600, pool=600)
    base = ["--profile", "tiny", "--rate", "20/day", "--shards", "8", "--slices", "4", "--workers", "4",
            "--horizon", "3d", "--accuracy", accuracy]
    rc, out, _ = _plan(capsys, *base, "--records", "1000", "--json")
    assert rc == 0
    cost = {r["method"]: r["accuracy_cost"] for r in json.loads(out)["configs"]}
    assert cost == {"sisa": pytest.approx(0.10), "erase": pytest.approx(0.05), "full": 0.0}  # 600 ~ 1,000
    rc, out, _ = _plan(capsys, *base, "--records", "1e6", "--json")
    rows = {r["method"]: r for r in json.loads(out)["configs"]}
    for method in ("sisa", "erase"):  # 600 records say nothing of 1,000,000
        r = rows[method]
        assert r["accuracy_cost"] is None and r["accuracy"] is None and r["accuracy_records"] == 600
        assert "600" in r["accuracy_note"] and "1,000,000" in r["accuracy_note"]
    assert rows["full"]["accuracy_cost"] == 0.0  # the reference itself
    rc, out, _ = _plan(capsys, *base, "--records", "1e6")
    assert [line.count("not at N") for line in out.splitlines()[3:6]] == [1, 1, 0]  # sisa, erase, full rows
    assert "+0.100" not in out and 'acc. cost "not at N"' in out
    # ERASE is charged only where its own pool is comparable too
    accuracy = _bench_results(tmp_path, records=1000, pool=50)
    rc, out, _ = _plan(capsys, *base, "--records", "1000", "--accuracy", accuracy, "--json")
    rows = {r["method"]: r for r in json.loads(out)["configs"]}
    assert rows["sisa"]["accuracy_cost"] == pytest.approx(0.10) and rows["erase"]["accuracy_cost"] is None
    from cluster.capacity.report import comparable  # "comparable": within 10x either way

    assert comparable(600, 6000) and comparable(600, 60) and comparable(600, 600)
    assert not comparable(600, 6001) and not comparable(600, 59) and not comparable(None, 600)


# -- the plot ----------------------------------------------------------------------------------
def _grid(windows=(0.0, 6 * 3600.0), shards=(4, 8, 16), slices=(1, 4)):
    from cluster.capacity.costs import Config

    out = []
    for w in windows:
        out += [Config("sisa", w, 8, shards=S, slices=R) for S in shards for R in slices]
        out += [Config("erase", w, 8, partitions=8), Config("full", w, 1)]
    return out


def test_one_colour_per_configuration():
    from cluster.capacity.commands import line_style

    for grid in (_grid(), _grid(windows=(0.0, 60.0, 3600.0), shards=(2, 4, 8, 16, 32), slices=(1, 4))):
        colours = [line_style(c, grid)["color"] for c in grid]
        assert len(set(colours)) == len(grid), "two configurations share a colour"
        assert [line_style(c, grid)["color"] for c in grid] == colours  # the same each time it is asked


def test_both_panels_draw_each_configuration_in_its_colour_and_mark_saturation():
    pytest.importorskip("matplotlib", reason="--plot needs the 'plot' extra (matplotlib)")
    import matplotlib.pyplot as plt

    from cluster.capacity.commands import figure, label, line_style

    grid = _grid()
    data = {"rates_per_day": [10.0, 100.0],
            "lines": [{"label": label(c), **line_style(c, grid), "p99_s": [60.0, 120.0],
                       "holistic_hours_per_day": [1.0, 2.0], "stable": [True, c.method != "full"]} for c in grid]}
    fig = figure(data, "title", sla_s=3600.0)
    try:
        want = {line["label"]: line["color"] for line in data["lines"]}
        ax1, ax2 = fig.axes
        for ax in (ax1, ax2):
            drawn = {h.get_label(): h.get_color() for h in ax.get_lines() if not h.get_label().startswith("_")}
            assert drawn == want  # every configuration, in its own colour, in both panels
            open_markers = [h for h in ax.get_lines() if h.get_label() == "_unstable"]
            assert sorted(h.get_markeredgecolor() for h in open_markers) == sorted(
                line["color"] for line in data["lines"] if line["label"].startswith("full"))
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == [*want, "UNSTABLE (saturated)", "SLA"]
    finally:
        plt.close(fig)
