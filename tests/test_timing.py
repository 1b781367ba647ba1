"""placer.runtime.timing: the one timing loop, the Measurement it makes (median, IQR,
CI of the median, runs) and the trials that time placed and unplaced models."""

import math
import os
import threading
import time

import pytest
import torch
from torch import nn

from graphs.workload import Workload
from placer.plan import plan_from_assignment
from placer.runtime.timing import (EagerTrial, Measurement, PlacedTrial, StepTimeout, measure, measure_eager,
                                   median_ci, run_trial, summarize, time_steps)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def workload(output_scale: float = 1.0) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def loss_fn(out, x):
        return out.mean() * output_scale

    return Workload(name="mlp", spec="mlp", model=model, inputs=(torch.randn(6, 8),), loss_fn=loss_fn)


def two_device_plan(w: Workload):
    return plan_from_assignment(w.model, lambda n: "cpu:1" if n.name.endswith("2") else "cpu:0", ["cpu:0", "cpu:1"])


@pytest.mark.parametrize("n, ranks", [(1, (1, 1)), (5, (1, 5)), (6, (1, 6)), (9, (2, 8)), (20, (6, 15)),
                                      (100, (40, 61))])
def test_median_ci_takes_the_binomial_order_statistics(n, ranks):
    times = [float(t) for t in range(1, n + 1)]  # the k-th smallest is k
    assert median_ci(times) == (float(ranks[0]), float(ranks[1]))
    assert median_ci(list(reversed(times))) == median_ci(times)  # order does not matter


def test_median_ci_covers_the_median_at_the_stated_rate():
    generator = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(400):
        sample = (-torch.rand(25, generator=generator).log()).tolist()  # exponential: skewed, median log 2
        low, high = median_ci(sample)
        hits += low <= math.log(2) <= high
    assert hits / 400 >= 0.92  # 95% nominal (the order statistics give at least that)


def test_summarize_reports_median_iqr_ci_and_runs():
    m = summarize([4.0, 1.0, 3.0, 2.0, 5.0], {"cpu:0": 7}, ["a note"])
    assert m.feasible and m.median_ms == 3.0 and m.iqr_ms == 2.0 and m.runs == 5
    assert m.ci_ms == (1.0, 5.0) and m.peak_bytes == {"cpu:0": 7} and m.notes == ["a note"]
    assert Measurement.from_json(m.to_json()) == m


@pytest.mark.parametrize("entry", [None, [], {}, {"feasible": "yes"}, {"feasible": True},
                                   {"feasible": True, "median_ms": -1.0}, {"feasible": True, "median_ms": "1"},
                                   {"feasible": True, "median_ms": 2.0, "times_ms": [1.0, float("inf")]},
                                   {"feasible": True, "median_ms": 2.0, "ci_ms": [1.0]}])
def test_a_damaged_measurement_is_refused(entry):
    with pytest.raises(ValueError):
        Measurement.from_json(entry)


def test_an_older_measurement_gets_its_ci_and_runs_from_its_times():
    m = Measurement.from_json({"feasible": True, "median_ms": 3.0, "iqr_ms": 1.0, "times_ms": [2.0, 3.0, 4.0]})
    assert m.ci_ms == (2.0, 4.0) and m.runs == 3


def test_time_steps_on_a_fake_clock_and_its_limit():
    clock = FakeClock()
    durations = iter([0.5, 1.5, 200.0])

    def step():
        clock.now += next(durations)

    assert time_steps(step, 2, clock=clock, limit_s=120.0) == [500.0, 1500.0]
    with pytest.raises(StepTimeout, match=r"over the 120 s limit \(raise it with --step-timeout\)"):
        time_steps(step, 1, clock=clock, limit_s=120.0)


def test_placed_and_eager_trials_time_real_steps_and_report_memory():
    w = workload()
    placed = run_trial(PlacedTrial(w, two_device_plan(w), warmup=1), iters=3)
    assert placed.feasible and placed.runs == 3 and placed.ci_ms[0] <= placed.median_ms <= placed.ci_ms[1]
    assert set(placed.peak_bytes) == {"cpu:0", "cpu:1"} and all(b > 0 for b in placed.peak_bytes.values())
    eager = run_trial(EagerTrial(w, "cpu", threads=1, warmup=1), iters=3)
    assert eager.feasible and eager.runs == 3 and eager.notes == []
    assert measure(w, two_device_plan(w), iters=2, warmup=1).runs == 2
    assert measure_eager(w, threads=1, iters=2, warmup=1).runs == 2


def test_eager_trial_restores_the_callers_thread_count():
    before = torch.get_num_threads()
    run_trial(EagerTrial(workload(), "cpu", threads=1, warmup=1), iters=1)
    assert torch.get_num_threads() == before


def _caller_state() -> tuple[int, set[int]]:
    return torch.get_num_threads(), os.sched_getaffinity(threading.get_native_id())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores the OS can pin threads to")
def test_placed_steps_and_trials_leave_the_callers_threads_and_affinity_as_they_were():
    w = workload()
    before = _caller_state()
    trial = PlacedTrial(w, two_device_plan(w), warmup=1)
    assert trial.open() is None and trial.step() is not None
    assert _caller_state() == before
    # a forward whose backward never runs leaves the runtime's pin on the caller (workers pinned, which is not
    # the default): the trial's step still restores it
    placed = trial.placed
    placed.executor.repin(True)
    with trial._around_step():
        placed(*w.inputs).sum()
        assert os.sched_getaffinity(threading.get_native_id()) != before[1]
    assert _caller_state() == before
    trial.close()
    run_trial(PlacedTrial(w, two_device_plan(w), warmup=1), iters=2)
    assert _caller_state() == before
    # and the unplaced model runs on every core of the process with the threads it was given, whatever came before
    eager = EagerTrial(w, "cpu", threads=2, warmup=1)
    os.sched_setaffinity(threading.get_native_id(), {min(before[1])})
    try:
        seen = []
        eager._step = lambda: seen.append(_caller_state()) or torch.zeros(())
        with eager._around_step():
            eager._step()
        assert seen == [(2, before[1])]
    finally:
        os.sched_setaffinity(threading.get_native_id(), before[1])


def test_a_non_finite_loss_is_noted():
    m = run_trial(EagerTrial(workload(output_scale=float("nan")), "cpu", warmup=1), iters=2)
    assert m.feasible and len(m.notes) == 1 and "nan" in m.notes[0] and "diverge" in m.notes[0]


def test_a_memory_cap_makes_a_placed_trial_infeasible_without_a_crash():
    from graphs.devices import parse_cluster
    w = workload()
    m = measure(w, two_device_plan(w), parse_cluster("cpu:0,cpu:1", "cpu:0=16B"), iters=2, warmup=1)
    assert not m.feasible and m.reason.startswith("cpu:0 needs") and m.peak_bytes["cpu:0"] > 16


def test_a_slow_measurement_is_infeasible_and_names_the_limit():
    clock = FakeClock()
    w = workload()
    trial = EagerTrial(w, "cpu", warmup=1, step_timeout_s=1000.0, clock=clock)
    real_build = trial._build

    def slow_build():
        step, sync = real_build()

        def slow():
            clock.now += 30.0
            return step()
        return slow, sync

    trial._build = slow_build
    m = run_trial(trial, iters=10, timeout_s=100.0)
    assert not m.feasible and "100 s limit" in m.reason and "--step-timeout" in m.reason
    assert len(m.times_ms) == 4  # it stopped once the timed steps passed the limit


@pytest.mark.parametrize("load, threads, noted", [(9.0, 2, True), (0.5, 2, False), (9.0, 1, False)])
def test_an_unplaced_model_timed_on_a_busy_host_says_so(monkeypatch, load, threads, noted):
    # The load is a structured field of the Measurement (the verdict rule reads it, placer.choose rule 7), and
    # the note holds no number, so that the note of several sessions is one note. It round-trips through JSON.
    monkeypatch.setattr("placer.runtime.host_load.load_average", lambda: load)
    m = run_trial(EagerTrial(workload(), "cpu", threads=threads, warmup=1), iters=1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    assert (m.busy is not None) == noted and (m.busy is None or (m.busy["load"], m.busy["cores"]) == (load, cores))
    busy = [n for n in m.notes if "the host was busy" in n]
    assert len(busy) == noted and all("idle host" in n and str(load) not in n for n in busy)
    assert Measurement.from_json(m.to_json()).busy == m.busy


@pytest.mark.parametrize("load, own, cores, busy", [(2.5, 2.0, 2, False), (2.5, 0.0, 2, True), (1.9, 0.5, 2, True),
                                                   (1.0, 0.0, 2, False), (5.0, 1.0, 16, False), (12.0, 1.0, 16, True)])
def test_the_host_is_busy_when_other_processes_hold_more_than_half_its_cores(monkeypatch, load, own, cores, busy):
    # The load average counts this process too (its workers, unplaced's own team): its share is taken off.
    from placer.runtime import host_load

    monkeypatch.setattr(host_load, "load_average", lambda: load)
    monkeypatch.setattr(host_load, "own_load", lambda: own)
    found = host_load.busy_host(cores)
    assert (found is not None) == busy and (found is None or found == {"load": load, "cores": cores, "own": own})


def test_this_processs_own_load_is_its_cpu_seconds_over_the_window():
    from placer.runtime import host_load

    start = time.monotonic()
    while time.monotonic() - start < 0.2:  # keep one core busy
        pass
    assert 0.0 < host_load.own_load() <= os.cpu_count() + 0.5


def test_the_load_average_can_be_given_and_a_bad_one_is_one_line(monkeypatch):
    from graphs.errors import PlacerError
    from placer.runtime import host_load

    monkeypatch.setenv("PLACER_LOAD_AVERAGE", "7.5")
    assert host_load.load_average() == 7.5
    monkeypatch.setenv("PLACER_LOAD_AVERAGE", "busy")
    with pytest.raises(PlacerError, match="PLACER_LOAD_AVERAGE='busy' is not a number: unset it"):
        host_load.load_average()


def test_measuring_a_plan_for_devices_this_host_lacks_names_the_plan_and_the_fix(tmp_path):
    from graphs.errors import DeviceSpecError
    from placer.plan import Plan, load_plan

    w = workload()
    path = Plan(devices=["cuda:63"], assignment={}, device_map={}, fingerprint="f").save(tmp_path / "gpu.json")
    with pytest.raises(DeviceSpecError, match=r"^gpu.json places the model on cuda:63, but .*make a plan for this "
                                              r"host's devices"):
        measure(w, load_plan(path), iters=1, warmup=0)
