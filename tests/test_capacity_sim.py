"""Capacity planning: the pure simulator against the analytic SISA costs, the workload
generators, option parsing, and `unlearn plan` end to end (table, JSON, --help)."""
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.capacity.commands import main
from cluster.capacity.costs import Config, Profile, expected_batch_fraction, makespan, sisa_jobs
from cluster.capacity.simulate import simulate
from cluster.capacity.workload import (DAY, Pattern, Spike, cumulative_intensity, from_log, generate,
                                       parse_count, parse_duration, parse_pattern, parse_rate)
from core.errors import UnlearnError
from sisa.plan import expected_retrain_fraction

PROFILE = Profile(model="test", machine="m", date="d", epochs=3.0, train_s_per_example=1e-4, stage_fixed_s=0.01,
                  shard_fixed_s=0.05, batch_fixed_s=0.1, query_s_per_shard=0.002, erase_certificate_s=0.001,
                  erase_recluster_s_per_record=1e-4, erase_fallback_p=0.05, erase_batch_fixed_s=0.01,
                  erase_query_s=0.05)


@pytest.fixture(scope="module")
def sparse():
    """~8,000 requests, one an hour on average: each finishes long before the next."""
    return generate(1 / 3600, 8000 * 3600, Pattern(), seed=1)


@pytest.mark.parametrize("S", [1, 8, 32])
@pytest.mark.parametrize("R", [1, 4, 8])
def test_single_requests_match_the_analytic_fraction(sparse, S, R):
    res = simulate(sparse, Config("sisa", 0.0, 4, shards=S, slices=R), PROFILE, 10_000)
    assert res.requests > 7000 and (res.trace.batch_size == 1).all()  # no batching at this rate
    analytic = expected_retrain_fraction(S, R)
    assert abs(res.mean_retrain_fraction - analytic) <= 0.02 * analytic


@pytest.mark.parametrize("S,R", [(1, 4), (8, 1), (8, 4), (32, 8)])
def test_batched_requests_match_the_expectation_for_touched_shards(S, R):
    w = generate(20 / 3600, 400 * 3600, Pattern(), seed=2)  # a 1 h window batches ~20 requests
    res = simulate(w, Config("sisa", 3600.0, 4, shards=S, slices=R), PROFILE, 10_000)
    t = res.trace
    assert t.batch_size.mean() > 10
    expected = np.array([expected_batch_fraction(S, R, int(k)) for k in t.batch_size])
    assert abs(t.batch_fraction.sum() / expected.sum() - 1) <= 0.02
    if R == 1:  # touched shards, S (1 - (1 - 1/S)^K)
        touched = np.array([S * (1 - (1 - 1 / S) ** int(k)) for k in t.batch_size])
        assert abs(t.batch_jobs.sum() / touched.sum() - 1) <= 0.02


def test_expected_batch_fraction_closed_forms():
    for S, R in [(1, 1), (4, 4), (8, 8), (32, 1)]:
        assert math.isclose(expected_batch_fraction(S, R, 1), expected_retrain_fraction(S, R))
    assert math.isclose(expected_batch_fraction(8, 1, 5), 1 - (7 / 8) ** 5)
    assert math.isclose(expected_batch_fraction(1, 8, 10 ** 6), 1.0)


def test_job_tables_match_sisa_plan_retrain_fraction():
    from sisa.plan import retrain_fraction

    layout = [[3, 5, 2], [4, 4, 6]]
    jobs = sisa_jobs(PROFILE, 2, 3, 24, layout)
    # shard 1 from stage 1: stages 1 and 2 train 8 and 14 records
    assert math.isclose(jobs.fraction[1, 1], retrain_fraction([8, 14], 3, 24))
    assert math.isclose(jobs.train_s[1, 1], jobs.fraction[1, 1] * 24 * 3.0 * 1e-4)


def test_makespan_places_longest_jobs_first():
    assert makespan([3.0, 3.0, 2.0, 2.0, 2.0], 2) == 7.0
    assert makespan([5.0, 1.0], 4) == 5.0
    assert makespan([], 3) == 0.0


def test_window_delays_and_batches_like_the_coordinator():
    w = from_log({"requests": [
        {"request_id": "a", "accepted": "2026-01-01T00:00:00+00:00", "status": "done", "records_deleted": 1},
        {"request_id": "b", "accepted": "2026-01-01T00:00:30+00:00", "status": "done", "records_deleted": 1},
        {"request_id": "c", "accepted": "2026-01-01T01:00:00+00:00", "status": "done", "records_deleted": 1},
    ]})
    res = simulate(w, Config("sisa", 60.0, 2, shards=4, slices=2), PROFILE, 1000)
    assert res.trace.batch_size.tolist() == [2, 1]  # a and b within the window, c alone
    assert res.trace.batch_start_s.tolist() == [60.0, 3660.0]
    ttf = res.trace.time_to_forget_s
    assert ttf[0] > 60 and math.isclose(ttf[0] - ttf[1], 30.0)


def test_saturated_pipeline_is_unstable_and_batches_grow():
    w = generate(2000 / DAY, 20 * DAY, Pattern(), seed=3)
    slow = Profile(**{**PROFILE.to_json(), "train_s_per_example": 0.02})
    fast = simulate(w, Config("sisa", 0.0, 4, shards=32, slices=4), PROFILE, 100_000)
    busy = simulate(w, Config("sisa", 0.0, 4, shards=2, slices=1), slow, 100_000)
    assert fast.stable and fast.trace.batch_size.mean() < 1.1
    assert not busy.stable and busy.trace.batch_size.mean() > 50
    assert busy.compute_hours_per_day <= 4 * 24 * 1.01  # never more than every worker all day


def test_full_retraining_and_erase():
    w = generate(50 / DAY, 30 * DAY, Pattern(), seed=4)
    full = simulate(w, Config("full", 0.0, 1), PROFILE, 10_000)
    assert math.isclose(full.trace.batch_fraction.sum(), full.batches)  # every batch retrains everything
    erase = simulate(w, Config("erase", 0.0, 4, partitions=8), PROFILE, 10_000)
    # a fallback re-clusters one of 8 partitions; ~5% of requests fall back
    assert 0.3 * 0.05 / 8 < erase.mean_retrain_fraction < 2 * 0.05 / 8
    assert erase.percentile_s(50) < 0.1


def test_simulation_is_deterministic_for_a_seed_and_shared_across_configs():
    a = generate(100 / DAY, 10 * DAY, Pattern(0.5), seed=7)
    b = generate(100 / DAY, 10 * DAY, Pattern(0.5), seed=7)
    c = generate(100 / DAY, 10 * DAY, Pattern(0.5), seed=8)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.shard_key, b.shard_key)
    assert not np.array_equal(a.arrival_s[:10], c.arrival_s[:10])
    r1 = simulate(a, Config("sisa", 0.0, 2, shards=8, slices=4), PROFILE, 10_000)
    r2 = simulate(b, Config("sisa", 0.0, 2, shards=8, slices=4), PROFILE, 10_000)
    assert np.array_equal(r1.trace.time_to_forget_s, r2.trace.time_to_forget_s)


def test_patterns_shape_the_arrivals():
    _t, cum = cumulative_intensity(10 / DAY, Pattern(1.0, 14 * 3600.0), 4 * DAY)
    assert math.isclose(cum[-1], 40, rel_tol=1e-6)  # the cycle keeps the mean
    w = generate(200 / DAY, 20 * DAY, Pattern(0.9, 14 * 3600.0), seed=5)
    hours = (w.arrival_s % DAY) / 3600
    assert ((hours > 10) & (hours < 18)).mean() > 2 * ((hours < 6) | (hours > 22)).mean()
    spike = generate(10 / DAY, 20 * DAY, Pattern(spikes=(Spike(10 * DAY, DAY, 20.0),)), seed=6)
    inside = ((spike.arrival_s >= 10 * DAY) & (spike.arrival_s < 11 * DAY)).sum()
    assert inside > 100 and inside > 0.4 * spike.requests


@settings(max_examples=25, deadline=None)
@given(S=st.integers(1, 16), R=st.integers(1, 8), window=st.sampled_from([0.0, 600.0, 3600.0]),
       workers=st.integers(1, 8), rate=st.floats(1.0, 5000.0))
def test_invariants(S, R, window, workers, rate):
    w = generate(rate / DAY, 3 * DAY, Pattern(), seed=9)
    res = simulate(w, Config("sisa", window, workers, shards=S, slices=R), PROFILE, 50_000)
    t = res.trace
    assert t.batch_size.sum() == w.requests
    if w.requests:
        first = np.concatenate([[0], np.cumsum(t.batch_size)[:-1]])  # a batch's oldest request waited the window
        assert (t.time_to_forget_s[first] >= window - 1e-9).all()
        assert (t.batch_jobs <= S).all() and (t.batch_fraction <= 1 + 1e-9).all()
        assert (t.batch_start_s[1:] >= t.batch_end_s[:-1] - 1e-9).all()  # one batch at a time
        assert res.mean_retrain_fraction <= expected_retrain_fraction(S, R) * 3 + 1e-9


@pytest.mark.parametrize("text,value", [("500/day", 500 / DAY), ("2/h", 2 / 3600), ("0.1/s", 0.1), ("3/min", 0.05)])
def test_parse_rate(text, value):
    assert math.isclose(parse_rate(text), value)


def test_parse_values_and_errors():
    assert parse_duration("0") == 0 and parse_duration("90s") == 90 and parse_duration("1h") == 3600
    assert parse_duration("30d") == 30 * DAY and parse_duration("5min") == 300
    assert parse_count("1e6") == 1_000_000
    assert parse_pattern("daily:0.5@9+spike:3d,1d,10") == Pattern(0.5, 9 * 3600.0, (Spike(3 * DAY, DAY, 10.0),))
    for fn, text, msg in [(parse_rate, "500", "must be a rate in"), (parse_rate, "5/fortnight", "must be a rate in"),
                          (parse_duration, "1y", "must be a duration in"), (parse_duration, "-1h", r"in \[0, 3650d\]"),
                          (parse_count, "1.5", "whole number"), (parse_count, "0", r"in 1\.\.1e12"),
                          (parse_pattern, "daily:2", "amplitude"), (parse_pattern, "wave", "not a pattern")]:
        with pytest.raises(UnlearnError, match=msg):
            fn(text)


def _plan(capsys, *argv):
    try:
        rc = main(["plan", "--profile", "tiny", *argv])
    except SystemExit as exc:  # a usage error, said by argparse
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_json_has_every_combination(capsys):
    rc, out, _ = _plan(capsys, "--rate", "500/day", "--records", "1e5", "--shards", "8,16", "--slices", "1,4",
                       "--window", "0,1h", "--workers", "4", "--sla", "1d", "--queries", "1e5/day",
                       "--horizon", "20d", "--json")
    assert rc == 0
    rows = json.loads(out)["configs"]
    assert len(rows) == 2 * (4 + 1 + 1)  # per window: 4 SISA, 1 ERASE, 1 full
    keys = {"method", "shards", "slices", "window_s", "workers", "mean_retrain_fraction", "time_to_forget_p50_s",
            "time_to_forget_p99_s", "compute_hours_per_day", "stable", "sla_violations", "holistic_hours_per_day"}
    assert all(keys <= set(r) for r in rows)
    sisa = [r for r in rows if r["method"] == "sisa"]
    assert {(r["shards"], r["slices"], r["window_s"]) for r in sisa} == {
        (S, R, W) for S in (8, 16) for R in (1, 4) for W in (0.0, 3600.0)}
    full = next(r for r in rows if r["method"] == "full" and r["window_s"] == 0)
    assert all(r["mean_retrain_fraction"] < full["mean_retrain_fraction"] for r in sisa)
    for r in rows:  # holistic = deletions x U + queries x I
        assert math.isclose(r["holistic_hours_per_day"],
                            r["compute_hours_per_day"] + 1e5 * r["query_s"] / 3600, rel_tol=1e-3, abs_tol=1e-3)


def test_plan_table_and_bad_values(capsys):
    rc, out, _ = _plan(capsys, "--rate", "50/day", "--records", "1e4", "--horizon", "5d")
    assert rc == 0 and "p99 forget" in out and "sisa" in out and "full" in out
    for argv, msg in [(["--rate", "fast", "--records", "1000"], "argument --rate: must be a rate in"),
                      (["--rate", "1/day", "--records", "1e6", "--window", "0,soon"], "--window: must be a duration"),
                      (["--rate", "1/day", "--records", "1e6", "--shards", "8,,16"], "--shards: empty item"),
                      (["--rate", "1/day", "--records=-3"], "--records: must be a whole number in 1..1e12"),
                      (["--rate", "1/day"], "--records: required"),
                      (["--rate", "1/day", "--records", "1000", "--methods", "sisa,magic"], "got magic")]:
        rc, _, err = _plan(capsys, *argv)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_plan_help_explains_every_option(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unlearn"])
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for option in ("--rate", "--pattern", "--replay", "--horizon", "--records", "--queries", "--seed", "--methods",
                   "--shards", "--slices", "--partitions", "--window", "--workers", "--fallback", "--profile",
                   "--sla", "--price", "--accuracy", "--json", "--markdown", "--plot", "--plot-rates"):
        assert option in text
    assert "stable" in text and "500/day" in text


def test_a_year_of_requests_through_a_grid_takes_seconds(capsys):
    import time

    t0 = time.perf_counter()
    rc, out, _ = _plan(capsys, "--rate", "500/day", "--records", "1e6", "--shards", "8,16,32", "--slices", "1,4,8",
                       "--window", "0,1h", "--workers", "4", "--horizon", "365d", "--methods", "sisa,full", "--json")
    took = time.perf_counter() - t0
    assert rc == 0 and len(json.loads(out)["configs"]) == 20
    print(f"a year at 500/day through 20 configurations: {took:.1f} s")
    assert took < 60  # a few seconds alone; generous for a shared 2-core machine


def test_plot_draws_time_to_forget_and_cost_against_rate(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the 'plot' extra (matplotlib)")
    png = tmp_path / "plan.png"
    rc, out, _ = _plan(capsys, "--rate", "100/day", "--records", "1e4", "--horizon", "5d", "--shards", "4,8",
                       "--plot", str(png), "--plot-rates", "10/day,100/day,1000/day", "--json")
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot = json.loads(out)["plot"]
    assert plot["rates_per_day"] == pytest.approx([10, 100, 1000])
    assert len(plot["lines"]) == 4 and all(len(line["p99_s"]) == 3 for line in plot["lines"])
    full = next(line for line in plot["lines"] if line["label"].startswith("full"))
    assert full["holistic_hours_per_day"][0] < full["holistic_hours_per_day"][-1]  # more deletions cost more


def test_erase_fields_come_from_the_erase_bench_results(tmp_path):
    from cluster.capacity.commands import erase_accuracy, erase_measurements
    from cluster.capacity.report import Accuracy

    assert erase_measurements(str(tmp_path)) == {}  # nothing measured: placeholders stay
    (tmp_path / "erase_deletion.json").write_text(json.dumps({"machine": "m", "rows": [
        {"N": 1000, "P": 16, "p50_certified_ms": 9.0, "fallback_rate": 0.5, "recluster_s": 1.0},
        {"N": 100000, "P": 1, "p50_certified_ms": 3.0, "fallback_rate": 0.2, "recluster_s": 50.0},
        {"N": 100000, "P": 16, "p50_certified_ms": 2.0, "fallback_rate": 0.01, "recluster_s": 40.0}]}))
    (tmp_path / "holistic.json").write_text(json.dumps({"date": "d", "tasks": [
        {"task": "rotten_tomatoes", "holistic": {"I_s": {"erase": 0.12, "sisa": 0.03}}}]}))
    got = {k: v for k, (v, _src) in erase_measurements(str(tmp_path)).items()}
    assert got == {"erase_certificate_s": 0.002, "erase_fallback_p": 0.01, "erase_recluster_s_per_record": 4e-4,
                   "erase_query_s": 0.12, "erase_fallback_by_leaf": [[62.5, 0.5], [6250.0, 0.01], [100000.0, 0.2]]}
    from cluster.capacity.commands import refresh_erase

    fresh = refresh_erase(PROFILE, erase_measurements(str(tmp_path)))
    assert fresh.erase_query_s == 0.12 and fresh.train_s_per_example == PROFILE.train_s_per_example
    assert fresh.sources["erase_query_s"].startswith("measured: ")
    (tmp_path / "erase_accuracy.json").write_text(json.dumps({"lm": "x", "shots": 8, "tasks": [
        {"task": "rotten_tomatoes", "test": 200, "methods": {"erase": {"accuracy": 0.7}}}]}))
    assert erase_accuracy(str(tmp_path), Accuracy(single=0.75)).erase == 0.7
    (tmp_path / "holistic.json").write_text("{}")
    with pytest.raises(UnlearnError, match=r"holistic\.json: not holistic bench output"):
        erase_measurements(str(tmp_path))


def test_erase_fallback_follows_records_per_partition():
    from cluster.capacity.costs import fallback_probability

    table = Profile(**{**PROFILE.to_json(), "erase_fallback_by_leaf": [[1000, 0.9], [100000, 0.1]]})
    assert fallback_probability(table, 1e6, 1000) == pytest.approx(0.9)  # held below the smallest measured size
    assert fallback_probability(table, 1e7, 10) == pytest.approx(0.1)  # and above the largest
    assert fallback_probability(table, 1e5, 10) == pytest.approx(0.5)  # 10,000: halfway in log(size)
    assert fallback_probability(PROFILE, 1e5, 10) == PROFILE.erase_fallback_p
    w = generate(200 / DAY, 30 * DAY, Pattern(), seed=4)
    small = simulate(w, Config("erase", 0.0, 4, partitions=100), table, 100_000)
    big = simulate(w, Config("erase", 0.0, 4, partitions=1), table, 100_000)
    assert (small.trace.batch_jobs > 0).mean() > 5 * (big.trace.batch_jobs > 0).mean()


def test_replay_rejects_malformed_logs_in_one_line():
    ok = {"request_id": "a", "accepted": "2026-01-01T00:00:00+00:00", "status": "done", "records_deleted": 1,
          "shards": [1], "stages_redone": {"1": [0, 1]}}
    assert from_log({"requests": [ok]}, shape=(2, 2)).recorded.stage.tolist() == [0]
    for entry, msg in [({"request_id": "a"}, "lacks 'request_id' or 'accepted'"),
                       ({**ok, "accepted": "yesterday"}, "'accepted' is not an ISO time"),
                       ({**ok, "records_deleted": "many"}, "is not a count"),
                       ({**ok, "shards": [5], "stages_redone": {"5": [1]}}, "outside 2 shards x 2 slices"),
                       ({**ok, "stages_redone": {}}, "without stages redone")]:
        with pytest.raises(UnlearnError, match=msg):
            from_log({"requests": [entry]}, shape=(2, 2))
    with pytest.raises(UnlearnError, match="expected"):
        from_log({"runs": []})


def test_edge_workloads_found_in_review(tmp_path, capsys):
    """No requests with an SLA; a day never holds more than workers x 24 hours; an explicit
    --accuracy file must exist; a replayed log shorter than a day counts as one day."""
    assert main(["plan", "--rate", "1/day", "--records", "1e4", "--sla", "1d", "--horizon", "1h", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["configs"]
    assert all(r["sla_violations"] == 0 and r["sla_violation_fraction"] == 0.0 for r in rows)
    assert main(["plan", "--rate", "500/day", "--records", "1e6", "--shards", "8", "--workers", "4",
                 "--horizon", "20d", "--json"]) == 0
    for r in json.loads(capsys.readouterr().out)["configs"]:
        assert r["compute_hours_per_day"] <= r["workers"] * 24 + 1e-6, r
    with pytest.raises(UnlearnError, match="--accuracy .*nope.json: no such file"):
        from cluster.capacity.commands import load_accuracy

        load_accuracy(str(tmp_path / "nope.json"))
    log = {"requests": [{"request_id": "0001", "accepted": "2026-11-23T10:00:00+00:00", "status": "pending",
                         "requested": {"ids": 1, "owners": 0}, "records_deleted": 0}]}
    workload = from_log(log)
    assert workload.horizon_s == DAY and any("read as one day" in n for n in workload.notes)


def test_plans_too_large_to_simulate_are_refused(capsys):
    for argv, msg in ((["--rate=1e5/s", "--records", "1e4", "--horizon", "5d"], "at most 1e+07 are simulated"),
                      (["--rate", "1/day", "--records", "1e4", "--slices", "1e3", "--shards", "11"],
                       "more slices than the 10,000 records")):
        rc, _out, err = _plan(capsys, *argv)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_malformed_replay_logs_are_one_line_errors():
    base = {"request_id": "a", "accepted": "2026-11-23T10:00:00+00:00", "status": "pending",
            "requested": {"ids": 1, "owners": 0}}
    for change, msg in (({"request_id": ["x"]}, "'request_id' is not a string"),
                        ({"shards": 3}, "'shards' is not a list"),
                        ({"records_deleted": -5}, "is not a count")):
        with pytest.raises(UnlearnError, match=msg):
            from_log({"requests": [{**base, **change}]})
    with pytest.raises(UnlearnError, match="'a' appears twice"):
        from_log({"requests": [base, dict(base)]})
