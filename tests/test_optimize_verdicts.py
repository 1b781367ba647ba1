"""placer.optimize's honest numbers (the new-user trial): rows of one plan carry one
measurement, no plan is chosen against an unplaced the host was too busy to measure,
and a run stopped before any choice says what it kept and how to go on."""

import json
from dataclasses import replace

import pytest

import placer.optimize as job
from placer.choose import plan_key
from placer.measurements import Measurer
from placer.runtime.timing import summarize
from tests.test_choose import WIDE
from tests.test_optimize import PROTOCOL, run, workload  # noqa: F401  (fixture)


def test_rows_of_one_plan_show_one_measurement(workload, tmp_path):
    results = run(workload, tmp_path / "out", methods=["single", "sequential_fill", "expert"])
    twins = [(a, b) for i, a in enumerate(results.methods) for b in results.methods[i + 1:]
             if plan_key(a) is not None and plan_key(a) == plan_key(b)]
    assert twins  # single and sequential fill both put everything on cpu:0 (no memory caps)
    for a, b in twins:
        assert (a.session, a.measured_ms, a.ci_ms, a.vs_unplaced) == (b.session, b.measured_ms, b.ci_ms, b.vs_unplaced)
        assert a.session in ("final", "confirm")  # the latest session that measured the plan


def test_no_plan_is_written_against_an_unplaced_too_wide_to_measure(workload, tmp_path, monkeypatch):
    measure = Measurer.measure

    def busy(self, candidates, *args, **kwargs):  # the host was busy while unplaced ran
        measure(self, candidates, *args, **kwargs)
        self.book.record(None, summarize(WIDE))
        return [self.book.get(c) for c in candidates]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Measurer, "measure", busy)
    monkeypatch.setattr(job, "run_search", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("an earlier plan")
    results = run(workload, out, protocol=replace(PROTOCOL, target=0.03))  # a limit of +-30%
    assert results.status == "interrupted" and results.choice.verdict == "unmeasured"
    assert results.best is None and results.choice.contender is not None
    assert "unplaced could not be measured in the baselines session" in results.choice.headline
    assert "--resume" in results.choice.headline
    # Was: the earlier plan.json left as it was; a training loop would apply it unconfirmed (trial 2, item 9).
    assert not (out / "plan.json").exists() and (out / "plan.unconfirmed.json").read_text() == "an earlier plan"
    assert "renamed plan.unconfirmed.json" in results.choice.headline
    assert json.loads((out / "results.json").read_text())["plan"] is None
    placed = [r for r in results.methods if r.kind != "unplaced" and r.measured]
    assert placed and all(r.vs_unplaced.verdict == "unmeasured" for r in placed)


def test_ctrl_c_before_any_choice_says_what_was_kept_and_that_resume_continues(workload, tmp_path, monkeypatch):
    measure = Measurer.measure

    def measured_then_stopped(self, *args, **kwargs):
        measure(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Measurer, "measure", measured_then_stopped)
    said = []
    with pytest.raises(KeyboardInterrupt):
        run(workload, tmp_path / "out", warn=said.append)
    book = tmp_path / "out" / "measurements.json"
    assert book.is_file() and not (tmp_path / "out" / "plan.json").exists()
    assert said[-1].startswith("stopped before any plan was chosen: the ")
    assert f"kept in {book}; run the same command with --resume to continue" in said[-1]


def test_ctrl_c_before_anything_was_measured_says_nothing_was_kept(workload, tmp_path, monkeypatch):
    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Measurer, "measure", stopped)
    said = []
    with pytest.raises(KeyboardInterrupt):
        run(workload, tmp_path / "out", warn=said.append)
    assert said[-1] == "stopped before any measurement was kept: run the command again to start over"


def test_no_verdict_over_an_unplaced_timed_on_a_busy_host_and_resume_measures_it_again(workload, tmp_path,
                                                                                      monkeypatch, two_threads):
    # Trial 2 item 1: unplaced's intra-op threads stall on a loaded host (806 ms beside a one-core plan's 11.5 ms).
    monkeypatch.setenv("PLACER_OTHER_CORES", "1.5")  # other processes on 1.5 cores in every unplaced step
    out = tmp_path / "out"
    results = run(workload, out, methods=["single", "expert"])
    assert results.choice.verdict == "unmeasured" and results.best is None and results.unplaced.busy is not None
    assert results.choice.headline.startswith("No verdict: other processes held 1.5 of the ")
    assert "cores while unplaced was timed in the crosscheck session" in results.choice.headline
    assert "--resume: it measures unplaced and the final sessions afresh" in results.choice.headline
    assert not (out / "plan.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert not any((r["vs_unplaced"] or {}).get("verdict") in ("faster", "slower", "tie") for r in saved["methods"])
    assert sum("the host was busy" in note for note in results.notes) == 1  # one note, not one per session
    monkeypatch.delenv("PLACER_OTHER_CORES")  # an idle host: --resume judges afresh
    resumed = run(workload, out, methods=["single", "expert"], resume=True)
    assert resumed.choice.verdict != "unmeasured" and resumed.unplaced.busy is None
    assert resumed.unplaced.session == "confirm" and (out / "plan.json").is_file()
    # Was: the first run's busy note, from the book's baselines measurement, stayed beside a fresh idle verdict.
    assert not any("busy" in note for note in resumed.notes + resumed.unplaced.notes)
    saved = json.loads((out / "results.json").read_text())
    assert "busy" not in json.dumps(saved["notes"]) and saved["methods"][0]["busy"] is None
    assert "busy" not in (out / "report.md").read_text()


def test_other_processes_in_the_confirm_session_alone_withhold_the_plan(workload, tmp_path, monkeypatch, two_threads):
    # The new-user trial: a burst during the final sessions slowed unplaced only; the 1-minute load average had not
    # risen yet, and --resume wrote a false 2.14x plan. The confirm session now judges its own unplaced steps.
    session = Measurer.session

    def burst_in_confirm(self, entries, stage):
        if stage.startswith("confirm"):
            monkeypatch.setenv("PLACER_OTHER_CORES", "1.2")
        return session(self, entries, stage)

    monkeypatch.setattr(Measurer, "session", burst_in_confirm)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("an earlier plan")
    results = run(workload, out, methods=["single", "expert"])
    assert results.row("single").busy is None and results.unplaced.session == "confirm"
    assert results.choice.verdict == "unmeasured" and results.choice.method is None and results.best is None
    assert results.choice.headline.startswith("No verdict: other processes held 1.2 of the ")
    assert "while unplaced was timed in the confirm session" in results.choice.headline
    assert "faster" not in results.choice.headline
    assert not (out / "plan.json").exists() and json.loads((out / "results.json").read_text())["plan"] is None
