import networkx as nx
import numpy as np
import pytest

from graphs.synthetic import random_grouped_graph, random_op_graph
from graphs.devices import parse_cluster
from graphs.errors import InfeasibleError
from graphs.problem import PlacementProblem


def problem(n=30, memory=None, tied_pairs=0):
    return PlacementProblem(random_grouped_graph(n, seed=3, tied_pairs=tied_pairs), parse_cluster("cpu:0,cpu:1", memory))


def test_synthetic_graphs_are_dags_in_topological_numbering():
    g = random_grouped_graph(200, seed=1)
    assert nx.is_directed_acyclic_graph(g) and all(u < v for u, v in g.edges)
    ops = random_op_graph(500, seed=2)
    assert nx.is_directed_acyclic_graph(ops) and ops.number_of_nodes() == 500
    assert all(ops.in_degree(n) > 0 for n in ops if ops.nodes[n]["order"] >= 9)


def test_costs_follow_device_kinds_and_memory_adds_up():
    p = problem()
    assert p.costs.fwd_ms.shape == (30, 2)
    assert np.allclose(p.costs.fwd_ms[:, 0], p.costs.fwd_ms[:, 1])  # both devices are cpu
    used = p.memory_per_device([0] * 30)
    assert used[0] == pytest.approx(p.costs.memory_bytes.sum()) and used[1] == 0


def test_memory_cap_and_colocation_are_violations():
    total = int(problem().costs.memory_bytes.sum())
    capped = problem(memory=f"cpu:0={total // 2}B")
    assert capped.violations([1] * 30) == []
    with pytest.raises(InfeasibleError, match="cpu:0 needs"):
        capped.check([0] * 30)
    tied = problem(tied_pairs=1)
    a, b = tied.colocation_sets[0]
    placement = [0] * 30
    placement[b] = 1
    assert any("split across devices" in v for v in tied.violations(placement))
    assert tied.check([1] * 30) == tuple([1] * 30)


def test_malformed_placements_are_reported():
    p = problem()
    assert "entries" in p.violations([0] * 3)[0]
    assert "outside" in p.violations([2] * 30)[0]


def test_colocation_leader_is_the_lowest_group_of_each_merged_set():
    g = random_grouped_graph(10, seed=1)
    g.graph["colocate"] = [[2, 7], [7, 9], [4, 5]]
    p = PlacementProblem(g, parse_cluster("cpu:0,cpu:1"))
    assert p.colocation_leader == (0, 1, 2, 3, 4, 4, 6, 2, 8, 2)
