"""The caller's intra-op thread count under placer.apply is the plan's, whatever the
process did before (new-user trial 2, items 2 and 4): ATen keeps one process-wide
count that a thread copies when it first needs its own, so without care the caller
ended at the workers' count in a fresh process and at the host's once it had read
its count. Measurement (PlacedTrial) steps with the same count apply leaves.

Each apply runs in a fresh subprocess: the state under test is the process's."""

import json
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import placer

from graphs.capture import owning_module
from graphs.devices import Cluster, Device, parse_cluster
from graphs.workload import Workload
from placer.plan import plan_from_assignment
from placer.runtime.timing import measure
from placer.runtime.worker import Worker

ROOT = Path(__file__).parent.parent
VIRTUAL = ["cpu:0", "cpu:1"]

# Run in a fresh process: argv = plan file, what the process does to its threads first
# ("none", "read", or "set N"), and the devices to apply it on ("plan": the plan's own,
# "one": the virtual devices with one thread each). Prints the counts as JSON.
PROBE = """
import json, sys, threading
import torch
import placer
from tests.test_threads import model, one_thread_cluster, x
plan, first, devices = sys.argv[1:4]
if first == "read":
    torch.get_num_threads()
elif first.startswith("set"):
    torch.set_num_threads(int(first.split()[1]))
placed = placer.apply(model(), plan, one_thread_cluster() if devices == "one" else None)
counts = {"caller": torch.get_num_threads()}
copied = []
thread = threading.Thread(target=lambda: copied.append(torch.get_num_threads()))
thread.start(); thread.join()
counts["new_thread"] = copied[0]
placed(x()).sum().backward()
counts["after_step"] = torch.get_num_threads()
print(json.dumps(counts))
"""


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def x() -> torch.Tensor:
    return torch.ones(4, 8)


def one_thread_cluster() -> Cluster:
    """cpu:0,cpu:1 with one thread each, whatever the host's cores (2 cores give that)."""
    cluster = parse_cluster(",".join(VIRTUAL))
    return replace(cluster, devices=tuple(replace(d, threads=1) for d in cluster.devices))


def make_plan(tmp_path: Path, devices: list[str]):
    """A plan of model() on `devices` (its last layer on the last one), saved; (plan, path)."""
    plan = plan_from_assignment(model(), lambda n: devices[-1] if owning_module(n) == "2" else devices[0], devices,
                                inputs=(x(),))
    return plan, plan.save(tmp_path / "plan.json")


def probe(plan_path: Path, first: str, devices: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(plan_path), first, devices], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_threads(plan, cluster: Cluster | None) -> list[int]:
    """The caller's thread count in each step PlacedTrial runs of `plan` (read by the loss)."""
    seen: list[int] = []

    def loss_fn(out, *inputs):
        seen.append(torch.get_num_threads())
        return out.sum()

    workload = Workload(name="t", spec="t", model=model(), inputs=(x(),), loss_fn=loss_fn)
    assert measure(workload, plan, cluster, iters=2, warmup=1).feasible
    return seen


@pytest.mark.parametrize("first", ["none", "read", "set 3"])
def test_apply_of_virtual_devices_leaves_the_caller_at_their_count(tmp_path, first):
    plan, path = make_plan(tmp_path, VIRTUAL)
    counts = probe(path, first, "one")
    assert counts == {"caller": 1, "new_thread": 1, "after_step": 1}


def test_measurement_steps_with_the_count_apply_leaves(tmp_path):
    plan, _ = make_plan(tmp_path, VIRTUAL)
    before = torch.get_num_threads()
    assert set(measured_threads(plan, one_thread_cluster())) == {1}
    assert torch.get_num_threads() == before  # measuring leaves the measuring process as it was


@pytest.mark.parametrize("first, env, expected", [("none", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 1),
                                                  ("set 3", {}, 3)])
def test_apply_of_the_unplaced_plan_keeps_the_callers_count(tmp_path, first, env, expected):
    """The whole host `cpu` has the host's cores as its worker's count; the caller keeps
    its own (torch's default from the environment, or what it set)."""
    _, path = make_plan(tmp_path, ["cpu"])
    assert probe(path, first, "plan", env) == {"caller": expected, "new_thread": expected, "after_step": expected}


def test_measurement_of_the_unplaced_plan_steps_with_the_processs_count(tmp_path):
    plan, _ = make_plan(tmp_path, ["cpu"])
    before = torch.get_num_threads()
    assert set(measured_threads(plan, None)) == {before}
    assert torch.get_num_threads() == before


class Record:
    """A worker task's owner that records the worker's thread count."""

    def __init__(self):
        self.counts: list[int] = []
        self.done = threading.Event()

    def run(self, worker: Worker, task: object) -> None:  # called holding worker.busy, as dataflow.Pass.run is
        worker.busy.release()
        torch.ones(64).sum()
        self.counts.append(torch.get_num_threads())
        self.done.set()


def test_a_workers_count_survives_the_caller_setting_another():
    """A worker that set its count before its first op would copy the process-wide
    count at that op: the caller's torch.set_num_threads after apply would reach it."""
    before = torch.get_num_threads()
    worker = Worker(Device(name="cpu:0", kind="cpu", torch_device="cpu", threads=1))
    try:
        torch.set_num_threads(3)
        record = Record()
        worker.queue.put((0, record, None))
        assert record.done.wait(60)
        assert record.counts == [1]
    finally:
        worker.close()
        torch.set_num_threads(before)


def test_a_thread_count_changed_after_apply_is_warned_about_once_with_the_count_to_set():
    before = torch.get_num_threads()
    m = model()
    plan = plan_from_assignment(m, lambda n: "cpu:1" if owning_module(n) == "2" else "cpu:0", VIRTUAL, inputs=(x(),))
    placed = placer.apply(m, plan, one_thread_cluster())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            placed(x())  # the count apply gave: no word
        torch.set_num_threads(3)
        with pytest.warns(UserWarning, match=r"this thread runs 3 intra-op threads, where placer.apply gave it 1 .*"
                                             r"call torch.set_num_threads\(1\) after apply") as caught:
            placed(x()).sum().backward()
        assert caught[0].filename == __file__  # the user's line, past torch.compiler.disable's frames
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            placed(x())  # once per placed model
            placed.eval()(x())  # a new capture (eval mode), whose executor keeps the user's count
        assert torch.get_num_threads() == 3
    finally:
        placed.close()
        torch.set_num_threads(before)
