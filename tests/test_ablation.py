"""experiments/ablation.py's measured ablation: each method's pick chosen in a selection session of
its own pool per seed and judged in a fresh confirm session only."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import pytest

from graphs.problem import Candidate
from placer.runtime.timing import Measurement

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

WARM, A, B, C, D, E = (Candidate((0, 0)), Candidate((0, 1)), Candidate((1, 0)), Candidate((1, 1)),
                       Candidate((0, 1), 2), Candidate((1, 0), 2))
# medians (ms) in each session: C looks fastest in selection (one lucky trial) but is not in confirm
MEDIANS = {"selection": {WARM: 120.0, A: 100.0, B: 90.0, C: 80.0, D: 95.0, E: 85.0, None: 150.0},
           "confirm": {WARM: 120.0, A: 100.0, B: 90.0, C: 90.0, E: 85.0, None: 150.0}}
AGAIN = {}  # medians of the second confirm session that differ from the first's


@pytest.fixture(scope="module")
def ablation():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENTS))  # the script imports its sibling _record
        yield importlib.import_module("ablation")


@pytest.fixture(scope="module")
def ablation_report(ablation):
    return importlib.import_module("ablation_report")  # on sys.path while `ablation` is


class FakeMeasurer:
    """Measurer.session with fixed step times per session, recording what it was asked."""

    sessions: list[tuple[str, float, list]] = []

    def __init__(self, workload, problem, book, protocol):
        self.protocol = protocol

    def session(self, entries, stage):
        kind, *number = stage.split(":")[0].split()  # "selection rl/0: NAME", "confirm 2: NAME"
        FakeMeasurer.sessions.append((kind, self.protocol.cap_s, [c for _, c in entries]))
        medians = {**MEDIANS[kind], **(AGAIN if number == ["2"] else {})}
        return {label: Measurement(True, medians[c], times_ms=[medians[c]] * 5, runs=5) for label, c in entries}


def run_row(*candidates, chosen=None):
    """A run's row: its `top` and its choice (`chosen`, else its first candidate, else the warm start)."""
    choice = chosen or (candidates[0] if candidates else WARM)
    return {"top": [[list(c.placement), c.microbatches, 10.0 + i] for i, c in enumerate(candidates)],
            "candidate": [list(choice.placement), choice.microbatches]}


def test_distinct_labels_each_candidate_once_and_keeps_every_owner_s_list(ablation):
    candidates, owners = ablation.distinct({"rl/0": [A, B], "local_search/0": [Candidate((0, 1)), WARM],
                                            "random_search/0": [Candidate((0, 1), 2), B]})
    assert candidates == {"rl/0#0": A, "rl/0#1": B, "local_search/0#1": WARM, "random_search/0#0": D}
    assert owners == {"rl/0": ["rl/0#0", "rl/0#1"], "local_search/0": ["rl/0#0", "local_search/0#1"],
                      "random_search/0": ["random_search/0#0", "rl/0#1"]}


def test_a_pick_is_the_lowest_feasible_median_or_none(ablation):
    measured = {"a": Measurement(True, 5.0, times_ms=[5.0] * 5), "b": Measurement(True, 4.0, times_ms=[4.0] * 5),
                "c": Measurement(False, reason="memory")}
    assert ablation.pick(["a", "b", "c"], measured, warm="a") == "b"  # the warm start measurably slower
    assert ablation.pick(["a", "b", "c"], measured, warm="w") == "b"
    assert ablation.pick(["c"], measured, warm="c") is None


def test_a_pick_that_ties_the_warm_start_is_the_warm_start(ablation):
    """As placer.choose keeps the simpler plan of a tie: the 5-step selection of 2026-12-02 picked
    local_search's 370.4 ms over the warm start's 370.6, and confirmed them at 393.9 and 412.0 ms."""
    noisy = [300.0, 340.0, 370.0, 400.0, 440.0]
    measured = {"warm": Measurement(True, 370.6, times_ms=[t + 0.6 for t in noisy]),
                "search": Measurement(True, 370.4, times_ms=[t + 0.4 for t in noisy])}
    assert ablation.pick(["search", "warm"], measured, warm="warm") == "warm"
    measured["search"] = Measurement(True, 300.0, times_ms=[300.0, 301.0, 299.0, 300.5, 299.5])
    measured["warm"] = Measurement(True, 370.0, times_ms=[369.0, 371.0, 370.0, 370.5, 369.5])
    assert ablation.pick(["search", "warm"], measured, warm="warm") == "search"


def test_the_measured_ablation_selects_per_method_and_seed_and_judges_on_a_fresh_session(ablation, ablation_report,
                                                                                         monkeypatch):
    monkeypatch.setattr(ablation, "Measurer", FakeMeasurer)
    monkeypatch.setattr(ablation, "load_workload", lambda spec: spec)
    FakeMeasurer.sessions = []
    entry = {"name": "fake", "workload": "fake.py", "problem": None, "warm_start": {"candidate": [[0, 0], 1]},
             "runs": {"rl": [run_row(A, B), run_row(C, D)], "local_search": [run_row(A, WARM), run_row(E, WARM)],
                      "random_search": [run_row(B), run_row(WARM)]}}
    ablation.measure(entry, argparse.Namespace(cap_s=7.0, confirm_cap_s=9.0, measure_top_k=2, seeds=2, confirms=2))
    *selections, (kind2, cap2, confirmed), (kind3, cap3, again) = FakeMeasurer.sessions
    # selection: a session per method and seed, of unplaced and that run's pool (its top, its choice, the warm start)
    assert [(kind, cap) for kind, cap, _ in selections] == [("selection", 7.0)] * 6
    assert [selected for _, _, selected in selections] == [[None, A, B, WARM], [None, C, D, WARM], [None, A, WARM],
                                                           [None, E, WARM], [None, B, WARM], [None, WARM]]
    # confirm: unplaced, the warm start and each owner's fastest (D, slower than C for rl/1, is not there)
    assert (kind2, cap2) == ("confirm", 9.0) and confirmed[0] is None and set(confirmed[1:]) == {WARM, A, B, C, E}
    assert len(confirmed) == 6
    # a second confirm session of the same, in the reverse order (A B B A), unplaced first in both
    assert (kind3, cap3) == ("confirm", 9.0) and again == [None, *confirmed[:0:-1]]
    picks = {owner: entry["measured"]["candidates"][label] for owner, label in entry["measured"]["picks"].items()}
    assert picks == {"warm_start": [[0, 0], 1], "rl/0": [[1, 0], 1], "rl/1": [[1, 1], 1],
                     "local_search/0": [[0, 1], 1], "local_search/1": [[1, 0], 2],
                     "random_search/0": [[1, 0], 1], "random_search/1": [[0, 0], 1]}
    versus_local, versus_random = entry["rl_vs"]["local_search"], entry["rl_vs"]["random_search"]
    assert versus_local[0]["verdict"] == "faster" and versus_local[0]["speedup"] == pytest.approx(100 / 90)
    # seed 1: C beat E in selection (80 against 85 ms), but the confirm session's 90 against 85 ms is the verdict
    assert versus_local[1]["verdict"] == "slower" and versus_local[1]["speedup"] == pytest.approx(85 / 90)
    assert versus_random[0] == {"speedup": 1.0, "ci": None, "verdict": "same candidate"}
    assert versus_random[1]["verdict"] == "faster"
    table = "\n".join(ablation_report.measured_lines({"methods": ["rl", "local_search", "random_search"],
                                               "problems": [entry]}))
    assert "| fake | 150.0/150.0 | 120.0/120.0 | 90.0/90.0, 90.0/90.0 | 100.0/100.0, 85.0/85.0 |" in table
    assert "same candidate" in table and "0.944x (0.944-0.944) slower [slower, slower]" in table


def test_a_verdict_needs_every_confirm_session(ablation, ablation_report, monkeypatch):
    """A difference one confirm session sees and the other does not is a tie: RL's C ran 90 ms against
    local_search's E at 85 in the first session and 80 against 85 in the second."""
    monkeypatch.setattr(ablation, "Measurer", FakeMeasurer)
    monkeypatch.setattr(ablation, "load_workload", lambda spec: spec)
    monkeypatch.setitem(AGAIN, C, 80.0)
    entry = {"name": "fake", "workload": "fake.py", "problem": None, "warm_start": {"candidate": [[0, 0], 1]},
             "runs": {"rl": [run_row(C)], "local_search": [run_row(E)]}}
    ablation.measure(entry, argparse.Namespace(cap_s=7.0, confirm_cap_s=9.0, measure_top_k=1, seeds=1, confirms=2))
    (ratio,) = entry["rl_vs"]["local_search"]
    assert [s["verdict"] for s in ratio["sessions"]] == ["slower", "faster"] and ratio["verdict"] == "tie"
    assert ratio["ci"] == pytest.approx([85 / 90, 85 / 80])
    assert ratio["speedup"] == pytest.approx((85 / 90 * 85 / 80) ** 0.5)
    table = "\n".join(ablation_report.measured_lines({"methods": ["rl", "local_search"], "problems": [entry]}))
    assert "| fake | 150.0/150.0 | 120.0/120.0 | 90.0/80.0 | 85.0/85.0 |" in table
    assert "tie [slower, faster]" in table



def test_every_method_s_pool_holds_the_warm_start_once(ablation):
    entry = {"warm_start": {"candidate": [[0, 0], 1]},
             "runs": {"rl": [run_row(A, WARM)], "local_search": [run_row(E, A)], "random_search": [run_row()],
                      "rl_lr0": [run_row(A, chosen=C)]}}  # a choice outside the top: the best it measured
    assert ablation.pools(entry) == {"warm_start": [WARM], "rl/0": [A, WARM], "local_search/0": [E, A, WARM],
                                     "random_search/0": [WARM], "rl_lr0/0": [A, C, WARM]}
    candidates, owners = ablation.distinct(ablation.pools(entry))
    assert list(candidates.values()).count(WARM) == 1 and all(len(set(listed)) == len(listed) for listed in
                                                             owners.values())


def test_a_method_whose_candidates_all_measure_slower_confirms_the_warm_start(ablation, monkeypatch):
    monkeypatch.setattr(ablation, "Measurer", FakeMeasurer)
    monkeypatch.setattr(ablation, "load_workload", lambda spec: spec)
    monkeypatch.setitem(MEDIANS["selection"], WARM, 70.0)  # faster, measured, than every search's candidate
    monkeypatch.setitem(MEDIANS["confirm"], WARM, 70.0)
    FakeMeasurer.sessions = []
    entry = {"name": "fake", "workload": "fake.py", "problem": None, "warm_start": {"candidate": [[0, 0], 1]},
             "runs": {"rl": [run_row(A, B)], "local_search": [run_row(C)], "random_search": [run_row(E)]}}
    ablation.measure(entry, argparse.Namespace(cap_s=7.0, confirm_cap_s=9.0, measure_top_k=2, seeds=1, confirms=2))
    labels = entry["measured"]["picks"]
    assert {owner: entry["measured"]["candidates"][label] for owner, label in labels.items()} == {
        owner: [[0, 0], 1] for owner in ("warm_start", "rl/0", "local_search/0", "random_search/0")}
    assert entry["rl_vs"]["local_search"] == [{"speedup": 1.0, "ci": None, "verdict": "same candidate"}]


def test_the_simulator_s_optimism_is_read_per_method_against_the_warm_start(ablation_report):
    """A shortlist that ran 10% slower than simulated, where the warm start ran as simulated: +0.095 (log 1.1);
    one that ran 10% slower in a session where the warm start did too: +0.000."""
    shortlists = {"warm_start": ["warm_start#0"], "rl/0": ["rl/0#0", "warm_start#0"],
                  "local_search/0": ["local_search/0#0", "warm_start#0"]}
    selection = {"rl/0": {"warm_start#0": 100.0, "rl/0#0": 55.0},
                 "local_search/0": {"warm_start#0": 110.0, "local_search/0#0": 88.0}}
    entry = {"name": "fake", "warm_start": {"candidate": [[0, 0], 1], "ms": 100.0},
             "runs": {"rl": [{"top": [[[0, 1], 2, 50.0]]}], "local_search": [{"top": [[[1, 0], 1, 80.0]]}]},
             "measured": {"candidates": {"warm_start#0": [[0, 0], 1], "rl/0#0": [[0, 1], 2],
                                         "local_search/0#0": [[1, 0], 1]},
                          "shortlists": shortlists, "picks": {"warm_start": "warm_start#0"},
                          "selection": {owner: {label: {"median_ms": ms, "feasible": True}
                                                for label, ms in session.items()}
                                        for owner, session in selection.items()}}}
    table = ablation_report.optimism_lines({"methods": ["rl", "local_search"], "problems": [entry]})
    assert table[-1] == "| fake | +0.095 | +0.000 |"
    assert ablation_report.optimism_lines({"methods": ["rl"], "problems": [{"name": "simulated only"}]}) == []


@pytest.fixture(scope="module")
def ablation_pool(ablation):
    return importlib.import_module("ablation_pool")  # on sys.path while `ablation` is


def test_doctests(ablation, ablation_report, ablation_pool):
    import doctest

    for module in (ablation, ablation_report, ablation_pool):
        result = doctest.testmod(module)
        assert result.attempted and not result.failed, module.__name__


def test_the_pool_judges_each_problem_over_its_seeds_and_sessions(ablation_pool, tmp_path, monkeypatch):
    """Two runs of one problem pool into one verdict per yardstick; a seed's sessions are averaged, the same
    candidate counts as an exact tie, and a lucky seed does not make a problem faster."""
    def verdict(*sessions: float) -> dict:
        return {"speedup": sessions[0], "ci": [0.9, 1.1], "verdict": "tie",
                "sessions": [{"speedup": s} for s in sessions]}
    same = {"speedup": 1.0, "ci": None, "verdict": "same candidate"}
    runs = {"a": {"seeds": [0, 1], "rl_vs": {"local_search": [verdict(1.04, 1.06), verdict(1.05, 1.05)],
                                             "random_search": [verdict(1.20, 1.20), same]}},
            "b": {"seeds": [2], "rl_vs": {"local_search": [verdict(1.03, 1.07)], "random_search": [same]}}}
    for name, run in runs.items():
        problems = [{"name": "p", "rl_vs": run["rl_vs"]}]
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"host": {"date": "2026-12-04"}, "seeds": run["seeds"], "problems": problems}))
    monkeypatch.setattr(ablation_pool, "RESULTS", tmp_path)
    monkeypatch.setattr(ablation_pool, "record", lambda name, data, md: (tmp_path / "out.json").write_text(
        json.dumps(data)))
    monkeypatch.setattr(sys, "argv", ["ablation_pool.py", "--runs", "a", "b", "--name", "out"])
    ablation_pool.main()
    pooled = {p["vs"]: p for p in json.loads((tmp_path / "out.json").read_text())["pooled"]}
    assert pooled["local_search"]["seeds"] == 3 and pooled["local_search"]["verdict"] == "faster"
    assert pooled["local_search"]["speedup"] == pytest.approx(math.exp(sum(
        math.log(a * b) / 2 for a, b in [(1.04, 1.06), (1.05, 1.05), (1.03, 1.07)]) / 3))
    assert pooled["random_search"]["verdict"] == "tie"  # 1.2x on one seed, the same plan on two
    assert [s["seed"] for s in pooled["random_search"]["per_seed"]] == [0, 1, 2]


@pytest.mark.parametrize("argv, says", [(["--confirms", "0"], "--confirms 0: give at least 1"),
                                        (["--reconfirm", "no/such.json"], "--reconfirm no/such.json: no such file")])
def test_a_refused_argument_is_one_line_before_any_work(ablation, monkeypatch, capsys, argv, says):
    monkeypatch.setattr(sys, "argv", ["ablation.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        ablation.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip().splitlines()[-1].startswith(f"ablation.py: error: {says}")


def test_the_interleaved_start_is_the_best_of_the_heuristics_and_rl_s_interleaved_starts(ablation):
    from graphs.devices import parse_cluster
    from graphs.problem import PlacementProblem
    from placer.rl.starts import interleaved_candidates
    from placer.search.scorer import SimulatedScorer
    from tests.test_pipeline import chain

    # a chain of 24 equal groups on 4 devices, micro-batches nearly free: interleaved stages shorten the bubble
    graph = chain([{"cpu": 1.0}] * 24, table={1: 10.0, 2: 10.5, 4: 11.0})
    problem = PlacementProblem(graph, parse_cluster("cpu:0,cpu:1,cpu:2,cpu:3"))
    scorer = SimulatedScorer(problem)
    plain = ablation.warm_start(problem, scorer)
    name, candidate, ms = ablation.warm_start(problem, scorer, interleaved=True)
    starts = interleaved_candidates(problem, (1, 2, 4))
    assert plain[0] == "pipeline" and name == "interleaved"
    assert candidate in starts and ms == min(scorer.score(starts)) < plain[2]
