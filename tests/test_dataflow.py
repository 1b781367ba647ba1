"""placer.runtime.dataflow: a pass runs, on each device, the ready task of highest
priority (micro-batch, then rank), fails with the task's own exception after the
workers are quiet, and never waits without a way out."""

from __future__ import annotations

import threading
import time

import pytest

from graphs.devices import parse_cluster
from graphs.errors import ExecutionError
from placer.runtime.dataflow import Pass, task_keys
from placer.runtime.worker import Worker


@pytest.fixture
def workers():
    made = [Worker(d) for d in parse_cluster("cpu:0,cpu:1").devices]
    yield made
    for w in made:
        w.close()


def run(waits_for, workers, place, micro=1, reverse=False, body=None, timeout_s=None, rank=None):
    """Run a pass whose chunk c is on workers[place[c]] (the first one served by this
    thread), ranked by `rank` (default: chunk order); returns (device, micro-batch,
    chunk, thread) in the order the tasks ran."""
    wakes = [[] for _ in waits_for]
    for c, before in enumerate(waits_for):
        for a in before:
            wakes[a].append(c)
    initial = [c for c, before in enumerate(waits_for) if not before]
    seen = []

    def record(worker, i, c):
        seen.append((worker.device.name, i, c, threading.current_thread().name))
        if body is not None:
            body(worker, i, c)

    chunk_workers = [workers[p] for p in place]
    keys = task_keys(rank or range(len(waits_for)), micro, reverse)
    Pass(waits_for, wakes, initial, keys, micro, reverse, chunk_workers, workers[0], record).execute(workers, timeout_s)
    return seen


def test_a_device_runs_the_ready_task_of_highest_priority(workers):
    # 2 waits for 1 and 3 for 0: once 0 has run, 1 (ready from the start) and 3 are
    # ready, and 1 ranks higher; then 2 does.
    assert [c for _, _, c, _ in run([(), (), (1,), (0,)], workers, [0, 0, 0, 0])] == [0, 1, 2, 3]
    assert [c for _, _, c, _ in run([(), (), (1,), (0,)], workers, [0, 0, 0, 0], rank=[0, 3, 2, 1])] == [0, 3, 1, 2]
    # A chain of two chunks on one device, two micro-batches: micro-batch 0's second
    # chunk goes before micro-batch 1's first, ready since the start (a pipeline
    # stage hands micro-batch 0 on first); backward, the latest micro-batch first.
    assert [(i, c) for _, i, c, _ in run([(), (0,)], workers, [0, 0], micro=2)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(i, c) for _, i, c, _ in run([(), (0,)], workers, [0, 0], micro=2, reverse=True)] == [
        (1, 0), (1, 1), (0, 0), (0, 1)]


def test_tasks_run_on_their_devices_and_wait_for_what_they_need(workers):
    seen = run([(), (0,), (1,), (2,)], workers, [0, 1, 0, 1])
    assert [(d, c) for d, _, c, _ in seen] == [("cpu:0", 0), ("cpu:1", 1), ("cpu:0", 2), ("cpu:1", 3)]


def test_a_chain_over_idle_devices_runs_on_the_thread_that_hands_it_on(workers):
    # unpinned virtual CPUs: the caller runs cpu:1's chunks itself, with no wake-up per crossing; a chain that
    # starts on cpu:1 runs there until it reaches the caller's device, which only the caller runs
    me = threading.current_thread().name
    assert {t for *_, t in run([(), (0,), (1,), (2,)], workers, [0, 1, 0, 1])} == {me}
    seen = run([(), (0,), (1,), (2,)], workers, [1, 1, 0, 1])
    assert [(d, c, t) for d, _, c, t in seen] == [("cpu:1", 0, "placer-cpu:1"), ("cpu:1", 1, "placer-cpu:1"),
                                                  ("cpu:0", 2, me), ("cpu:1", 3, me)]


def test_a_device_held_pinned_runs_its_tasks_on_its_own_thread():
    pinned = [Worker(d, cores=(k,)) for k, d in enumerate(parse_cluster("cpu:0,cpu:1").devices)]
    try:
        seen = run([(), (0,), (1,), (2,)], pinned, [0, 1, 0, 1])
    finally:
        for w in pinned:
            w.close()
    assert {(d, t) for d, _, _, t in seen} == {("cpu:0", threading.current_thread().name), ("cpu:1", "placer-cpu:1")}


def test_a_device_runs_one_task_at_a_time_whichever_thread_runs_it(workers):
    # chunk 2 (cpu:1) runs from the start on cpu:1's worker; chunk 1 (cpu:1) becomes ready while it runs, when
    # the caller has nothing of its own left: it must wait for cpu:1, not run beside chunk 2 on the caller
    spans = {}

    def body(worker, i, c):
        start = time.perf_counter()
        time.sleep(0.05 if c == 2 else 0.01)
        spans[c] = (worker.device.name, start, time.perf_counter())

    run([(), (0,), ()], workers, [0, 1, 1], body=body)
    on_one = sorted((s, e) for d, s, e in spans.values() if d == "cpu:1")
    assert len(on_one) == 2 and on_one[0][1] <= on_one[1][0]


def test_a_failing_task_fails_the_pass_with_its_own_exception_and_nothing_keeps_running(workers):
    started, release = threading.Event(), threading.Event()
    finished = []

    def body(worker, i, c):
        if c == 1:  # on cpu:1, still busy when chunk 0 fails
            started.set()
            release.wait()
            finished.append(c)
        elif c == 0:
            started.wait()
            threading.Timer(0.2, release.set).start()
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run([(), (), (0, 1)], workers, [0, 1, 0], body=body)
    assert finished == [1]  # the caller waited for cpu:1's task before raising


def test_a_pass_past_its_time_limit_raises(workers):
    gate = threading.Event()
    threading.Timer(1.0, gate.set).start()
    with pytest.raises(ExecutionError, match="limit of 0.01 s"):
        run([()], workers, [1], body=lambda w, i, c: gate.wait(), timeout_s=0.01)


def test_an_interrupted_task_run_for_another_device_leaves_no_device_locked(workers):
    # the caller runs cpu:1's chunk 1 itself (a chain), and Ctrl-C arrives inside it
    def body(worker, i, c):
        if c == 1:
            assert threading.current_thread() is threading.main_thread()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run([(), (0,), (1,)], workers, [0, 1, 0], body=body)
    assert not any(w.busy.locked() for w in workers)
    assert [c for *_, c, _ in run([(), (0,), (1,)], workers, [0, 1, 0])] == [0, 1, 2]  # the next pass runs
