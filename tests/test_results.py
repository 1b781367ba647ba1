"""placer.results: the typed results artifact and its JSON (schema placer.results/v1)."""

import json
import math

import pytest

from graphs.errors import PlacerError
from placer.results import SCHEMA, Choice, MethodResult, Ratio, Results, environment, strict, write_json


def sample() -> Results:
    ratio = Ratio(1.25, (1.1, 1.4), "faster", "unplaced")
    return Results(
        command="optimize", run_id="r1", workload="zoo:nmt:small", devices=["cpu:0", "cpu:1"],
        memory={"cpu:0": None, "cpu:1": 2**30}, seed=3, budget_s=10.0, reward="sim",
        protocol={"target": 0.03, "min_runs": 5, "cap_s": 60.0},
        bounds={"critical_path_ms": 1.0, "work_ms": 2.0, "lower_bound_ms": 2.0}, environment=environment("test"),
        methods=[MethodResult("unplaced", "unplaced", measured_ms=10.0, ci_ms=(9.0, 11.0), runs=7, session="confirm",
                              devices=["cpu"]),
                 MethodResult("rl", "rl", measured_ms=8.0, ci_ms=(7.5, 8.5), runs=9, session="confirm",
                              placement=[0, 1, 1], devices=["cpu:0", "cpu:1"], microbatches=2, schedule="gpipe",
                              simulated_ms=math.inf, vs_unplaced=ratio, notes=["n"]),
                 MethodResult("expert", feasible=False, reason="too big", simulated_ms=float("nan"))],
        choice=Choice("rl", "faster", "RL is faster.", contender="rl", session="confirm", shortlist=["unplaced", "rl"],
                      vs_unplaced=ratio),
        plan="plan.json", curve=[{"update": 1, "best_sim_ms": math.inf}], recalibrations=[{"update": 1}],
        notes=["a note"])


def test_results_round_trip_through_strict_json(tmp_path):
    results = sample()
    path = results.save(tmp_path / "results.json")
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    loaded = Results.load(path)
    data = json.loads(text)
    assert data["schema"] == SCHEMA and data["best"] == "rl" and data["interrupted"] is False
    assert loaded.row("rl").simulated_ms is None and loaded.row("expert").simulated_ms is None  # inf, nan -> null
    assert loaded.curve == [{"update": 1, "best_sim_ms": None}]
    expected = sample()
    expected.row("rl").simulated_ms = expected.row("expert").simulated_ms = None
    expected.curve = [{"update": 1, "best_sim_ms": None}]
    assert loaded.to_json() == expected.to_json()
    assert loaded.best == "rl" and loaded.unplaced.method == "unplaced" and loaded.best_heuristic is None
    assert loaded.row("rl").vs_unplaced == Ratio(1.25, (1.1, 1.4), "faster", "unplaced")


def test_every_row_has_the_documented_keys():
    row = sample().to_json()["methods"][1]
    for key in ("method", "kind", "feasible", "measured_ms", "ci_ms", "runs", "simulated_ms", "placement",
                "microbatches", "schedule", "iqr_ms", "session", "vs_unplaced", "vs_best_heuristic", "peak_bytes"):
        assert key in row
    assert row["ci_ms"] == [7.5, 8.5] and row["vs_unplaced"]["ci"] == [1.1, 1.4]


def test_load_says_what_is_wrong_in_one_line(tmp_path):
    with pytest.raises(PlacerError, match="no such results file"):
        Results.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(PlacerError, match="not a readable results file"):
        Results.load(bad)
    bad.write_text("[]")
    with pytest.raises(PlacerError, match="not a placer results file"):
        Results.load(bad)
    bad.write_text(json.dumps({"schema": "placer.results/v9", "methods": []}))
    with pytest.raises(PlacerError, match="upgrade placer"):
        Results.load(bad)


def test_unversioned_results_are_read():
    old = {"workload": "w", "best": "rl", "interrupted": True, "methods": [
        {"method": "single", "measured_ms": 5.0, "iqr_ms": 1.0}, {"method": "rl", "measured_ms": 4.0}]}
    results = Results.from_json(old)
    assert results.status == "interrupted" and results.best == "rl" and results.choice.verdict == "unconfirmed"
    assert [r.kind for r in results.methods] == ["baseline", "rl"] and results.best_heuristic.method == "single"


def test_strict_turns_numpy_and_non_finite_values_into_json():
    import numpy as np
    assert strict({"a": np.float32(1.5), "b": (1, np.int64(2)), "c": float("inf"), 3: [float("nan")]}) == \
        {"a": 1.5, "b": [1, 2], "c": None, "3": [None]}


def test_write_json_follows_the_umask(tmp_path):
    import os
    import stat
    mask = os.umask(0o027)
    try:
        path = write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_ratio_describes_ties_plainly():
    assert Ratio(1.0, (0.97, 1.03), "tie", "unplaced").describe() == "1.00x (tie, CI 0.97-1.03)"
    assert Ratio(1.2, (1.1, 1.3), "faster", "unplaced").describe() == "1.20x (CI 1.10-1.30)"


def test_a_ratio_over_an_unmeasured_reference_keeps_its_verdict_and_says_no_verdict():
    ratio = Ratio(5.37, (2.68, 28.57), "unmeasured", "unplaced")
    assert Ratio.from_json(json.loads(json.dumps(ratio.to_json()))) == ratio
    assert ratio.describe() == "5.37x (no verdict, CI 2.68-28.57)"
    choice = Choice(None, "unmeasured", "No verdict: ...", contender="single", session="confirm")
    assert Choice.from_json(json.loads(json.dumps(choice.to_json()))) == choice


def test_a_rows_busy_host_reading_round_trips():
    # placer.choose rule 7 reads it from results.json too (placer report re-renders the "no verdict" note from it).
    row = MethodResult("unplaced", "unplaced", measured_ms=806.0, busy={"load": 3.8, "cores": 2, "own": 0.9})
    assert MethodResult.from_json(row.to_json()).busy == {"load": 3.8, "cores": 2, "own": 0.9}
    assert MethodResult.from_json(MethodResult("rl", "rl").to_json()).busy is None
    damaged = {**row.to_json(), "busy": {}}  # a hand-edited results.json: no reading, not a busy host
    assert MethodResult.from_json(damaged).busy is None
