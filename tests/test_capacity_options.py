"""`unlearn plan` and `unlearn profile` option values: each bad one is one line naming the
option and its allowed range, exit 2, before anything is read, loaded, simulated or written;
plans and profiles too large to finish in reasonable time are refused and say so."""
import json
import os

import numpy as np
import pytest

from conftest import synthetic_records
from proc_helpers import cli_in_process

MAX_SEED = 2**63 - 1


cli = cli_in_process  # (exit status, stdout, stderr lines) of `unlearn ARGV` in this process


@pytest.fixture
def no_simulation(monkeypatch):
    """Refusals must come before a stream is generated or a configuration simulated."""
    from cluster.capacity import commands

    def never(*_a, **_kw):
        raise AssertionError("simulated a plan that should have been refused")

    monkeypatch.setattr(commands, "simulate", never)
    monkeypatch.setattr(commands, "generate", never)


PLAN = ["plan", "--profile", "tiny", "--rate", "10/day", "--records", "1e4", "--horizon", "2d"]

# (options replacing or added to PLAN, what the one line says after "plan: argument ")
PLAN_CASES = [
    (["--rate", "nan/day"], "--rate: must be a rate in (0, 1e+06] per second"),
    (["--rate", "inf/s"], "--rate: must be a rate in (0, 1e+06] per second"),
    (["--rate=-1/day"], "--rate: must be a rate in (0, 1e+06] per second"),
    (["--rate", "0/day"], "--rate: must be a rate in (0, 1e+06] per second"),
    (["--rate", "1e308/s"], "--rate: must be a rate in (0, 1e+06] per second"),
    (["--queries", "1e308/day"], "--queries: must be a rate in [0, 1e+06] per second"),
    (["--queries", "nan/day"], "--queries: must be a rate in [0, 1e+06] per second"),
    (["--horizon", "0"], "--horizon: must be a duration in (0, 3650d]"),
    (["--horizon", "1e308d"], "--horizon: must be a duration in (0, 3650d]"),
    (["--horizon", "nan"], "--horizon: must be a duration in (0, 3650d]"),
    (["--horizon", ""], '--horizon: must be a duration in (0, 3650d] (like 90s, 5min, 1h, 30d, 2w), got ""'),
    (["--records", "1e30"], "--records: must be a whole number in 1..1e12"),
    (["--records", str(10**30)], "--records: must be a whole number in 1..1e12"),
    (["--records", "0"], "--records: must be a whole number in 1..1e12"),
    (["--records", "nan"], "--records: must be a whole number in 1..1e12"),
    (["--seed=-1"], f"--seed: must be an integer in 0..{MAX_SEED}"),
    (["--seed", str(2**63)], f"--seed: must be an integer in 0..{MAX_SEED}"),
    (["--shards", "1,2,nan"], "--shards: must be a whole number in 1..10000 (like 1000 or 1e6), got nan"),
    (["--shards", "0"], "--shards: must be a whole number in 1..10000"),
    (["--shards", "1e5"], "--shards: must be a whole number in 1..10000"),
    (["--shards", ""], '--shards: empty item in the list ""'),
    (["--shards", "8,8"], "--shards: 8 repeats a value of the list 8,8"),
    (["--slices", "1001"], "--slices: must be a whole number in 1..1000"),
    (["--partitions", "inf"], "--partitions: must be a whole number in 1..1024"),
    (["--workers", "-1"], "--workers: must be a whole number in 1..10000"),
    (["--workers", ",".join(str(i) for i in range(1, 1002))], "--workers: 1001 values; at most 1000"),
    (["--window", "0,1e400"], "--window: must be a duration in [0, 3650d]"),
    (["--window=-1h"], "--window: must be a duration in [0, 3650d]"),
    (["--methods", ""], '--methods: empty item in the list ""'),
    (["--methods", "sisa,magic"], "--methods: must be one of sisa, erase, full, got magic"),
    (["--sla", "0"], "--sla: must be a duration in (0, 3650d]"),
    (["--sla", "inf"], "--sla: must be a duration in (0, 3650d]"),
    (["--price", "nan"], "--price: must be a number in [0, 1e+06]"),
    (["--price", "1e308"], "--price: must be a number in [0, 1e+06]"),
    (["--fallback", "1.5"], "--fallback: must be a number in [0, 1]"),
    (["--fallback", "nan"], "--fallback: must be a number in [0, 1]"),
    (["--pattern", "daily:nan"], "--pattern: in daily:nan: the daily amplitude must be a number in [0, 1]"),
    (["--pattern", "daily:0.5@24"], "--pattern: in daily:0.5@24: the peak hour must be a number in [0, 24)"),
    (["--pattern", "daily:0.5+daily:0.2"], "--pattern: in daily:0.2: a second daily cycle (give one)"),
    (["--pattern", "spike:1d,1d,inf"], "--pattern: in spike:1d,1d,inf: the spike factor must be a number in [0, 1e+06]"),
    (["--pattern", "spike:1d,1e308w,2"], "the spike's start and length must be a duration in [0, 3650d]"),
    (["--pattern", "+".join(f"spike:{i}h,1h,2" for i in range(101))], "more than 100 spikes"),
    (["--plot-rates", "1/day"], "--plot-rates: only with --plot"),
    (["--plot", "plan.svg"], '--plot: must name a .png file, got "plan.svg"'),
    (["--plot", "plan.png", "--plot-rates", "0/day,1/day"], "--plot-rates: must be a rate in (0, 1e+06] per second"),
    (["--plot", "plan.png", "--plot-rates", ",".join(f"{i}/day" for i in range(1, 22))],
     "--plot-rates: 21 values; at most 20"),
    (["--replay", "log.json"], "--replay: give --replay or --rate, not both"),
    (["--shards", "100", "--slices", "101"], "--shards 100 x --slices 101: more slices than the 10,000 records"),
    (["--records", "10", "--methods", "erase", "--partitions", "11"],
     "--partitions 11: more partitions than the 10 records"),
]


@pytest.mark.parametrize("change,message", PLAN_CASES, ids=[" ".join(c)[:40] for c, _ in PLAN_CASES])
def test_plan_refuses_a_bad_value_in_one_line(change, message, capsys, tmp_path, monkeypatch, no_simulation):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli([*PLAN, *change], capsys)  # a later value of an option replaces PLAN's
    assert (code, out) == (2, ""), err
    assert len(err) == 1 and err[0].startswith("unlearn: error: plan: argument ") and message in err[0], err
    assert err[0].endswith("see unlearn plan --help")
    assert os.listdir(tmp_path) == []


def test_plan_refuses_a_missing_rate_or_records_as_usage(capsys, no_simulation):
    code, _, err = cli(["plan", "--profile", "tiny", "--records", "1e4"], capsys)
    assert code == 2 and err == ["unlearn: error: plan: argument --rate: required (or --replay a request log); "
                                 "see unlearn plan --help"]
    code, _, err = cli(["plan", "--profile", "tiny", "--rate", "1/day"], capsys)
    assert code == 2 and len(err) == 1 and "argument --records: required" in err[0]


def test_the_allowed_extremes_are_accepted(capsys):
    code, out, err = cli(["plan", "--profile", "tiny", "--rate", "1/day", "--records", "1", "--horizon", "1h",
                          "--methods", "sisa,full", "--shards", "1", "--slices", "1", "--workers", "10000",
                          "--window", "0,3650d", "--seed", str(MAX_SEED), "--fallback", "1", "--price", "0",
                          "--queries", "0/day", "--sla", "3650d", "--pattern", "daily:1@0+spike:3650d,0,1e6",
                          "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["configs"]) == 4


@pytest.mark.parametrize("argv,message", [
    (["--shards", ",".join(str(i) for i in range(1, 101)), "--slices", "1,2,3,4,5,6,7,8,9,10"],
     "argument --methods x --shards x --slices x --partitions x --window x --workers: 1,001 configurations "
     "(every combination is simulated); at most 1000"),
    (["--rate", "1e5/s", "--horizon", "5d"], "argument --rate: about 4.32e+10 requests"),
    (["--rate", "20/day", "--horizon", "2d", "--pattern", "spike:1d,1d,1e6"],  # 40 requests but for the spike
     "argument --rate: about 2e+07 requests over --horizon (--rate x --horizon, shaped by --pattern); at most 1e+07 "
     "are simulated"),
    (["--rate", "3/s", "--horizon", "30d", "--shards", "1,2,3,4,5,6,7,8"],
     "argument --rate x --horizon: about 7.78e+06 requests through 9 configurations is 7e+07 simulated; "
     "at most 5e+07 (a shorter --horizon gives the same rates a day; or fewer configurations)"),
    (["--rate", "1/s", "--horizon", "30d", "--plot", "p.png", "--plot-rates", "1/s,100/s"],
     "argument --plot-rates: about 2.59e+08 requests"),
    (["--rate", "0.3/s", "--horizon", "30d", "--shards", "1,2,3", "--plot", "p.png"],
     "about 1.52e+07 requests at 8 rates through 4 configurations"),
])
def test_plans_too_large_to_finish_are_refused_before_simulating(argv, message, capsys, tmp_path, monkeypatch,
                                                                no_simulation):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["plan", "--profile", "tiny", "--rate", "1/day", "--records", "1e6", "--methods", "sisa,full",
                        *argv], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert os.listdir(tmp_path) == []


def test_a_replayed_log_too_large_to_simulate_is_refused(capsys, tmp_path, monkeypatch, no_simulation):
    from cluster.capacity import commands

    log = {"requests": [{"request_id": f"r{i}", "accepted": f"2026-01-01T00:00:0{i}+00:00", "status": "pending",
                         "requested": {"ids": 1, "owners": 0}} for i in range(5)]}
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log))
    monkeypatch.setattr(commands, "MAX_WORK", 9)
    code, _, err = cli(["plan", "--profile", "tiny", "--records", "1e4", "--replay", str(path), "--methods",
                        "sisa,full"], capsys)
    assert code == 2 and len(err) == 1 and "argument --replay: about 5 requests through 2 configurations" in err[0]


def test_plot_writes_nothing_when_it_fails(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="--plot needs the 'plot' extra (matplotlib)")
    from matplotlib.figure import Figure

    monkeypatch.chdir(tmp_path)
    argv = ["plan", "--profile", "tiny", "--rate", "10/day", "--records", "1e4", "--horizon", "1d", "--methods",
            "full", "--plot-rates", "1/day,10/day", "--json"]
    missing = tmp_path / "no" / "plan.png"
    code, out, err = cli([*argv, "--plot", str(missing)], capsys)
    assert (code, out) == (1, "") and err == [f"unlearn: error: --plot {missing}: no such folder {missing.parent}"]
    code, out, err = cli([*argv, "--plot", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "--plot: must name a .png file" in err[0]

    def disk_full(self, path, **kw):  # half a file, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    old = tmp_path / "plan.png"
    old.write_bytes(b"the previous plot")
    code, out, err = cli([*argv, "--plot", "plan.png"], capsys)
    assert (code, out) == (1, "") and err == ["unlearn: error: --plot plan.png: cannot write (No space left on device)"]
    assert os.listdir(tmp_path) == ["plan.png"] and old.read_bytes() == b"the previous plot"


# -- profile ---------------------------------------------------------------------------------

@pytest.fixture
def nothing_loads(monkeypatch):
    """Refusals must come before records, a run or a model are loaded."""
    from cluster.capacity import profile
    import core.sources

    def never(*_a, **_kw):
        raise AssertionError("loaded records or a model for a profile that should have been refused")

    for module, name in ((profile, "measure"), (profile, "calibrate_run"), (core.sources, "load_records")):
        monkeypatch.setattr(module, name, never)


PROFILE_CASES = [
    (["--max-length", "100000"], 'argument --max-length: must be an integer in 8..512 for model "tiny"'),
    (["--max-length", "4"], "argument --max-length: must be an integer in 8..131072"),
    (["--records", "1e30"], "argument --records: must be a whole number in 16..10000"),
    (["--records", "nan"], "argument --records: must be a whole number in 16..10000"),
    (["--records", "10"], "argument --records: must be a whole number in 16..10000"),
    (["--epochs", "nan"], "argument --epochs: must be a number in (0, 1000]"),
    (["--epochs", "0"], "argument --epochs: must be a number in (0, 1000]"),
    (["--epochs", "1000"], "argument --records: 96 records x --epochs 1000 is 96000 training examples a timing; "
                           "at most 30,000"),
    (["--records", "10000", "--epochs", "4"], "argument --records: 10000 records x --epochs 4"),
    (["--repeats", "0"], "argument --repeats: must be an integer in 1..10"),
    (["--repeats", "1000000000"], "argument --repeats: must be an integer in 1..10"),
    (["--k", "0"], "argument --k: must be an integer in 1..1024"),
    (["--k", "100000"], "argument --k: must be an integer in 1..1024"),
    (["--batch-size=-1"], "argument --batch-size: must be an integer in 1..4096"),
    (["--run", "a/b"], "argument --run: \"a/b\" contains the path separator"),
]


@pytest.mark.parametrize("change,message", PROFILE_CASES, ids=[" ".join(c)[:40] for c, _ in PROFILE_CASES])
def test_profile_refuses_a_bad_value_before_loading_anything(change, message, capsys, tmp_path, monkeypatch,
                                                             nothing_loads):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["profile", "--model", "tiny", "--erase-results", str(tmp_path), *change], capsys)
    assert (code, out) == (2, ""), err
    assert len(err) == 1 and err[0].startswith("unlearn: error: profile: ") and message in err[0], err
    assert os.listdir(tmp_path) == []


def test_profile_refuses_an_unwritable_out_before_measuring(capsys, tmp_path, monkeypatch, nothing_loads):
    missing = tmp_path / "no" / "p.json"
    code, out, err = cli(["profile", "--model", "tiny", "--out", str(missing)], capsys)
    assert (code, out) == (1, "") and err == [f"unlearn: error: --out {missing}: no such folder {missing.parent}"]
    code, out, err = cli(["profile", "--model", "tiny", "--out", str(tmp_path)], capsys)
    assert (code, out) == (1, "") and err == [f"unlearn: error: --out {tmp_path}: is a folder, not a file"]


def test_profile_writes_its_file_whole_or_not_at_all(capsys, tmp_path, monkeypatch):
    from cluster.capacity import profile
    from cluster.capacity.costs import Profile
    import core.sources

    measured = Profile(model="tiny", machine="m", date="d", epochs=3.0, train_s_per_example=1e-4, stage_fixed_s=0.01,
                       shard_fixed_s=0.05, batch_fixed_s=0.1, query_s_per_shard=0.002, erase_certificate_s=0.001,
                       erase_recluster_s_per_record=1e-4, erase_fallback_p=0.05, erase_batch_fixed_s=0.01,
                       erase_query_s=0.05)
    monkeypatch.setattr(core.sources, "load_records", lambda *_a, **_kw: synthetic_records(16))
    monkeypatch.setattr(profile, "measure", lambda *_a, **_kw: measured)
    out = tmp_path / "p.json"
    argv = ["profile", "--model", "tiny", "--records", "16", "--erase-results", str(tmp_path), "--out", str(out),
            "--quiet"]
    assert cli(argv, capsys)[0] == 0
    assert Profile.from_json(json.loads(out.read_text())).train_s_per_example == 1e-4
    before = out.read_bytes()

    def half_then_full(obj, f, **kw):  # half the JSON, then the disk is full
        f.write(json.dumps(obj)[:50])
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", half_then_full)
    code, _, err = cli(argv, capsys)
    assert code == 1 and err == [f"unlearn: error: --out {out}: cannot write (No space left on device)"]
    assert os.listdir(tmp_path) == ["p.json"] and out.read_bytes() == before


def test_the_stand_alone_entry_point_says_usage_errors_in_one_line(capsys):
    from cluster.capacity.commands import main as capacity_main

    with pytest.raises(SystemExit) as exc:
        capacity_main(["plan", "--rate", "nan/day"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("unlearn: error: plan: argument --rate: ")
    assert capacity_main(["plan", "--profile", "tiny", "--rate", "1/day"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "unlearn: error: plan: argument --records: required (the profile was not calibrated on a run); "
        "see unlearn plan --help"]


def test_spikes_multiply_the_rate_in_their_cells():
    """The spike cells are found by binary search (100 spikes over ten years take no time):
    the same cumulative intensity as masking every cell for every spike."""
    from cluster.capacity.workload import DAY, Pattern, Spike, cumulative_intensity

    rng = np.random.default_rng(0)
    horizon = 40 * DAY
    spikes = tuple(Spike(float(rng.uniform(0, horizon)), float(rng.uniform(0, 5 * DAY)), float(rng.uniform(0, 30)))
                   for _ in range(12)) + (Spike(0.0, 0.0, 5.0), Spike(horizon, DAY, 7.0), Spike(30.0, 60.0, 3.0))
    pattern = Pattern(0.4, 9 * 3600.0, spikes)
    t, cum = cumulative_intensity(0.01, pattern, horizon)
    w = 2 * np.pi / DAY
    base = t + pattern.daily_amplitude / w * (np.sin(w * (t - pattern.peak_s)) - np.sin(-w * pattern.peak_s))
    mid, rate = (t[:-1] + t[1:]) / 2, np.ones(len(t) - 1)
    for sp in spikes:
        rate = np.where((mid >= sp.start_s) & (mid < sp.start_s + sp.duration_s), rate * sp.factor, rate)
    assert np.array_equal(cum, 0.01 * np.concatenate([[0.0], np.cumsum(np.diff(base) * rate)]))
