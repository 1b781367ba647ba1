"""placer.measurements: the interleaved protocol (on a fake clock: no test depends on
how fast this host is), the comparison of two measurements, the persistent book and
the unplaced model's device."""

import doctest
import json
from collections import Counter

import pytest
import torch

from graphs.devices import parse_cluster
from graphs.problem import Candidate, PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.book import BOOK_FORMAT, MeasurementBook, candidate_key, key_candidate
from placer.measurements import (UNPLACED, Measurer, Protocol, compare, run_session, unplaced_device, unplaced_problem,
                                 williams_order)
from placer.plan import Plan
from placer.runtime.timing import Measurement, PlacedTrial, Trial, summarize


class FakeClock:
    """Seconds that pass only when a fake step says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Scripted(Trial):
    """A trial whose steps take the given milliseconds (cycled) on the fake clock, and
    note their label in `log` as they run; a None duration runs out of memory."""

    def __init__(self, label, durations_ms, clock, log, **kwargs):
        super().__init__(label, warmup=1, clock=clock, **kwargs)
        self.durations, self.log, self.calls = list(durations_ms), log, 0

    def _build(self):
        def step():
            ms = self.durations[self.calls % len(self.durations)]
            self.calls += 1
            if ms is None:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            self.clock.now += ms / 1e3
            self.log.append(self.label)
            return torch.tensor(1.0)
        return step, []


def session(durations: dict, protocol: Protocol, limit_s=None, **kwargs):
    clock, log = FakeClock(), []
    trials = [Scripted(label, ms, clock, log, **kwargs) for label, ms in durations.items()]
    results = run_session(trials, protocol, clock, limit_s=limit_s)
    return dict(zip(durations, results)), log[len(durations):]  # the log without the warm-up steps


def test_candidates_are_interleaved_so_that_each_runs_after_each_other_equally_often():
    """Rounds follow a Williams design: with three candidates, six rounds in which each
    runs right after each other twice and holds each position twice; two alternate."""
    noisy = [10.0, 30.0]  # never settles: the CI of alternating 10/30 stays wide
    results, log = session({"A": noisy, "B": noisy, "C": noisy}, Protocol(min_runs=2, max_runs=6, cap_s=1e9))
    rounds = ["".join(log[i:i + 3]) for i in range(0, 18, 3)]
    assert all(sorted(r) == list("ABC") for r in rounds)
    after = Counter(a + b for r in rounds for a, b in zip(r, r[1:]))
    assert set(after) == {"AB", "AC", "BA", "BC", "CA", "CB"} and set(after.values()) == {2}
    assert all(Counter(r[i] for r in rounds) == Counter("AABBCC") for i in range(3))
    assert all(m.runs == 6 and m.feasible for m in results.values())
    assert session({"A": noisy, "B": noisy}, Protocol(min_runs=2, max_runs=4, cap_s=1e9))[1] == list("ABBAABBA")
    assert [williams_order(n, r) for n in (0, 1) for r in (0, 1)] == [[], [], [0], [0]]


def test_doctests():
    import placer.measurements

    result = doctest.testmod(placer.measurements)
    assert result.attempted >= 1 and result.failed == 0


def test_a_pause_comes_before_every_timed_step(monkeypatch):
    """Also where a candidate follows itself (at a round's seam): every step starts from
    an idle host, whatever the session's size; none with pause_ms 0."""
    import placer.measurements as measurements

    pauses = []
    monkeypatch.setattr(measurements.time, "sleep", pauses.append)
    _, log = session({"A": [10.0, 30.0], "B": [10.0, 30.0]}, Protocol(min_runs=2, max_runs=4, cap_s=1e9, pause_ms=5))
    assert log == list("ABBAABBA") and pauses == [0.005] * 8
    pauses.clear()
    session({"A": [10.0], "B": [10.0]}, Protocol(min_runs=2, max_runs=4, cap_s=1e9, pause_ms=0))
    assert pauses == []
    with pytest.raises(ValueError, match="pause_ms"):
        Protocol(pause_ms=-1.0)


def test_a_settled_candidate_keeps_its_place_in_the_rounds_until_every_one_is_settled():
    # Back to back, the unsettled one would run faster than alternating (trial 9): none runs alone.
    results, log = session({"steady": [20.0], "noisy": [10.0, 40.0, 25.0]},
                           Protocol(target=0.03, min_runs=5, max_runs=30, cap_s=1e9))
    steady, noisy = results["steady"], results["noisy"]
    assert steady.ci_ms == pytest.approx((20.0, 20.0)) and steady.ci_halfwidth < 1e-9
    assert noisy.runs == 30 and noisy.ci_halfwidth > 0.03  # max_runs reached without meeting the target
    assert steady.runs == 30 and log == ["steady", "noisy", "noisy", "steady"] * 15
    results, log = session({"a": [20.0], "b": [30.0]}, Protocol(target=0.03, min_runs=5, max_runs=30, cap_s=1e9))
    assert [m.runs for m in results.values()] == [5, 5]  # all settled: the session ends


def test_the_time_cap_stops_a_session_but_only_after_min_runs():
    # Steps of 1 s and 3 s in turn (the warm-up takes the first 1 s), a cap of 3 s: every
    # candidate still gets its 4 timed steps first.
    results, _ = session({"A": [1000.0, 3000.0], "B": [1000.0, 3000.0]}, Protocol(min_runs=4, max_runs=100, cap_s=3.0))
    assert [m.runs for m in results.values()] == [4, 4]
    results, _ = session({"A": [1000.0, 3000.0]}, Protocol(min_runs=2, max_runs=100, cap_s=10.0))
    assert results["A"].runs == 5  # the first round past 10 s ends it: 3 + 1 + 3 + 1 + 3 = 11 s
    # A cap per candidate: two candidates at 5 s each get a 10 s session.
    per = Protocol(min_runs=2, max_runs=100, cap_s=1.0, cap_per_candidate_s=5.0)
    assert per.session_cap_s(2) == 10.0
    results, _ = session({"A": [1000.0, 3000.0], "B": [1000.0, 3000.0]}, per)
    assert [m.runs for m in results.values()] == [3, 3]  # rounds of 6, 2, 6 s: past 10 s after the third


def test_a_session_limit_counts_from_the_opening_and_stops_only_after_min_runs():
    # Steps of 1 s and 3 s in turn; opening warms each up with one 1 s step (2 s), then rounds of
    # 6 s and 2 s: both have min_runs = 2 steps at 10 s. The cap alone would allow 100 steps.
    slow = {"A": [1000.0, 3000.0], "B": [1000.0, 3000.0]}
    protocol = Protocol(min_runs=2, max_runs=100, cap_s=1e9)
    for limit_s, runs in ((3.0, 2), (0.0, 2), (-5.0, 2), (12.0, 3), (16.0, 3), (17.0, 4)):  # 16 s: a round ends there
        results, _ = session(slow, protocol, limit_s)
        assert [m.runs for m in results.values()] == [runs, runs], limit_s
    assert [m.runs for m in session(slow, protocol)[0].values()] == [100, 100]


def test_a_measurer_limits_the_sessions_started_in_its_limited_block():
    problem = PlacementProblem(random_grouped_graph(6, seed=3), parse_cluster("cpu:0,cpu:1"))
    clock = FakeClock()
    measurer = Measurer(None, problem, MeasurementBook({}), Protocol(min_runs=2, max_runs=50, cap_s=1e9), clock=clock)
    measurer.trial = lambda candidate, label: Scripted(label, [1000.0, 3000.0], clock, [])
    first, second = Candidate((0,) * problem.n_groups), Candidate((1,) * problem.n_groups)
    with measurer.limited(3.0):
        (limited,) = measurer.measure([first])
    (unlimited,) = measurer.measure([second])
    assert limited.runs == 2 and unlimited.runs == 50 and measurer.limit_s is None


def test_a_candidate_that_fails_is_infeasible_and_the_others_are_measured():
    results, log = session({"ok": [5.0], "oom": [5.0, 5.0, None]}, Protocol(min_runs=3, max_runs=3, cap_s=1e9))
    assert results["ok"].feasible and results["ok"].runs == 3
    assert not results["oom"].feasible and results["oom"].reason.startswith("out of memory")
    assert results["oom"].times_ms == pytest.approx([5.0])  # what was timed before it failed
    assert log.count("ok") == 3


def test_a_step_past_the_time_limit_names_the_limit_and_the_option():
    results, _ = session({"slow": [200_000.0]}, Protocol(min_runs=2, max_runs=2, cap_s=1e9), step_timeout_s=120.0)
    reason = results["slow"].reason
    assert not results["slow"].feasible and "120 s limit" in reason and "--step-timeout" in reason


def test_protocol_refuses_settings_it_cannot_honour():
    for bad in (dict(target=0.0), dict(target=float("nan")), dict(cap_s=float("inf")), dict(min_runs=0),
                dict(min_runs=5, max_runs=4), dict(warmup=0), dict(confidence=1.0)):
        with pytest.raises(ValueError):
            Protocol(**bad)


def test_compare_gives_a_ratio_with_an_interval_and_calls_ties():
    fast = summarize([10.0 + 0.1 * (i % 5) for i in range(30)])
    slow = summarize([20.0 + 0.2 * (i % 5) for i in range(30)])
    same = summarize([10.0 + 0.1 * ((i + 2) % 5) for i in range(30)])
    ratio = compare(fast, slow, "slow")
    assert ratio.value == pytest.approx(2.0) and ratio.ci[0] <= ratio.value <= ratio.ci[1]
    assert ratio.verdict == "faster" and ratio.reference == "slow"
    assert compare(slow, fast, "fast").verdict == "slower"
    assert compare(fast, same, "same").verdict == "tie"
    assert compare(fast, slow, "slow") == ratio  # seeded: the same times give the same interval
    assert compare(Measurement(feasible=False, reason="x"), slow, "slow") is None


def test_measurements_of_one_session_are_compared_round_by_round():
    """B is 3% slower than A in every round, and the host's speed wanders by +-20% from
    round to round: paired by their session, the ratio's interval is narrow and says
    faster; the same steps from two sessions tie. A session gives every measurement one
    id, and the book keeps it."""
    drift = [1.0 + 0.2 * ((7 * i) % 11 - 5) / 5 for i in range(20)]
    a, b = [10.0 * d for d in drift], [10.3 * d for d in drift]
    paired = compare(Measurement(**vars(summarize(a)) | {"session": "s"}),
                     Measurement(**vars(summarize(b)) | {"session": "s"}), "B")
    assert paired.value == pytest.approx(1.03) and paired.verdict == "faster"
    assert paired.ci[1] - paired.ci[0] < 0.01
    apart = compare(Measurement(**vars(summarize(a)) | {"session": "s"}),
                    Measurement(**vars(summarize(b)) | {"session": "t"}), "B")
    assert apart.value == pytest.approx(1.03) and apart.verdict == "tie"
    results, _ = session({"A": [10.0], "B": [12.0]}, Protocol(min_runs=2, max_runs=3, cap_s=1e9))
    assert results["A"].session and results["A"].session == results["B"].session
    assert Measurement.from_json(results["A"].to_json()).session == results["A"].session
    assert Measurement.from_json(summarize([1.0]).to_json()).session is None


def test_candidate_keys_round_trip():
    for candidate in (Candidate((0, 1, 1)), Candidate((1, 0), microbatches=4), None):
        assert key_candidate(candidate_key(candidate)) == candidate
    assert candidate_key((0, 1)) == "0,1" and candidate_key(None) == UNPLACED


IDENTITY = {"workload": "zoo:x", "devices": ["cpu:0", "cpu:1"], "memory": [None, None], "fingerprint": "f"}


def test_the_book_saves_as_it_goes_and_keeps_other_identities(tmp_path):
    path = tmp_path / "measurements.json"
    other = MeasurementBook({**IDENTITY, "devices": ["cpu:0", "cpu:1", "cpu:2"]}, path)
    other.record(Candidate((0, 1, 2)), summarize([5.0, 6.0]))
    book = MeasurementBook(IDENTITY, path)
    assert book.get((0, 1, 2)) is None  # another identity's measurements are not ours...
    book.record(Candidate((0, 1, 1)), summarize([7.0, 8.0, 9.0]))
    book.record(None, summarize([6.0]))
    book.record((1, 1, 1), Measurement(feasible=False, reason="cpu:1 needs 9 bytes but has 1"))
    saved = json.loads(path.read_text())
    assert saved["format"] == BOOK_FORMAT and len(saved["books"]) == 2  # ...and are kept, untouched
    again = MeasurementBook(IDENTITY, path)
    assert again.get((0, 1, 1)).median_ms == 8.0 and again.get((0, 1, 1)).ci_ms == (7.0, 9.0)
    assert not again.get((1, 1, 1)).feasible
    assert [(c, m.median_ms) for c, m in again.feasible()] == [(Candidate((0, 1, 1)), 8.0)]  # not unplaced
    assert MeasurementBook(other.identity, path).get((0, 1, 2)).median_ms == 5.5
    assert MeasurementBook.last_identity(path) == IDENTITY


def test_a_damaged_book_entry_is_a_miss_with_one_warning(tmp_path):
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"format": BOOK_FORMAT, "books": [{"identity": IDENTITY, "entries": {
        "0,1": {"feasible": True, "median_ms": 4.0, "times_ms": [4.0]},
        "1,1": {"feasible": True, "iqr_ms": 1.0},  # no median_ms
        "0,0": {"feasible": True, "median_ms": "fast"},
        "1,0": {"feasible": True, "median_ms": float("nan")},
        "x,y": {"feasible": True, "median_ms": 4.0},
    }}]}))
    warnings = []
    book = MeasurementBook(IDENTITY, path, warnings.append)
    assert book.get((0, 1)).median_ms == 4.0 and book.get((1, 1)) is None and book.get((0, 0)) is None
    assert len(warnings) == 1 and str(path) in warnings[0] and "4 damaged" in warnings[0]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": "placer.measurements/v2", "books": 3}'])
def test_an_unreadable_book_is_measured_afresh(tmp_path, content):
    path = tmp_path / "measurements.json"
    path.write_text(content)
    warnings = []
    book = MeasurementBook(IDENTITY, path, warnings.append)
    assert book.entries == {} and len(warnings) <= 1
    book.record((0, 1), summarize([3.0]))  # and it is replaced by a good one
    assert MeasurementBook(IDENTITY, path).get((0, 1)).median_ms == 3.0


def test_a_book_that_cannot_be_saved_warns_once_and_keeps_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    warnings = []
    book = MeasurementBook(IDENTITY, blocker / "measurements.json", warnings.append)
    book.record((0, 1), summarize([3.0]))
    book.record((1, 1), summarize([4.0]))
    assert len(warnings) == 1 and str(blocker / "measurements.json") in warnings[0]
    assert book.get((1, 1)).median_ms == 4.0


def test_unplaced_runs_on_the_whole_host_with_the_cpu_caps_summed():
    problem = PlacementProblem(random_grouped_graph(12, seed=3), parse_cluster("cpu:0,cpu:1", "cpu:0=1GiB,cpu:1=2GiB"))
    assert unplaced_device(problem) == "cpu"
    alone = unplaced_problem(problem)
    assert alone.cluster.names == ["cpu"] and alone.cluster.devices[0].memory_bytes == 3 * 2**30
    assert alone.n_groups == problem.n_groups
    uncapped = PlacementProblem(problem.groups, parse_cluster("cpu:0,cpu:1", "cpu:0=1GiB"))
    assert unplaced_problem(uncapped).cluster.devices[0].memory_bytes is None  # cpu:1 has no cap: the host neither


def test_a_saved_plan_runs_on_its_own_devices_and_only_running_it_judges_it():
    problem = PlacementProblem(random_grouped_graph(12, seed=3), parse_cluster("cpu:0,cpu:1", "cpu:0=1KiB,cpu:1=1KiB"))
    measurer = Measurer(None, problem, MeasurementBook({}), Protocol())
    assert measurer.known_infeasible(Candidate((0,) * problem.n_groups)) is not None  # the problem's caps rule it out
    plan = Plan(devices=["cpu"], assignment={}, device_map={}, fingerprint="f")
    assert measurer.known_infeasible(plan) is None
    trial = measurer.trial(plan, "saved")
    assert isinstance(trial, PlacedTrial) and trial.plan is plan and trial.label == "saved"
    assert trial.cluster.names == ["cpu"] and trial.cluster.devices[0].memory_bytes is None  # not the problem's


def test_a_candidate_the_runtime_refuses_is_an_infeasible_measurement_with_the_refusal(tmp_path):
    from graphs.problem import build_problem
    from graphs.workload import Workload
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    workload = Workload(name="bn", spec="bn", model=model, inputs=(torch.randn(8, 4),),
                        loss_fn=lambda out, x: out.square().mean())
    problem = build_problem(workload, "cpu:0,cpu:1", max_groups=2, cache_dir=str(tmp_path))
    measurer = Measurer(workload, problem, MeasurementBook({}), Protocol(min_runs=1, max_runs=1, warmup=1))
    split, whole = Candidate((0,) * problem.n_groups, microbatches=2), Candidate((0,) * problem.n_groups)
    refused, runs = measurer.measure([split, whole])
    assert not refused.feasible and refused.reason.startswith("refused: ")
    assert "microbatch_statistics" in refused.reason and "BatchNorm1d" in refused.reason
    assert runs.feasible and runs.runs == 1  # the session goes on with the others
    assert measurer.book.get(split) is refused
