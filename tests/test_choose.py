"""placer.choose: the honest final choice. A plan wins only when measurably faster;
ties go to the simpler plan, and unplaced wins every tie."""

import pytest

from placer.choose import fill, pick, simplicity, verdict_choice
from placer.results import MethodResult
from placer.runtime.timing import Measurement, summarize


def around(ms: float, spread: float = 0.01, n: int = 30) -> Measurement:
    """A measurement whose median is `ms`, its steps within +-spread of it."""
    return summarize([ms * (1 + spread * ((i % 5) - 2) / 2) for i in range(n)])


def rows() -> dict[str, MethodResult]:
    return {"unplaced": MethodResult("unplaced", "unplaced", devices=["cpu"]),
            "single": MethodResult("single", placement=[0, 0, 0, 0], devices=["cpu:0", "cpu:1"]),
            "expert": MethodResult("expert", placement=[0, 0, 1, 1], devices=["cpu:0", "cpu:1"]),
            "rl": MethodResult("rl", "rl", placement=[0, 1, 0, 1], devices=["cpu:0", "cpu:1"])}


def test_simpler_plans_sort_first():
    r = rows()
    assert sorted(r.values(), key=simplicity)[0].method == "unplaced"
    assert simplicity(r["single"]) < simplicity(r["expert"]) <= simplicity(r["rl"])
    piped = MethodResult("expert", placement=[0, 0, 1, 1], microbatches=4)
    assert simplicity(r["expert"]) < simplicity(piped)


def test_the_fastest_wins_when_it_is_measurably_faster():
    r = rows()
    measured = {"unplaced": around(100.0), "single": around(98.0), "expert": around(90.0), "rl": around(70.0)}
    assert pick(list(r.values()), measured).method == "rl"


def test_a_tie_goes_to_the_simpler_plan_and_unplaced_wins_every_tie():
    r = rows()
    tied = {"unplaced": around(100.0, 0.2), "single": around(99.0, 0.2), "expert": around(98.0, 0.2),
            "rl": around(97.0, 0.2)}
    assert pick(list(r.values()), tied).method == "unplaced"
    without_unplaced = {k: v for k, v in tied.items() if k != "unplaced"}
    assert pick(list(r.values()), without_unplaced).method == "single"


def test_infeasible_rows_never_win():
    r = rows()
    measured = {"unplaced": Measurement(False, reason="too big"), "rl": Measurement(False, reason="x"),
                "expert": around(50.0), "single": around(60.0)}
    assert pick(list(r.values()), measured).method == "expert"
    assert pick(list(r.values()), {"rl": Measurement(False, reason="x")}) is None


def judged(winner_ms: float, unplaced_ms: float, spread: float = 0.01):
    r = rows()
    unplaced, heuristic = around(unplaced_ms, spread), around(90.0, spread)
    fill(r["unplaced"], unplaced, "confirm", None, None, 10.0)
    fill(r["expert"], heuristic, "confirm", unplaced, None, 10.0)
    fill(r["rl"], around(winner_ms, spread), "confirm", unplaced, ("expert", heuristic), 10.0)
    return r


def test_fill_writes_the_measurement_and_its_speedups_from_one_session():
    r = judged(80.0, 100.0)
    rl = r["rl"]
    assert rl.session == "confirm" and rl.measured_ms == pytest.approx(80.0) and rl.runs == 30
    assert rl.ci_ms[0] <= rl.measured_ms <= rl.ci_ms[1] and rl.ratio_to_lower_bound == pytest.approx(8.0)
    assert rl.vs_unplaced.value == pytest.approx(100 / 80) and rl.vs_unplaced.verdict == "faster"
    assert rl.vs_best_heuristic.value == pytest.approx(90 / 80) and rl.vs_best_heuristic.reference == "expert"
    assert r["unplaced"].vs_unplaced is None and r["expert"].vs_best_heuristic is None


def test_a_winner_measurably_faster_than_unplaced_is_the_choice():
    r = judged(80.0, 100.0)
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", ["unplaced", "rl"], "cpu")
    assert choice.method == "rl" and choice.verdict == "faster" and choice.vs_unplaced.verdict == "faster"
    assert choice.headline.startswith("RL is measurably faster than the model run without placer: 1.25x")
    assert "the best heuristic (expert)" in choice.headline


def test_a_winner_that_ties_with_unplaced_gives_way_and_the_first_line_says_so():
    r = judged(99.0, 100.0, spread=0.2)
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", ["unplaced", "rl"], "cpu")
    assert choice.method == "unplaced" and choice.verdict == "tie" and choice.contender == "rl"
    assert choice.headline.startswith("No plan is measurably faster than the model run without placer")
    assert "plan.json runs everything on cpu" in choice.headline and "(tie, CI" in choice.headline


def test_a_slower_winner_gives_way_too():
    r = judged(150.0, 100.0)
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", [], "cpu")
    assert choice.method == "unplaced" and choice.verdict == "slower"


def test_when_unplaced_cannot_run_the_fastest_plan_is_the_answer():
    r = rows()
    fill(r["unplaced"], Measurement(False, reason="cpu needs 9 GiB but has 1 GiB"), "confirm", None, None, None)
    fill(r["rl"], around(80.0), "confirm", Measurement(False, reason="x"), None, None)
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", [], "cpu")
    assert choice.method == "rl" and choice.verdict == "unplaced infeasible"
    assert "does not run unplaced" in choice.headline


def test_an_interrupted_choice_says_it_is_unconfirmed():
    r = judged(80.0, 100.0)
    choice = verdict_choice(r["rl"], r["unplaced"], "search", [], "cpu", confirmed=False)
    assert choice.method == "rl" and choice.verdict == "unconfirmed" and "unconfirmed" in choice.headline


def confirmed(winner_ms: float, heuristic_ms: float, unplaced_ms: float = 100.0):
    """Rows filled from one confirm session: unplaced, the best heuristic (expert), the winner (rl)."""
    r = rows()
    unplaced, heuristic = around(unplaced_ms), around(heuristic_ms)
    fill(r["unplaced"], unplaced, "confirm", None, None, 10.0)
    fill(r["expert"], heuristic, "confirm", unplaced, None, 10.0)
    fill(r["rl"], around(winner_ms), "confirm", unplaced, ("expert", heuristic), 10.0)
    return r


def test_a_winner_measurably_slower_than_the_best_heuristic_gives_way_to_it():
    r = confirmed(80.0, 60.0)
    assert r["rl"].vs_unplaced.verdict == "faster" and r["rl"].vs_best_heuristic.verdict == "slower"
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", ["unplaced", "rl"], "cpu", heuristic=r["expert"])
    assert choice.method == "expert" and choice.verdict == "faster"
    assert choice.vs_unplaced.value == pytest.approx(100 / 60) and choice.vs_unplaced.verdict == "faster"
    assert choice.headline.startswith("RL, which the final session picked, is 0.75x")
    assert "so expert is judged in its place. Expert is measurably faster than the model run without placer" \
        in choice.headline


def test_the_heuristic_in_the_winners_place_is_judged_against_unplaced_too():
    r = confirmed(101.0, 95.0, unplaced_ms=95.0)  # rl slower than expert, expert ties unplaced
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", ["unplaced", "rl"], "cpu", heuristic=r["expert"])
    assert choice.method == "unplaced" and choice.contender == "expert"
    assert "No plan is measurably faster" in choice.headline


def test_without_the_heuristics_row_the_headline_names_the_faster_plan_first():
    r = confirmed(80.0, 60.0)
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", ["unplaced", "rl"], "cpu")
    assert choice.headline.startswith("RL, which the final session picked, is 0.75x")
    assert ": expert is the faster plan. RL is measurably faster" in choice.headline


def test_a_winner_that_ties_the_best_heuristic_keeps_its_place():
    r = confirmed(80.0, 80.5)
    choice = verdict_choice(r["rl"], r["unplaced"], "confirm", ["unplaced", "rl"], "cpu", heuristic=r["expert"])
    assert choice.method == "rl" and choice.headline.startswith("RL is measurably faster")
