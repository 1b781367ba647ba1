"""A model placed whole on one device runs what eager runs (issue 15: "within 3% of
eager on every zoo model"): the same aten ops in a training step, and per call only
a fixed amount of Python around its graph, whatever the model's size: the capture's
guard is asked once per input signature, and the mode is read from a list of the
model's modules made when it was placed, not by walking the module tree."""

import collections
import copy
import dataclasses
import sys

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from graphs.devices import parse_cluster
from graphs.trace import trace_model
from graphs.workload import load_workload
from placer.plan import plan_from_assignment
from placer.runtime.placed import apply


class Blocks(nn.Module):
    """`depth` Linear + LayerNorm + GELU blocks (a deep module tree) and a head."""

    def __init__(self, depth: int, width: int = 16):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
                                      for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


class InPlace(nn.Module):
    """Buffers updated in forward (BatchNorm), in-place ops on activations, dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x))).mean((2, 3))
        h += 1.0
        return self.fc(self.drop(h))


def place_whole(model: nn.Module, inputs: tuple):
    """`model` placed on cpu:0 with the caller's thread count: the path that runs the
    whole graph on the calling thread (Executor.runs_whole_on_caller)."""
    cluster = parse_cluster("cpu:0")
    cluster = dataclasses.replace(cluster, devices=tuple(dataclasses.replace(d, threads=torch.get_num_threads())
                                                         for d in cluster.devices))
    plan = plan_from_assignment(model, lambda n: "cpu:0", ["cpu:0"], inputs=inputs)
    placed = apply(model, plan, cluster)
    assert placed.executor.runs_whole_on_caller()
    return placed


def step_ops(model: nn.Module, inputs: tuple, loss_fn) -> collections.Counter:
    """The aten ops (name -> count) of one training step, forward, backward and SGD
    step, after one step of warm-up."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(*inputs), *inputs).backward()
        optimizer.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def python_calls(fn) -> int:
    """How many Python functions `fn()` calls (sys.setprofile's "call" events)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "call"

    sys.setprofile(tracer)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_a_zoo_models_placed_step_runs_exactly_eagers_aten_ops(name):
    workload = load_workload(f"zoo:{name}")
    eager = workload.fresh_model()
    placed = place_whole(workload.fresh_model(), workload.inputs)
    try:
        assert step_ops(placed, workload.inputs, workload.loss_fn) == step_ops(eager, workload.inputs,
                                                                             workload.loss_fn)
    finally:
        placed.close()


def test_in_place_updates_and_buffers_add_no_copies_on_one_device():
    torch.manual_seed(0)
    model, x = InPlace(), torch.randn(4, 3, 8, 8)
    eager = copy.deepcopy(model)
    placed = place_whole(model, (x,))
    try:
        assert step_ops(placed, (x,), lambda out, x: out.sum()) == step_ops(eager, (x,), lambda out, x: out.sum())
    finally:
        placed.close()


def test_python_work_per_call_does_not_grow_with_the_model():
    """Beyond its graph's own forward, a placed call runs as many Python functions on
    a model of 16 blocks as on one of 2."""
    extra = []
    for depth in (2, 16):
        torch.manual_seed(0)
        x = torch.randn(8, 16)
        placed = place_whole(Blocks(depth), (x,))
        graph = placed.executor.chunks[0].module
        try:
            placed(x), graph(x)  # first calls: lazily built state
            extra.append(python_calls(lambda: placed(x)) - python_calls(lambda: graph(x)))
        finally:
            placed.close()
    assert extra[0] == extra[1]


def test_the_guard_is_asked_once_per_signature_and_refusals_every_time():
    traced = trace_model(Blocks(2), inputs=(torch.randn(4, 16),))
    asked = []

    def guard(flat):
        asked.append(tuple(flat[0].shape))
        return traced.guard(flat)

    counted = dataclasses.replace(traced, guard=guard)
    for _ in range(3):
        assert counted.bind((torch.randn(4, 16),), {}) is not None
    assert counted.bind((torch.randn(6, 16),), {}) is not None
    assert asked == [(4, 16), (6, 16)]
    for _ in range(2):  # a static width the capture does not have: refused, and asked again
        assert counted.bind((torch.randn(4, 9),), {}) is None
        assert counted.bind((torch.randn(4, 16, dtype=torch.float64),), {}) is None
    assert asked == [(4, 16), (6, 16)] + [(4, 9), (4, 16)] * 2


def test_a_submodule_switched_to_eval_is_seen_on_the_next_call():
    """The mode is read from every module the model had when placed, not only the root."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    x = torch.randn(6, 8)
    eager = copy.deepcopy(model)
    placed = place_whole(model, (x,))
    try:
        placed.get_submodule("1").eval()
        eager[1].eval()
        with torch.no_grad():
            torch.testing.assert_close(placed(x), eager(x), rtol=0, atol=0)
        eager[1].train()
        with torch.no_grad():
            assert not torch.equal(placed(x), eager(x))  # batch statistics would give another output
    finally:
        placed.close()
