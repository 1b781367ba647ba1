"""placer.runtime.host_load: the direct reading of other processes' CPU time over exactly
unplaced's timed steps, its threshold and fallback, the test hooks, and the busy field's
file format (old load-average dicts too)."""

import os

import pytest

from graphs.errors import PlacerError
from placer.runtime.host_load import OTHERS_LIMIT, ContentionMeter, Counters, busy_cause, read_counters
from placer.runtime.stats import Measurement, busy_from_json, summarize
from placer.runtime.timing import EagerTrial, run_trial
from tests.test_timing import workload


class FakeHost:
    """Counters that advance only when told: `run(s, own, others)` spends s seconds with
    this process on `own` cores and other processes on `others`."""

    def __init__(self, tick_s: float = 0.0):
        self.wall = self.host = self.own = 0.0
        self.tick_s = tick_s

    def run(self, seconds: float, own: float, others: float) -> None:
        self.wall += seconds
        self.own += own * seconds
        self.host += (own + others) * seconds

    def read(self, cores) -> Counters:
        return Counters(self.wall, self.host, self.own, self.tick_s)


def never(cores: int) -> dict:
    raise AssertionError("the fallback was asked although the windows decide")


def test_only_the_windows_count_not_what_runs_between_them():
    # An interleaved session times other trials between unplaced's steps: a burst there is not unplaced's.
    host = FakeHost()
    meter = ContentionMeter([0, 1], read=host.read)
    for _ in range(10):
        with meter.window():  # unplaced's step: this process on both cores, nobody else
            host.run(0.1, own=2.0, others=0.0)
        host.run(0.1, own=1.0, others=2.0)  # another trial's step during a burst of other processes
    assert meter.steps == 10 and meter.wall_s == pytest.approx(1.0) and meter.others == pytest.approx(0.0)
    assert meter.busy(never) is None
    with meter.window():  # the burst reaches one of unplaced's steps
        host.run(1.0, own=0.5, others=1.8)
    assert meter.others == pytest.approx(1.8 / 2.0)
    assert meter.busy(never) == {"others": 0.9, "cores": 2, "steps": 11}


@pytest.mark.parametrize("others, busy", [(0.0, False), (0.4, False), (0.6, True), (1.5, True)])
def test_held_is_more_than_half_a_core_on_average(others, busy):
    host = FakeHost()
    meter = ContentionMeter([0, 1, 2, 3], read=host.read)
    for _ in range(5):
        with meter.window():
            host.run(0.05, own=4.0 - others, others=others)
    found = meter.busy(never)
    assert (found is not None) == busy and (found is None or found == {"others": others, "cores": 4, "steps": 5})
    assert OTHERS_LIMIT == 0.5


def test_windows_too_short_for_the_tick_counters_leave_it_to_the_load_average():
    # Three 2 ms steps on counters that count in 10 ms ticks cannot tell 0.6 cores from 0.4.
    host = FakeHost(tick_s=0.01)
    meter = ContentionMeter([0, 1], read=host.read)
    for _ in range(3):
        with meter.window():
            host.run(0.002, own=1.4, others=0.6)
    asked = []
    assert meter.busy(lambda cores: asked.append(cores) or {"load": 3.0, "cores": cores}) == {"load": 3.0, "cores": 2}
    assert asked == [2]
    for _ in range(400):  # many longer steps: the counting error shrinks below the distance to the limit
        with meter.window():
            host.run(0.05, own=0.6, others=1.4)
    assert meter.busy(never)["others"] == pytest.approx(1.4, abs=0.02)


def test_unreadable_counters_fall_back_to_the_load_average():
    meter = ContentionMeter([0, 1], read=lambda cores: None)
    with meter.window():
        pass
    assert meter.others is None and meter.busy(lambda cores: None) is None
    assert meter.busy(lambda cores: {"load": 9.0, "cores": cores}) == {"load": 9.0, "cores": 2}


def test_the_hosts_counters_are_read_over_the_steps_cores():
    counters = read_counters([0])
    if counters is None:
        pytest.skip("no per-CPU times on this host")
    assert counters.host_s > 0 and counters.own_s > 0 and counters.tick_s > 0


def test_placer_load_average_replaces_the_whole_check(monkeypatch):
    # The suite sets it 0 (conftest): no verdict of a test depends on the real host.
    monkeypatch.setenv("PLACER_LOAD_AVERAGE", "0")
    meter = ContentionMeter([0, 1])
    with meter.window():
        sum(range(10000))
    assert meter.steps == 0 and meter.busy(lambda cores: {"load": 0.0, "cores": cores}) == {"load": 0.0, "cores": 2}
    monkeypatch.setenv("PLACER_OTHER_CORES", "lots")
    with pytest.raises(PlacerError, match="PLACER_OTHER_CORES='lots' is not a number"):
        ContentionMeter([0, 1])


@pytest.mark.parametrize("others, held", [("1.5", True), ("0.2", False)])
def test_an_unplaced_trial_counts_its_timed_steps_only(monkeypatch, two_threads, others, held):
    # $PLACER_OTHER_CORES: the test hook that makes every window see other processes on that many cores.
    monkeypatch.setenv("PLACER_OTHER_CORES", others)
    trial = EagerTrial(workload(), "cpu", warmup=2)
    m = run_trial(trial, iters=3)
    assert trial.meter.steps == 3  # not the two warm-up steps
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert m.busy == ({"others": float(others), "cores": cores, "steps": 3} if held else None)
    assert any("the host was busy while it was timed" in n for n in m.notes) == held
    assert Measurement.from_json(m.to_json()).busy == m.busy


def test_busy_from_json_reads_the_direct_reading_and_the_older_load_average_dicts():
    assert busy_from_json({"others": 1.6, "cores": 2, "steps": 30}) == {"others": 1.6, "cores": 2, "steps": 30}
    assert busy_from_json({"load": 3.8, "cores": 2, "own": 0.9}) == {"load": 3.8, "cores": 2, "own": 0.9}
    assert busy_from_json({"load": 3.8, "cores": 2}) == {"load": 3.8, "cores": 2}  # before "own" was kept
    assert busy_from_json({"others": 1.0}) == {"others": 1.0, "cores": 1}
    for damaged in (None, {}, {"cores": 2}, {"others": "x", "cores": 2}, [1, 2], {"load": float("nan")}):
        assert busy_from_json(damaged) is None
    m = summarize([10.0, 11.0, 12.0])
    m.busy = {"others": 1.6, "cores": 2, "steps": 3}
    assert Measurement.from_json(m.to_json()).busy == m.busy


def test_the_cause_names_what_was_measured():
    assert busy_cause({"others": 1.62, "cores": 2}) == "other processes held 1.6 of the 2 cores"
    assert busy_cause({"load": 3.8, "cores": 2, "own": 0.9}) == \
        "the host was busy (load 3.8 on 2 cores, 0.9 of it placer's own)"
