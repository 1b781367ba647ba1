"""group: at most G groups, acyclic, colocation kept, sums, readable names, deterministic,
and independent work (layers, branches) kept apart."""

import networkx as nx
import pytest
import torch
from torch import nn

from graphs.capture import capture
from graphs.group import group
from graphs.profile import profile
from graphs.synthetic import random_op_graph
from graphs.workload import Workload
from graphs.zoo import ZOO


class Cell(nn.Module):
    """An LSTM cell written out op by op (many fx nodes per step)."""

    def __init__(self, n):
        super().__init__()
        self.ih = nn.Linear(n, 4 * n)
        self.hh = nn.Linear(n, 4 * n)

    def forward(self, x, h, c):
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Unrolled(nn.Module):
    """A 2-layer LSTM over T steps, step-major (fx order interleaves the layers)."""

    def __init__(self, n=16, steps=12):
        super().__init__()
        self.steps = steps
        self.cells = nn.ModuleList([Cell(n), Cell(n)])

    def forward(self, x, h0, c0):
        state = [(h0, c0), (h0, c0)]
        outs = []
        for t in range(self.steps):
            y = x[t]
            for layer, cell in enumerate(self.cells):
                state[layer] = cell(y, *state[layer])
                y = state[layer][0]
            outs.append(y)
        return torch.stack(outs).sum()


class Branchy(nn.Module):
    """Two independent towers joined at the end, and a tied weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.left = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        self.right = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        self.head = nn.Linear(16, 30)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head(self.left(h) + self.right(h))


def profiled(model, *inputs, tmp_path):
    w = Workload(name=type(model).__name__, spec="test", model=model, inputs=inputs)
    return profile(capture(w), w, threads=1, repeats=1, cache_dir=tmp_path)


@pytest.fixture(scope="module")
def lstm_ops():
    """Captured, with made-up costs (`with_made_up_times`) and no memory."""
    torch.manual_seed(0)
    n, steps = 16, 12
    w = Workload(name="lstm", spec="test", model=Unrolled(n, steps),
                 inputs=(torch.randn(steps, 4, n), torch.zeros(4, n), torch.zeros(4, n)))
    ops = with_made_up_times(capture(w))
    for data in ops.nodes.values():
        data.update(param_bytes=0, grad_bytes=0, opt_bytes=0, act_bytes=0)
    return ops


def with_made_up_times(ops):
    """`ops` with made-up costs on one device kind, cpu (measured ones would make the
    grouping vary from run to run, with the host's load): 1 ms per linear layer, 0.1 ms
    per other op, a third of it forward."""
    ops.graph["device_kinds"] = ["cpu"]
    for data in ops.nodes.values():
        ms = {"linear": 1.0, "input": 0.0, "output": 0.0, "param": 0.0, "reshape": 0.0}.get(data["op_type"], 0.1)
        data.update(fwd_ms={"cpu": ms / 3}, bwd_ms={"cpu": 2 * ms / 3}, opt_ms={"cpu": 0.0})
    return ops


@pytest.fixture(scope="module")
def branchy_ops(tmp_path_factory):
    """Profiled (memory, shapes), with made-up times (`with_made_up_times`): the CI saw a
    loaded host's measured times group the two towers together."""
    torch.manual_seed(0)
    return with_made_up_times(profiled(Branchy(), torch.randint(0, 30, (8, 4)),
                                       tmp_path=tmp_path_factory.mktemp("cache")))


def check_grouping(ops, groups, max_groups):
    """The GroupedGraph contract."""
    n = groups.number_of_nodes()
    assert 1 <= n <= max_groups
    assert sorted(groups.nodes) == list(range(n))
    assert all(u < v for u, v in groups.edges())  # ids are a topological order (so acyclic)
    members = [m for g in groups for m in groups.nodes[g]["members"]]
    assert sorted(members) == sorted(ops.nodes)  # a partition of the ops
    group_of = {m: g for g in groups for m in groups.nodes[g]["members"]}
    for a, b in ops.edges():
        assert group_of[a] == group_of[b] or groups.has_edge(group_of[a], group_of[b])
    names = [groups.nodes[g]["name"] for g in groups]
    assert len(set(names)) == n and all(names)
    for op_set in ops.graph["colocate"]:
        ids = {group_of[m] for m in op_set}
        assert len(ids) == 1 or any(ids <= set(s) for s in groups.graph["colocate"])
    for s in groups.graph["colocate"]:
        assert len(s) > 1 and s == sorted(s)
    for attr in ("param_bytes", "grad_bytes", "opt_bytes", "act_bytes", "out_bytes"):
        assert sum(groups.nodes[g][attr] for g in groups) == sum(d.get(attr, 0) for d in ops.nodes.values())
    for kind in ops.graph["device_kinds"]:
        for attr in ("fwd_ms", "bwd_ms", "opt_ms"):
            total = sum(d[attr][kind] for d in ops.nodes.values())
            assert sum(groups.nodes[g][attr][kind] for g in groups) == pytest.approx(total)
    assert sum(sum(groups.nodes[g]["op_mix"].values()) for g in groups) == ops.number_of_nodes()
    return group_of


@pytest.mark.parametrize("max_groups", [1, 2, 5, 16, 1000])
def test_contract_on_an_unrolled_lstm(lstm_ops, max_groups):
    check_grouping(lstm_ops, group(lstm_ops, max_groups), max_groups)


@pytest.mark.parametrize("max_groups", [6, 8, 12, 24])
def test_lstm_groups_are_per_layer_windows_of_time(lstm_ops, max_groups):
    groups = group(lstm_ops, max_groups)
    layers_per_group = []
    for g in groups:
        modules = {lstm_ops.nodes[m]["module"] for m in groups.nodes[g]["members"]}
        layers_per_group.append({m.split(".")[1] for m in modules if m.startswith("cells.")})
    assert all(len(layers) <= 1 for layers in layers_per_group)  # no group mixes the two layers
    for layer in ("0", "1"):
        windows = [g for g, layers in enumerate(layers_per_group) if layers == {layer}]
        assert len(windows) >= 2  # each layer is split over time, so the layers can pipeline
        assert all(groups.nodes[g]["name"].startswith(f"cells.{layer}") for g in windows)


def test_branches_stay_apart_and_tied_weight_is_colocated(branchy_ops):
    groups = group(branchy_ops, 6)
    group_of = check_grouping(branchy_ops, groups, 6)
    towers = {side: {group_of[n] for n, d in branchy_ops.nodes(data=True) if d["module"].startswith(side)}
              for side in ("left", "right")}
    assert not towers["left"] & towers["right"]
    emb, head = (next(n for n, d in branchy_ops.nodes(data=True) if d["module"] == m and d["op_type"] == t)
                 for m, t in (("emb", "embedding"), ("head", "linear")))
    assert group_of[emb] != group_of[head]  # tied, yet far apart: listed together instead
    assert [group_of[emb], group_of[head]] in groups.graph["colocate"]


def test_names_are_module_paths(branchy_ops):
    names = [d["name"] for d in group(branchy_ops, 1000).nodes.values()]
    assert "left.0" in names and "right.3" in names and "emb" in names


def test_deterministic(lstm_ops):
    a, b = group(lstm_ops, 7), group(lstm_ops, 7)
    assert dict(a.nodes(data=True)) == dict(b.nodes(data=True)) and a.graph == b.graph
    assert list(a.edges(data=True)) == list(b.edges(data=True))


def test_random_graph_and_disconnected_components():
    ops = random_op_graph(600, seed=3)
    for max_groups in (1, 7, 64):
        check_grouping(ops, group(ops, max_groups), max_groups)
    islands = nx.disjoint_union_all([random_op_graph(20, seed=s) for s in range(5)])
    nx.set_node_attributes(islands, {n: i for i, n in enumerate(islands)}, "order")
    islands = nx.relabel_nodes(islands, str)
    check_grouping(islands, group(islands, 3), 3)


def test_bad_max_groups(lstm_ops):
    with pytest.raises(ValueError):
        group(lstm_ops, 0)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_groups_acyclic_with_colocation(name, zoo_problem):
    ops = zoo_problem(name).ops  # the captured, profiled model, shared with test_baselines
    for max_groups in (8, 64):
        groups = group(ops, max_groups)
        check_grouping(ops, groups, max_groups)
        assert nx.is_directed_acyclic_graph(groups)


class FanOut(nn.Module):
    """One tensor read by three ops of another module (like Q, K and V projections)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.enc(x)
        return self.q(h) * self.k(h) + self.v(h)


def test_a_tensor_read_by_several_ops_of_a_group_crosses_once(tmp_path):
    ops = profiled(FanOut(), torch.randn(8, 16), tmp_path=tmp_path)
    groups = group(ops, max_groups=2)
    (enc,) = [i for i in groups if "enc" in groups.nodes[i]["name"]]
    h_bytes = 8 * 16 * 4
    assert [groups.edges[e]["bytes"] for e in groups.out_edges(enc)] == [h_bytes]
