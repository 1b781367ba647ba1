"""experiments/fidelity.py: the candidates it draws, the one-session and sessions designs
(with a fake measurer), its scoring (the noise ceiling, the sessions' anchors, the
session share of the error, the near-optimal subset) and scoring recorded measurements
again (`--rescore`) with the current simulator, on a synthetic problem whose true
calibration is known."""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path

import numpy as np
import pytest

from envs.sim import Calibration, Simulator
from graphs.devices import Link, parse_cluster
from graphs.problem import PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.rl.starts import interleaved_candidates
from placer.runtime.stats import Measurement, median_ci
from placer.search.config import microbatch_options

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


def test_candidates_span_fractions_near_optimal_and_crossing_heavy_plans(fidelity):
    """The fraction splits give the first device each share of the compute (within one
    group's), contiguously; near-optimal and crossing-heavy candidates are among them."""
    problem = synthetic()
    chosen = fidelity.candidates(problem, 24, np.random.default_rng(0))
    assert len(set(c for _, c in chosen)) == 24
    assert {"baseline", "fraction", "near", "crossing", "random"} <= {kind for kind, _ in chosen} <= set(fidelity.KINDS)
    compute = problem.costs.compute_ms[:, 0]
    shares = []
    for placement in (np.array(c.placement) for kind, c in chosen if kind == "fraction"):
        assert np.all(np.diff(placement) >= 0)  # device 0's groups, then device 1's
        shares.append(compute[placement == 0].sum() / compute.sum())
    assert np.allclose(sorted(shares), fidelity.FRACTIONS, atol=compute.max() / compute.sum())
    problem.groups.graph["microbatch_step_ms"] = {1: 10.0, 2: 12.0, 4: 16.0}  # a profile that pipelines
    more = fidelity.candidates(problem, 24, np.random.default_rng(0), pipelined=6)  # and six pipelined ones more
    assert len(more) == 30 and sum(kind == "pipelined" for kind, _ in more[24:]) == 6
    assert all(c.microbatches in (2, 4) for kind, c in more if kind == "pipelined")
    # and interleaved stages, RL's first-round starts, then plans near them, each at its own count
    stages = interleaved_candidates(problem, microbatch_options(problem))
    inter = fidelity.candidates(problem, 24, np.random.default_rng(0), interleaved=len(stages) + 3)
    added = [c for kind, c in inter[24:] if kind == "interleaved"]
    assert len(inter) == 24 + len(stages) + 3 and len(added) == len(stages) + 3
    assert set(stages) - {c for _, c in inter[:24]} <= set(added) and all(c.microbatches > 1 for c in added)


def test_the_near_optimal_subset_is_the_judged_rows_within_near_of_the_fastest(fidelity):
    rows = [{"measured_ms": ms, "calibrated_ms": ms * 1.01, "ci_ms": [ms - 1, ms + 1]}
            for ms in (100.0, 104.0, 108.0, 109.0, 150.0, 200.0)]
    near = fidelity.near_optimal(rows[1:], best_ms=100.0)  # the fastest itself was in the fit third
    assert near["judged"] == 3 and near["spearman"] == pytest.approx(1.0)


class FakeMeasurer:
    """Measures every candidate at the true calibration's simulated time (CI +-1%),
    recording each session's labels and time cap."""

    sessions: list[tuple[list[str], float]] = []

    def __init__(self, workload, problem, book, protocol):
        self.truth, self.cap_s = Simulator(problem, TRUTH), protocol.cap_s

    def session(self, entries, stage):
        FakeMeasurer.sessions.append(([label for label, _ in entries], self.cap_s))
        times = {label: self.truth.simulate(c.placement, c.microbatches).step_ms for label, c in entries}
        return {label: Measurement(True, ms, ci_ms=(0.99 * ms, 1.01 * ms)) for label, ms in times.items()}


@pytest.mark.parametrize("design, sessions, cap_s", [("one", [12], 6.0), ("sessions", [6, 6, 6], 2.0)])
def test_one_session_measures_every_candidate_together_in_the_sessions_time(fidelity, monkeypatch, design,
                                                                             sessions, cap_s):
    """--design one: a single session of all 12 candidates, without anchors, capped at
    the three sessions' time it replaces; --design sessions: three of four and two anchors."""
    problem = synthetic()
    monkeypatch.setattr(fidelity, "build_problem", lambda spec, devices, max_groups: problem)
    monkeypatch.setattr(fidelity, "load_workload", lambda spec: None)
    monkeypatch.setattr(fidelity, "microbatches_off", lambda workload, problem: None)
    monkeypatch.setattr(fidelity, "Measurer", FakeMeasurer)
    monkeypatch.setattr(FakeMeasurer, "sessions", [])
    args = argparse.Namespace(size="small", devices="cpu:0,cpu:1", max_groups=256, seed=0, placements=12, session=4,
                              pipelined=0, interleaved=0, target=0.03, cap_s=2.0, warmup=1, design=design, save=False,
                              estimate="median")
    model = fidelity.evaluate_model("mlp", args)
    assert [len(labels) for labels, _ in FakeMeasurer.sessions] == sessions
    assert {cap for _, cap in FakeMeasurer.sessions} == {cap_s}
    assert len({r["session"] for r in model["rows"]}) == len(sessions)
    assert model["after"]["spearman"] > 0.9 and model["near_optimal"]["judged"] >= 1


def test_rescoring_can_scale_by_the_first_anchor_alone(fidelity, monkeypatch):
    problem = synthetic()
    monkeypatch.setattr(fidelity, "build_problem", lambda spec, devices, max_groups: problem)
    rows = recorded_rows(problem, [0.0, 0.0, 0.0])
    for r in rows:  # recorded scaled by some other anchor; raw is twice as slow in session 1
        r.update(raw_ms=r["measured_ms"] * (2.0 if r["session"] == 1 else 1.0), raw_ci_ms=None)
        r["measured_ms"] *= 1.5
    results = {"host": {"date": "then"}, "devices": "cpu:0,cpu:1", "session": 4, "target": 0.03, "cap_s": 15.0,
               "models": [{"workload": "synthetic", "groups": problem.n_groups, "placements": 12,
                           "anchor_ms": [10.0, 20.0, 10.0], "rows": rows}]}
    [model] = fidelity.rescore(results, "first")["models"]
    truth = Simulator(problem, TRUTH)
    assert all(r["measured_ms"] == pytest.approx(truth.simulate(r["placement"]).step_ms) for r in model["rows"])
    assert fidelity.rescore(results, "none")["models"][0]["rows"][4]["measured_ms"] == pytest.approx(rows[4]["raw_ms"])


def test_the_blocked_estimate_takes_the_hosts_drift_between_rounds_out(fidelity):
    """Ten candidates 1% apart, timed in 15 rounds whose speed wanders by +-20% (one
    factor for the whole round) with 0.5% noise of each step: the blocked estimates keep
    their order and ratios, with CIs narrower than the 1% between them; the CI of a
    plain median holds the drift."""
    rng = np.random.default_rng(0)
    true_ms = 100.0 * 1.01 ** np.arange(10)
    drift = np.exp(rng.uniform(-0.2, 0.2, 15))
    times = true_ms[:, None] * drift[None, :] * np.exp(rng.normal(0.0, 0.005, (10, 15)))
    rows = [{"feasible": True, "session": 0, "times_ms": list(t)} for t in times]
    fidelity.blocked(rows)
    measured = np.array([r["measured_ms"] for r in rows])
    assert fidelity.spearman(measured, true_ms) == pytest.approx(1.0)
    assert np.allclose(measured[1:] / measured[:-1], 1.01, atol=0.005)
    assert all(r["ci_ms"][0] <= r["measured_ms"] <= r["ci_ms"][1] < 1.01 * r["ci_ms"][0] for r in rows)
    low, high = median_ci(times[0])
    assert high > 1.05 * low


def test_rescoring_blocked_needs_the_runs_steps(fidelity, monkeypatch):
    problem = synthetic()
    monkeypatch.setattr(fidelity, "build_problem", lambda spec, devices, max_groups: problem)
    results = {"host": {"date": "then"}, "devices": "cpu:0,cpu:1", "design": "one", "models": [
        {"workload": "synthetic", "rows": recorded_rows(problem, [0.0, 0.0, 0.0])}]}
    with pytest.raises(ValueError, match="kept no timed steps"):
        fidelity.rescore(results, estimate="blocked")
    with pytest.raises(ValueError, match="sessions design"):
        fidelity.rescore({**results, "design": "sessions"}, estimate="blocked")
    rng = np.random.default_rng(1)
    for r in results["models"][0]["rows"]:
        r["times_ms"] = list(r["measured_ms"] * np.exp(rng.normal(0.0, 0.001, 9)))
    [model] = fidelity.rescore(results, estimate="blocked")["models"]
    assert model["after"]["spearman"] > 0.9
