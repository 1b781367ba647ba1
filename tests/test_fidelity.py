"""experiments/fidelity.py's scoring: the noise ceiling, the sessions' anchors, the session
share of the error, and scoring recorded measurements again (`--rescore`) with the
current simulator on a synthetic problem whose true calibration is known."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest

from envs.sim import Calibration, Simulator
from graphs.devices import Link, parse_cluster
from graphs.problem import PlacementProblem
from graphs.synthetic import random_grouped_graph

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TRUTH = Calibration({"cpu": 1.3}, {"cpu": Link(0.5e-3, 1e9)}, chunk_overhead_ms=0.2)


@pytest.fixture(scope="module")
def fidelity():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENTS))  # the script imports its sibling _record
        yield importlib.import_module("fidelity")


def rows_with_noise(true_ms: np.ndarray, sd: float, seed: int = 0) -> list[dict]:
    measured = true_ms + np.random.default_rng(seed).normal(0.0, sd, len(true_ms))
    return [{"measured_ms": float(m), "ci_ms": [float(m - 1.96 * sd), float(m + 1.96 * sd)]} for m in measured]


def test_the_noise_ceiling_counts_the_noise_once(fidelity):
    """Twenty candidates of one true time measured with 5 ms of noise: no simulator can
    rank them (re-drawing around the noisy medians gave about 0.7). Times spread 50 ms
    apart: ranked almost surely."""
    assert fidelity.noise_ceiling(rows_with_noise(np.full(20, 100.0), 5.0)) < 0.3
    assert fidelity.noise_ceiling(rows_with_noise(np.arange(20) * 50.0 + 100.0, 5.0)) > 0.95


def test_a_session_is_scaled_by_its_anchor_to_the_median_of_the_anchors(fidelity):
    anchors = [100.0, 120.0, math.nan, 110.0]
    assert fidelity.session_scale(anchors, 1) == pytest.approx(110.0 / 120.0)
    assert fidelity.session_scale(anchors, 2) == 1.0  # its anchor was not measured
    assert fidelity.session_scale([math.nan, math.nan], 0) == 1.0


def synthetic() -> PlacementProblem:
    return PlacementProblem(random_grouped_graph(30, seed=3), parse_cluster("cpu:0,cpu:1"))


def recorded_rows(problem: PlacementProblem, session_error: list[float]) -> list[dict]:
    """Twelve measured rows in three sessions of four, timed by the true calibration
    times exp(session_error[session]); a third of them marked for the fit."""
    rng = np.random.default_rng(0)
    truth = Simulator(problem, TRUTH)
    rows = []
    for i in range(12):
        placement = rng.integers(0, 2, problem.n_groups).tolist()
        ms = truth.simulate(placement).step_ms * math.exp(session_error[i // 4])
        rows.append({"kind": "random", "placement": placement, "microbatches": 1, "session": i // 4,
                     "feasible": True, "measured_ms": ms, "ci_ms": [ms * 0.99, ms * 1.01], "fit": i % 3 == 0,
                     "simulated_ms": 1.0})
    return rows


def test_scoring_fits_on_the_fit_third_and_judges_the_rest(fidelity):
    problem = synthetic()
    rows = recorded_rows(problem, [0.0, 0.0, 0.0])
    scores = fidelity.score(problem, rows)
    assert (scores["fit_on"], scores["evaluated_on"], scores["measured"]) == (4, 8, 12)
    assert scores["after"]["median_abs_error"] < 0.02 < scores["before"]["median_abs_error"]
    assert scores["after"]["spearman"] > 0.9
    assert all(r["calibrated_ms"] > 0 and r["simulated_ms"] > 1.0 for r in rows)


def test_an_error_that_follows_the_sessions_shows_in_the_session_share(fidelity):
    problem = synthetic()
    rows = recorded_rows(problem, [0.0, 0.2, -0.2])
    for r in rows:
        r["calibrated_ms"] = Simulator(problem, TRUTH).simulate(r["placement"]).step_ms
    assert fidelity.diagnose(problem, rows)["session_share"] == pytest.approx(1.0)


def test_rescoring_keeps_the_measurements_and_the_split(fidelity, monkeypatch):
    problem = synthetic()
    monkeypatch.setattr(fidelity, "build_problem", lambda spec, devices, max_groups: problem)
    rows = recorded_rows(problem, [0.0, 0.0, 0.0])
    results = {"host": {"date": "then"}, "devices": "cpu:0,cpu:1", "session": 4, "target": 0.03, "cap_s": 15.0,
               "models": [{"workload": "synthetic", "groups": problem.n_groups, "placements": 12, "anchor_ms": [1.0],
                           "rows": rows}]}
    again = fidelity.rescore(results)
    [model] = again["models"]
    assert [r["measured_ms"] for r in model["rows"]] == [r["measured_ms"] for r in rows]
    assert [bool(r.get("fit")) for r in model["rows"]] == [bool(r.get("fit")) for r in rows]
    assert all(r["recorded_simulated_ms"] == 1.0 for r in model["rows"])  # what the run's simulator said
    assert model["after"]["median_abs_error"] < 0.02 and again["rescored"]
    assert "Scored again" in fidelity.markdown(again)
