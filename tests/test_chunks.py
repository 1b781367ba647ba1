"""placer.runtime.chunks: the runtime's chunks are graphs.schedule's partition of the
placed graph (over the plan's groups when they serve), compiled over the model's own
tensors, with in-place updates threaded through copies of the graph."""

from __future__ import annotations

import copy
import random

import torch
import torch.fx as fx
from torch import nn

from graphs.schedule import partition
from graphs.trace import trace_model
from placer.runtime.chunks import build_chunks

THREE = ["cpu:0", "cpu:1", "cpu:2"]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.a(h) + self.b(h)
        y.add_(h)
        return self.head(y)


def random_assignment(gm: fx.GraphModule, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {n.name: rng.choice(THREE) for n in gm.graph.nodes}


def test_chunks_are_the_partition_of_the_computing_nodes_in_a_topological_order():
    model = Branchy()
    gm = fx.symbolic_trace(model)
    for seed in range(10):
        assignment = random_assignment(gm, seed)
        chunks = build_chunks(model, gm.graph, assignment)
        body = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        assert sorted(n for c in chunks for n in c.nodes) == sorted(body)
        for c in chunks:
            assert {assignment[n] for n in c.nodes} == {c.device}
            assert all(a < c.index for a in c.after)
        producer = {n: c.index for c in chunks for n in c.nodes}
        for c in chunks:
            assert {producer[i] for i in c.inputs if i in producer} <= set(c.after)
        # the same chunks as graphs.schedule.partition over the node DAG (nodes in fx order)
        position = {name: i for i, name in enumerate(body)}
        edges = [(position[a.name], position[n.name]) for n in gm.graph.nodes for a in n.all_input_nodes
                 if a.name in position and n.name in position]
        edges += [(position["add_"], position["head"])]  # head reads y after y.add_(h): the update's edge
        devices = {d: i for i, d in enumerate(THREE)}
        expected = partition(len(body), edges, [devices[assignment[n]] for n in body]).chunk_of
        by_chunk = {frozenset(c.nodes) for c in chunks}
        assert by_chunk == {frozenset(n for n in body if expected[position[n]] == k) for k in set(expected)}


def test_the_plans_groups_are_atoms_when_they_serve():
    model = Branchy()
    gm = fx.symbolic_trace(model)
    names = [n.name for n in gm.graph.nodes]
    groups = [names[:4], names[4:8], names[8:]]
    assignment = {n: THREE[g] for g, members in enumerate(groups) for n in members}
    chunks = build_chunks(model, gm.graph, assignment, groups=groups)
    for c in chunks:
        assert any(set(c.nodes) <= set(g) for g in groups)
    body = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")}
    assert {frozenset(c.nodes) for c in chunks} == {frozenset(set(g) & body) for g in groups if set(g) & body}
    # groups split across devices cannot serve: every node is its own atom then
    mixed = dict(assignment, stem="cpu:2")
    chunks = build_chunks(model, gm.graph, mixed, groups=groups)
    assert any(c.device == "cpu:2" and "stem" in c.nodes for c in chunks)


def test_the_callers_graph_is_left_as_it_was():
    model = Branchy()
    gm = fx.symbolic_trace(model)
    before = [(n.name, [a.name for a in n.all_input_nodes]) for n in gm.graph.nodes]
    build_chunks(model, gm.graph, random_assignment(gm, 1))
    assert [(n.name, [a.name for a in n.all_input_nodes]) for n in gm.graph.nodes] == before


class ViewUpdate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        early = y * 3
        y.narrow(1, 0, 1).copy_(self.b(x)[:, 1:2])  # changes y through a view
        return y + early


def test_an_update_through_a_view_in_another_chunk_works_on_a_copy_that_later_readers_read():
    model = ViewUpdate()
    ref = copy.deepcopy(model)
    gm = fx.symbolic_trace(model)
    assignment = {n.name: "cpu:1" if n.name in ("b", "getitem", "copy_") else "cpu:0" for n in gm.graph.nodes}
    chunks = build_chunks(model, gm.graph, assignment)
    update = next(c for c in chunks if "copy_" in c.nodes)
    assert update.mutated_inputs == {"a"}  # y is made elsewhere: the update gets a copy of it
    assert {n.split("_")[0] for n in update.nodes} >= {"narrow", "copy", "after"}  # made again beside the update
    values = {"x": torch.randn(3, 4)}
    for c in chunks:  # one after another, in the topological order, copies as the executor makes them
        values.update(zip(c.outputs, c.module(*(values[i].clone() if i in c.mutated_inputs else values[i]
                                               for i in c.inputs))))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0].name
    torch.testing.assert_close(values[out], ref(values["x"]))


def test_a_chunk_reads_each_parameter_with_one_attribute_lookup():
    # fx's dotted path (getattr(self.blocks, "0").fc.weight) costs a failed lookup per part:
    # most of the runtime's overhead on one device. A chunk holds each tensor it reads itself.
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    gm = trace_model(model, inputs=(torch.randn(3, 4),)).gm
    (chunk,) = build_chunks(gm, gm.graph, {n.name: "cpu:0" for n in gm.graph.nodes}, extra_roots=(gm,))
    reads = [n for n in chunk.module.graph.nodes if n.op == "get_attr"]
    assert len(reads) == 4 and all("." not in str(n.target) for n in reads)
    assert {id(getattr(chunk.module, str(n.target))) for n in reads} == {id(p) for p in model.parameters()}
