"""placer.choose: the honest final choice. A plan wins only when measurably faster;
ties go to the simpler plan, and unplaced wins every tie."""

from dataclasses import replace

import pytest

from placer.choose import (agreed, confirm, fill, pick, plan_key, settle_ratios, share_measurements, simplicity,
                           unmeasured, verdict_choice)
from placer.measurements import Protocol, compare
from placer.results import Choice, MethodResult, Ratio, Results
from placer.runtime.host_load import busy_note
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


def test_a_plan_whose_cut_edges_are_unknown_is_not_the_simplest_of_equals():
    r = rows()  # a hand-edited plan that splits a profiled group has no placement (placer compare)
    edited = MethodResult("edited.json", placement=None, devices=["cpu:0", "cpu:1"])
    assert simplicity(r["expert"]) < simplicity(edited)


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
    assert choice.headline.startswith("Expert is measurably faster than the model run without placer")
    assert choice.headline.endswith("(RL, which the final session picked, is 0.75x (CI 0.75-0.75) the best heuristic "
                                    "(expert) in the confirm session, so expert was judged in its place.)")


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


def judged_twice(crosscheck: dict[str, Measurement], last: dict[str, Measurement] | None):
    """confirm() over two fake sessions, each filling unplaced, expert (the best heuristic)
    and rl (the winner) from its dict: (the choice, the rows, the (session, reverse) calls)."""
    r, calls = rows(), []
    del r["single"]

    def measure(session, reverse):
        calls.append((session, reverse))
        measured = {"crosscheck": crosscheck, "confirm": last}[session]
        fill(r["unplaced"], measured["unplaced"], session, None, None, 10.0)
        fill(r["expert"], measured["expert"], session, measured["unplaced"], None, 10.0, Protocol())
        fill(r["rl"], measured["rl"], session, measured["unplaced"], ("expert", measured["expert"]), 10.0, Protocol())
        return [r["expert"], r["rl"]]

    choice = confirm(r["rl"], r["expert"], Results(methods=list(r.values())), measure, ["unplaced", "rl"], "cpu",
                     protocol=Protocol())
    return choice, r, calls


def test_a_plan_faster_in_one_confirm_session_only_is_no_verdict_and_unplaced_wins():
    # s22's nmt pick: 0.960x against random search's in one session, 1.216x in both of the next day's.
    faster = {"unplaced": around(100.0), "expert": around(99.0), "rl": around(90.0)}
    level = {"unplaced": around(100.0), "expert": around(99.0), "rl": around(100.0, 0.05)}
    choice, r, calls = judged_twice(faster, level)
    assert calls == [("crosscheck", True), ("confirm", False)]  # the crosscheck in reverse order, then the confirm
    assert r["rl"].session == "confirm" and r["rl"].measured_ms == pytest.approx(100.0)
    assert r["rl"].vs_unplaced.verdict == "tie" and r["rl"].vs_unplaced.earlier[0].verdict == "faster"
    assert choice.method == "unplaced" and choice.verdict == "tie" and choice.contender == "rl"
    assert "the session before: 1.11x" in choice.headline
    choice, r, _ = judged_twice(level, faster)  # the other way round: the same verdict
    assert choice.method == "unplaced" and r["rl"].vs_unplaced.verdict == "tie"


def test_a_plan_faster_in_both_confirm_sessions_is_chosen_with_both_speedups():
    choice, r, _ = judged_twice({"unplaced": around(100.0), "expert": around(99.0), "rl": around(80.0)},
                                {"unplaced": around(100.0), "expert": around(99.0), "rl": around(90.0)})
    assert choice.method == "rl" and choice.verdict == "faster" and choice.session == "confirm"
    assert choice.vs_unplaced.value == pytest.approx(100 / 90) and choice.vs_unplaced.verdict == "faster"
    assert [e.value for e in choice.vs_unplaced.earlier] == [pytest.approx(100 / 80)]
    assert "1.11x (CI 1.11-1.12; the session before: 1.25x, CI 1.24-1.26) unplaced;" in choice.headline
    assert choice.vs_best_heuristic.verdict == "faster" and len(choice.vs_best_heuristic.earlier) == 1


def test_a_winner_gives_way_to_the_heuristic_only_where_both_sessions_find_it_slower():
    slower = {"unplaced": around(100.0), "expert": around(60.0), "rl": around(80.0)}
    level = {"unplaced": around(100.0), "expert": around(80.0), "rl": around(80.0, 0.05)}
    choice, _, _ = judged_twice(slower, slower)
    assert choice.method == "expert" and "in the crosscheck and confirm sessions, so expert was judged" in \
        choice.headline
    choice, r, _ = judged_twice(slower, level)
    assert choice.method == "rl" and r["rl"].vs_best_heuristic.verdict == "tie"


def test_an_unplaced_no_reference_in_the_crosscheck_session_decides_there():
    busy = {"unplaced": summarize(WIDE), "expert": around(60.0), "rl": around(50.0)}
    choice, r, calls = judged_twice(busy, None)
    assert calls == [("crosscheck", True)]  # no confirm session: nothing to confirm
    assert choice.verdict == "unmeasured" and choice.method is None and choice.contender == "rl"
    assert "in the crosscheck session" in choice.headline and r["rl"].vs_unplaced.verdict == "unmeasured"
    choice, _, _ = judged_twice({**busy, "rl": around(80.0)}, None)  # rule 4 there names the one session held
    assert choice.contender == "expert" and "the best heuristic (expert) in the crosscheck session, so" in \
        choice.headline and "confirm session" not in choice.headline


def test_agreed_keeps_the_last_sessions_times_and_every_earlier_ratio():
    first, second = compare(around(80.0), around(100.0), "unplaced"), compare(around(90.0), around(100.0), "unplaced")
    both = agreed(first, second)
    assert (both.value, both.ci, both.verdict) == (second.value, second.ci, "faster") and both.earlier == (first,)
    assert agreed(None, second).verdict == "tie"  # the plan did not run in the session before: no agreement
    assert agreed(first, None) is None
    slower = compare(around(110.0), around(100.0), "unplaced")
    assert agreed(first, slower).verdict == "tie"
    assert agreed(replace(first, verdict="unmeasured"), second).verdict == "unmeasured"
    assert Ratio.from_json(both.to_json()) == both and "earlier" not in first.to_json()


WIDE = [20.0, 450.0, 40.0, 440.0, 80.0] * 6  # a busy host: median 80 ms, its CI far wider than +-3%


def test_the_tie_break_keeps_a_plan_faster_than_unplaced_when_the_fastest_is():
    r = rows()  # expert ties both rl (the fastest) and unplaced; rl is measurably faster than unplaced
    measured = {"unplaced": around(100.0, 0.02), "expert": around(98.0, 0.1), "rl": around(96.0, 0.02)}
    assert compare(measured["rl"], measured["unplaced"], "unplaced").verdict == "faster"
    assert compare(measured["expert"], measured["rl"], "rl").verdict == "tie"
    assert compare(measured["expert"], measured["unplaced"], "unplaced").verdict == "tie"
    assert pick(list(r.values()), measured).method == "rl"  # not the simpler expert
    without_unplaced = {k: v for k, v in measured.items() if k != "unplaced"}
    assert pick(list(r.values()), without_unplaced).method == "expert"  # no reference: simplicity decides


def test_an_unplaced_too_wide_to_measure_is_no_candidate_in_the_pick():
    r = rows()
    measured = {"unplaced": summarize(WIDE), "expert": around(90.0, 0.02), "rl": around(70.0, 0.02)}
    assert pick(list(r.values()), measured, protocol=Protocol()).method == "rl"
    assert pick(list(r.values()), measured).method == "unplaced"  # without the target it ties everything
    assert pick([r["unplaced"]], {"unplaced": summarize(WIDE)}, protocol=Protocol()).method == "unplaced"  # alone


def test_ratios_over_an_unplaced_too_wide_to_measure_are_no_verdict():
    r = rows()
    wide = summarize(WIDE)
    fill(r["unplaced"], wide, "baselines", None, None, 10.0)
    fill(r["rl"], around(15.0), "baselines", wide, None, 10.0, protocol=Protocol())
    assert r["rl"].vs_unplaced.verdict == "unmeasured" and "no verdict" in r["rl"].vs_unplaced.describe()
    fill(r["expert"], around(15.0), "baselines", wide, None, 10.0)  # no protocol: judged as before
    assert r["expert"].vs_unplaced.verdict in ("faster", "tie", "slower")
    reason = unmeasured(r["unplaced"], Protocol())
    assert reason.startswith("unplaced could not be measured in the baselines session") and "10x" in reason
    # No busy host is blamed: the session's own reading found the host otherwise idle (placer.runtime.host_load).
    assert "with the host otherwise idle" in reason and "busy" not in reason
    assert unmeasured(r["unplaced"], None) is None and unmeasured(judged(80.0, 100.0)["unplaced"], Protocol()) is None
    fill(r["unplaced"], summarize(WIDE[:5]), "baselines", None, None, 10.0)  # cut at min_runs: no precision asked
    assert unmeasured(r["unplaced"], Protocol(min_runs=5)) is None
    assert unmeasured(r["unplaced"], Protocol(min_runs=4)) is not None


def test_no_plan_is_chosen_against_an_unplaced_too_wide_to_measure():
    r = rows()
    wide = summarize(WIDE)
    fill(r["unplaced"], wide, "baselines", None, None, 10.0)
    fill(r["single"], around(15.0), "baselines", wide, None, 10.0, protocol=Protocol())
    stopped = verdict_choice(r["single"], r["unplaced"], "baselines", [], "cpu", confirmed=False, protocol=Protocol())
    assert stopped.method is None and stopped.verdict == "unmeasured" and stopped.contender == "single"
    assert stopped.headline.startswith("Interrupted before the final measurements, and unplaced could not be")
    assert "no plan.json is written" in stopped.headline and "--resume to continue" in stopped.headline
    fill(r["unplaced"], wide, "confirm", None, None, 10.0)
    final = verdict_choice(r["single"], r["unplaced"], "confirm", [], "cpu", protocol=Protocol())
    assert final.method is None and final.verdict == "unmeasured" and final.headline.startswith("No verdict: ")
    assert "Measure on an idle host" in final.headline and "--resume" in final.headline
    assert "faster" not in final.headline
    compared = verdict_choice(r["single"], r["unplaced"], "confirm", [], "cpu", writes_plan=False, protocol=Protocol())
    assert compared.method is None and "plan.json" not in compared.headline
    assert verdict_choice(r["single"], r["unplaced"], "confirm", [], "cpu").verdict != "unmeasured"  # no protocol


def test_rows_of_one_plan_carry_the_measurement_of_its_latest_session():
    devices = ["cpu:0", "cpu:1"]
    balanced = MethodResult("balanced", placement=[0, 0, 1, 1], devices=devices)
    kernighan = MethodResult("kernighan_lin", placement=[0, 0, 1, 1], devices=devices)
    piped = MethodResult("pipeline", placement=[0, 0, 1, 1], devices=devices, microbatches=4)
    sct = MethodResult("sct", placement=[0, 1, 0, 1], devices=devices)
    rl = MethodResult("rl", "rl", placement=[0, 1, 0, 1], devices=devices)
    early, late = around(100.0), around(90.0)
    for row in (balanced, kernighan, piped, sct, rl):
        fill(row, around(70.0), "baselines", early, None, 10.0)
    fill(balanced, around(85.0), "final", late, None, 10.0)
    fill(rl, around(95.0), "final", late, None, 10.0)
    fill(sct, around(88.0), "confirm", around(88.0), None, 10.0)
    share_measurements([balanced, kernighan, piped, sct, rl])
    assert kernighan.session == "final" and kernighan.measured_ms == balanced.measured_ms == pytest.approx(85.0)
    assert kernighan.vs_unplaced == balanced.vs_unplaced and kernighan.vs_unplaced.verdict == "faster"
    assert rl.session == "confirm" and rl.measured_ms == pytest.approx(88.0) and rl.vs_unplaced.verdict == "tie"
    assert piped.session == "baselines" and piped.measured_ms == pytest.approx(70.0)  # micro-batches: another plan
    assert plan_key(balanced) == plan_key(kernighan) != plan_key(piped)


BUSY = {"load": 3.8, "cores": 2}


def busy(ms: float) -> Measurement:
    """An unplaced measurement timed on a busy host (placer.runtime.host_load.busy_host found load 3.8 on 2 cores)."""
    m = around(ms)
    m.busy = dict(BUSY)
    return m


def test_an_unplaced_timed_on_a_busy_host_is_no_reference_and_no_plan_is_chosen_against_it():
    # Trial 2 item 1: unplaced (intra-op threads on every core) 806 ms on a loaded host beside a one-core plan's
    # 11.5 ms read "70x measurably faster": a thread effect of that minute. Rule 7: no verdict, no plan.
    r = rows()
    slow = busy(806.0)
    measured = {"unplaced": slow, "single": around(11.5), "rl": around(12.0)}
    assert pick(list(r.values()), measured).method == "single"  # unplaced is no candidate and no reference
    fill(r["unplaced"], slow, "confirm", None, None, 10.0)
    fill(r["single"], around(11.5), "confirm", slow, None, 10.0, protocol=Protocol())
    assert r["unplaced"].busy == BUSY and r["single"].vs_unplaced.verdict == "unmeasured"
    fill(r["expert"], around(11.5), "confirm", slow, None, 10.0)  # no protocol: still no verdict (rule 7 needs none)
    assert r["expert"].vs_unplaced.verdict == "unmeasured"
    choice = verdict_choice(r["single"], r["unplaced"], "confirm", [], "cpu", protocol=Protocol())
    assert choice.method is None and choice.verdict == "unmeasured" and choice.contender == "single"
    assert choice.headline.startswith("No verdict: the host was busy (load 3.8 on 2 cores) while unplaced was timed "
                                      "in the confirm session (806.00 ms)")
    assert "no plan.json is written" in choice.headline and "Measure on an idle host, then" in choice.headline
    assert "--resume: it measures unplaced and the final sessions afresh" in choice.headline
    assert "faster" not in choice.headline
    fill(r["unplaced"], around(100.0), "confirm", None, None, 10.0)  # measured again on an idle host
    assert r["unplaced"].busy is None and unmeasured(r["unplaced"], Protocol()) is None


def test_the_headline_names_the_cores_other_processes_held_while_unplaced_was_timed():
    # The direct reading (placer.runtime.host_load.ContentionMeter): others' CPU time over unplaced's own steps.
    r = rows()
    slow = around(806.0)
    slow.busy = {"others": 1.62, "cores": 2, "steps": 30}
    fill(r["unplaced"], slow, "confirm", None, None, 10.0)
    fill(r["single"], around(11.5), "confirm", slow, None, 10.0, protocol=Protocol())
    choice = verdict_choice(r["single"], r["unplaced"], "confirm", [], "cpu", protocol=Protocol())
    assert choice.method is None and choice.verdict == "unmeasured"
    assert choice.headline.startswith("No verdict: other processes held 1.6 of the 2 cores while unplaced was timed "
                                      "in the confirm session (806.00 ms)")
    assert "load" not in choice.headline and "faster" not in choice.headline


def test_a_row_measured_afresh_drops_the_busy_note_of_its_earlier_session():
    # The new-user trial: a resumed run's fresh, idle confirm session still carried the first run's busy note.
    r = rows()
    stale = busy(806.0)
    stale.notes = [busy_note("unplaced", stale.busy), "unplaced: a note of the model's own"]
    fill(r["unplaced"], stale, "baselines", None, None, 10.0)
    assert busy_note("unplaced", BUSY) in r["unplaced"].notes
    fill(r["unplaced"], around(100.0), "confirm", None, None, 10.0)
    assert r["unplaced"].busy is None and r["unplaced"].notes == ["unplaced: a note of the model's own"]


def test_only_rows_of_unplaceds_last_session_keep_their_ratios():
    # Trial 2 item 3: ratios of another session compare with an unplaced median shown nowhere.
    r = confirmed(80.0, 90.0)
    fill(r["single"], around(30.0), "final", around(100.0), ("expert", around(90.0)), 10.0)
    results = Results(methods=list(r.values()), choice=Choice("rl", "faster"))
    settle_ratios(results)
    assert r["single"].vs_unplaced is None and r["single"].vs_best_heuristic is None
    assert r["rl"].vs_unplaced.verdict == "faster" and r["rl"].vs_best_heuristic is not None
    results.choice = Choice(None, "unmeasured")  # no verdict: no ratio over unplaced has one either
    settle_ratios(results)
    assert r["rl"].vs_unplaced.verdict == "unmeasured" and r["expert"].vs_unplaced.verdict == "unmeasured"


def test_a_winning_heuristic_is_not_called_the_best_heuristic_beside_another():
    # Trial 2 item 9: single device (itself a heuristic, and the faster) was "1.04x the best heuristic (METIS)".
    r = rows()
    unplaced, metis = around(100.0), around(60.0)
    fill(r["unplaced"], unplaced, "confirm", None, None, 10.0)
    fill(r["single"], around(50.0), "confirm", unplaced, ("metis", metis), 10.0)
    choice = verdict_choice(r["single"], r["unplaced"], "confirm", [], "cpu")
    assert choice.method == "single" and "the best heuristic" not in choice.headline
    assert "METIS, the heuristic measured fastest before the final session" in choice.headline
