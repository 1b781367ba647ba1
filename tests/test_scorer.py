"""placer.scorer: what a search is given. Scores come from the calibrated simulator,
measurements from the protocol's book, and each refit and best measurement is
stamped onto the learning curve where it happened."""

import math
from contextlib import contextmanager
from dataclasses import replace

import pytest

from envs.sim import Calibration, Simulator
from graphs.devices import parse_cluster
from graphs.problem import Candidate, PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.book import MeasurementBook
from placer.runtime.timing import Measurement, summarize
from placer.scorer import Scorer


class FakeMeasurer:
    """Measures by the simulator (`truth`, default the nominal one) times a factor (the
    'real' machine is slower), or infeasible for placements on device 1 only; keeps
    what it measured in a book (`measure`), or not (`session`, kept in `sessions`)."""

    def __init__(self, problem: PlacementProblem, factor: float = 1.5, truth: Simulator | None = None):
        self.problem, self.factor, self.book, self.calls, self.limits = problem, factor, MeasurementBook({}), [], []
        self.sessions = []
        self.sim = truth or Simulator(problem)

    @contextmanager
    def limited(self, limit_s):
        self.limits.append(limit_s)
        yield

    def measurement(self, c: Candidate) -> Measurement:
        if set(c.placement) == {1}:
            return Measurement(False, reason="cpu:1 is too small")
        ms = self.sim.simulate(c.placement, c.microbatches).step_ms * self.factor
        return summarize([ms * 0.99, ms, ms * 1.01])

    def measure(self, candidates, labels=None, stage=""):
        self.calls.append(list(candidates))
        results = [self.measurement(c) for c in candidates]
        for c, m in zip(candidates, results):
            self.book.record(c, m)
        return results

    def session(self, entries, stage=""):
        self.sessions.append([c for _, c in entries])
        return {label: self.measurement(c) for label, c in entries}


@pytest.fixture
def problem() -> PlacementProblem:
    return PlacementProblem(random_grouped_graph(10, seed=1), parse_cluster("cpu:0,cpu:1", "cpu:1=1GiB"))


def placements(problem, k):
    return [tuple((i >> g) & 1 for g in range(problem.n_groups)) for i in range(k)]


def test_score_is_the_simulators_step_time_and_inf_when_infeasible(problem):
    scorer = Scorer(problem, FakeMeasurer(problem))
    sim = Simulator(problem)
    too_big = PlacementProblem(problem.groups, parse_cluster("cpu:0,cpu:1", "cpu:0=1B,cpu:1=1B"))
    batch = placements(problem, 4)
    assert scorer.score(batch) == [sim.simulate(p).step_ms for p in batch]
    assert scorer.score([Candidate(p) for p in batch]) == scorer.score(batch)  # candidates or bare placements
    assert Scorer(too_big, FakeMeasurer(too_big)).score(batch[:1]) == [math.inf]


def test_measure_returns_medians_and_none_for_infeasible(problem):
    measurer = FakeMeasurer(problem)
    scorer = Scorer(problem, measurer)
    ones = tuple([1] * problem.n_groups)
    zeros = tuple([0] * problem.n_groups)
    result = scorer.measure([zeros, ones], limit_s=7.0)
    assert result[0] == pytest.approx(Simulator(problem).simulate(zeros).step_ms * 1.5) and result[1] is None
    assert measurer.calls == [[Candidate(zeros), Candidate(ones)]]
    assert measurer.limits == [7.0]  # the search's time left limits the session


def test_reward_measure_scores_by_measurement_within_the_searchs_budget(problem):
    measurer = FakeMeasurer(problem)
    scorer = Scorer(problem, measurer, reward="measure")
    ones = tuple([1] * problem.n_groups)
    assert scorer.score([ones]) == [math.inf]
    scorer.begin(budget_s=30.0)
    scorer.score([ones])
    assert measurer.limits[0] is None and 29.0 < measurer.limits[1] <= 30.0  # the session ends with the budget
    with pytest.raises(ValueError, match="unknown reward"):
        Scorer(problem, FakeMeasurer(problem), reward="guess")


def test_refit_recalibrates_from_the_book_and_marks_the_curve(problem):
    scorer = Scorer(problem, FakeMeasurer(problem, factor=2.0), warn=lambda text: None)
    batch = placements(problem, 5)
    before = scorer.score(batch)
    scorer.refit()  # nothing measured yet: nothing to fit
    assert scorer.refits == [] and scorer.score(batch) == before
    row = scorer.on_round({"update": 1, "samples": 16, "elapsed_s": 1.0, "best_measured_ms": None})
    assert row["calibration"] == 0 and row["best_measured_ci_ms"] is None
    scorer.measure(batch[:3])
    scorer.refit()
    after = scorer.score(batch)
    assert all(a > b for a, b in zip(after, before))  # the real machine is slower: the fit says so
    row = scorer.on_round({"update": 2, "samples": 32, "elapsed_s": 2.0})
    assert row["calibration"] == 1 and len(row["best_measured_ci_ms"]) == 2
    assert scorer.refits == [{"measurements": 3, "update": 2, "samples": 32, "elapsed_s": 2.0}]
    assert scorer.best_measured[0]["update"] == 2  # stamped with the round it happened in


def test_refit_fits_pipelined_measurements_too(problem):
    """Measured on a 'real' machine whose micro-batches run slower than profiled (envs.sim),
    pipelined candidates alone are enough to refit, and the refitted simulator reproduces them."""
    truth = Simulator(problem, replace(Calibration.default(problem.cluster), pipelined_slowdown=0.3))
    measurer = FakeMeasurer(problem, truth=truth)
    scorer = Scorer(problem, measurer, warn=lambda text: None)
    batch = [Candidate(p, 2) for p in placements(problem, 40)[::8]]
    measured = scorer.measure(batch)
    scorer.refit()
    assert scorer.refits[0]["measurements"] == len(batch)
    assert scorer.simulator.calibration.pipelined_slowdown > 0
    assert scorer.score(batch) == pytest.approx(measured, rel=0.03)
