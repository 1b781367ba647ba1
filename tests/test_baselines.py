"""Baselines: every method returns a valid placement or a clear InfeasibleError."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pymetis
import pytest

from graphs.synthetic import random_grouped_graph, random_op_graph
from graphs.zoo import ZOO
from placer.baselines import BASELINES, repair, run_baselines
from placer.baselines.common import bottleneck_ms
from placer.baselines.schedule import _favourite_children
from graphs.devices import Cluster, Device, parse_cluster
from graphs.errors import InfeasibleError, PlacerError, WorkloadError
from graphs.problem import PlacementProblem

METHODS = sorted(BASELINES)
# Methods that place a model whenever each device can hold most of it; `single`
# needs one device to hold all of it, by definition.
SPREADING = [m for m in METHODS if m != "single"]


def random_problem(n_groups: int = 30, seed: int = 0, devices: str = "cpu:0,cpu:1", cap_share: float | None = None,
                   tied_pairs: int = 3, kinds: tuple[str, ...] = ("cpu",)) -> PlacementProblem:
    """A random DAG; with cap_share, every device may hold that share of the model."""
    groups = random_grouped_graph(n_groups, seed=seed, tied_pairs=tied_pairs, kinds=kinds)
    problem = PlacementProblem(groups=groups, cluster=parse_cluster(devices))
    if cap_share is None:
        return problem
    cap = int(cap_share * problem.costs.memory_bytes.sum())
    memory = ",".join(f"{name}={cap}" for name in problem.cluster.names)
    return dataclasses.replace(problem, cluster=parse_cluster(devices, memory=memory))


def chain_problem(compute_ms: list[float], devices: str = "cpu:0,cpu:1", chains: int = 1) -> PlacementProblem:
    """`chains` independent chains, each with these per-group costs (bwd = 2 x fwd)."""
    g = nx.DiGraph(name="chain", fingerprint="chain", colocate=[], device_kinds=["cpu"])
    for c in range(chains):
        for i, ms in enumerate(compute_ms):
            node = c * len(compute_ms) + i
            g.add_node(node, name=f"chain{c}.layer{i}", members=[f"n{node}"], op_mix={"linear": 1},
                       fwd_ms={"cpu": ms / 3}, bwd_ms={"cpu": 2 * ms / 3}, opt_ms={"cpu": 0.0},
                       param_bytes=1000, grad_bytes=1000, opt_bytes=1000, act_bytes=1000, out_bytes=4096)
            if i:
                g.add_edge(node - 1, node, bytes=4096)
    return PlacementProblem(groups=g, cluster=parse_cluster(devices))


def mixed_cluster(gpu_memory: int | None = None) -> Cluster:
    """One (notional) GPU and the CPU: built directly, since no GPU is needed to plan."""
    return Cluster(devices=(Device("cpu", "cpu", "cpu"), Device("cuda:0", "cuda", "cuda:0", memory_bytes=gpu_memory)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [
    dict(seed=0),
    dict(seed=1, cap_share=0.6),
    dict(seed=2, devices="cpu:0,cpu:1,cpu:2", cap_share=0.45, tied_pairs=5),
    dict(seed=3, n_groups=80, devices="cpu:0,cpu:1,cpu:2,cpu:3,cpu:4", tied_pairs=8),
])
def test_every_method_gives_a_valid_placement(method, case):
    problem = random_problem(**case)
    if method == "single" and "cap_share" in case:
        with pytest.raises(InfeasibleError, match="no single device"):
            BASELINES[method](problem)
        return
    placement = BASELINES[method](problem)
    assert isinstance(placement, tuple) and all(isinstance(d, int) for d in placement)
    assert problem.violations(placement) == []


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reports_a_model_that_cannot_fit(method):
    problem = random_problem(seed=4)
    largest = int(problem.costs.memory_bytes.max())
    capped = dataclasses.replace(problem, cluster=parse_cluster("cpu:0,cpu:1", memory=f"cpu:0={largest - 1},cpu:1={largest - 1}"))
    with pytest.raises(InfeasibleError, match="MiB"):
        BASELINES[method](capped)


@pytest.mark.parametrize("method", SPREADING)
def test_every_method_reports_too_little_memory_in_all(method):
    problem = random_problem(seed=5, tied_pairs=0, cap_share=0.45)
    with pytest.raises(InfeasibleError, match="in all"):
        BASELINES[method](problem)


@pytest.mark.parametrize("method", METHODS)
def test_methods_are_deterministic_for_a_seed(method):
    problem = random_problem(n_groups=40, seed=6, devices="cpu:0,cpu:1,cpu:2")
    assert BASELINES[method](problem, seed=3) == BASELINES[method](problem, seed=3)


def test_metis_really_calls_pymetis(monkeypatch):
    calls = []
    real = pymetis.part_graph

    def recording(nparts, **kwargs):
        calls.append((nparts, kwargs))
        return real(nparts, **kwargs)

    monkeypatch.setattr(pymetis, "part_graph", recording)
    problem = random_problem(seed=7, devices="cpu:0,cpu:1,cpu:2", tied_pairs=2)
    placement = BASELINES["metis"](problem)
    assert problem.violations(placement) == []
    assert len(calls) == 1
    nparts, kwargs = calls[0]
    assert nparts == 3
    assert len(kwargs["vweights"]) == problem.n_groups - 2  # each tied pair is one vertex
    assert sum(kwargs["tpwgts"]) == pytest.approx(1.0)


def test_metis_gives_the_faster_device_more_compute():
    problem = dataclasses.replace(random_problem(n_groups=60, seed=8, kinds=("cpu", "cuda")), cluster=mixed_cluster())
    placement = np.array(BASELINES["metis"](problem))
    assert (placement == 1).sum() > (placement == 0).sum()


def test_single_uses_the_fastest_device_that_fits():
    problem = dataclasses.replace(random_problem(seed=9, kinds=("cpu", "cuda")), cluster=mixed_cluster())
    assert set(BASELINES["single"](problem)) == {1}
    too_small = int(problem.costs.memory_bytes.sum()) - 1
    capped = dataclasses.replace(problem, cluster=mixed_cluster(gpu_memory=too_small))
    assert set(BASELINES["single"](capped)) == {0}


def test_round_robin_deals_groups_in_order():
    problem = random_problem(n_groups=10, devices="cpu:0,cpu:1,cpu:2", tied_pairs=0)
    assert BASELINES["round_robin"](problem) == (0, 1, 2, 0, 1, 2, 0, 1, 2, 0)


def test_sequential_fill_fills_the_first_device_first():
    assert set(BASELINES["sequential_fill"](random_problem(seed=10))) == {0}  # no caps: all on the first
    capped = random_problem(seed=10, cap_share=0.6, tied_pairs=0)
    placement = BASELINES["sequential_fill"](capped)
    assert list(placement) == sorted(placement) and set(placement) == {0, 1}
    used = capped.memory_per_device(placement)
    assert used[0] + capped.costs.memory_bytes[placement.index(1)] > capped.cluster.devices[0].memory_bytes


def test_balanced_blocks_are_contiguous_and_balance_a_chain():
    problem = chain_problem([9.0, 1.0] * 6, devices="cpu:0,cpu:1")  # round robin puts every heavy group on cpu:0
    placement = BASELINES["balanced"](problem)
    assert list(placement) == sorted(placement) and set(placement) == {0, 1}
    assert bottleneck_ms(problem, placement) < bottleneck_ms(problem, BASELINES["round_robin"](problem))
    assert bottleneck_ms(problem, placement) == pytest.approx(30.0)  # the best contiguous cut: 6 heavy+light pairs / 2


def test_balanced_respects_memory_caps_with_contiguous_blocks():
    problem = random_problem(seed=11, cap_share=0.55, tied_pairs=0)
    placement = BASELINES["balanced"](problem)
    assert problem.violations(placement) == []
    assert list(placement) == sorted(placement)


def test_expert_puts_groups_where_the_rule_says():
    groups = random_grouped_graph(40, seed=12)
    ops = random_op_graph(40, seed=12, width=4)  # the graph random_grouped_graph groups: members carry `module`

    def rule(path: str, n_devices: int) -> int | None:
        return {"block0": 1, "block1": 0}.get(path.split(".")[0])

    problem = PlacementProblem(groups=groups, cluster=parse_cluster("cpu:0,cpu:1"), ops=ops, expert=rule)
    placement = BASELINES["expert"](problem)
    for g in range(problem.n_groups):
        block = groups.nodes[g]["name"].split(".")[0]
        preds = sorted(groups.predecessors(g))
        expected = {"block0": 1, "block1": 0}.get(block, placement[preds[0]] if preds else 0)
        assert placement[g] == expected, groups.nodes[g]["name"]
    assert set(placement) == {0, 1}


def broken_rule(path: str, n_devices: int):
    raise KeyError(path)


@pytest.mark.parametrize("rule, problem_text", [
    (lambda path, n: 5, "returned device 5, but there are only 2 devices (0..1)"),
    (lambda path, n: -1, "returned device -1"),
    (lambda path, n: "1", "returned a str; it must return a device index (int) or None"),
    (lambda path, n: 1.0, "returned a float"),
    (broken_rule, "raised KeyError: "),
])
def test_expert_reports_a_broken_rule_as_the_workloads_fault(rule, problem_text):
    problem = dataclasses.replace(random_problem(seed=13), workload="model.py", expert=rule)
    with pytest.raises(WorkloadError) as err:
        BASELINES["expert"](problem)
    message = str(err.value)
    assert message.startswith("model.py: expert_placement('") and ", 2) " in message and "\n" not in message
    assert problem_text in message


def test_expert_without_a_rule_splits_depth_levels_evenly():
    problem = chain_problem([1.0] * 12, devices="cpu:0,cpu:1,cpu:2")
    assert BASELINES["expert"](problem) == (0,) * 4 + (1,) * 4 + (2,) * 4


@pytest.mark.parametrize("method", ["etf", "sct"])
def test_list_schedulers_run_independent_chains_side_by_side(method):
    problem = chain_problem([2.0, 3.0, 1.0, 4.0], devices="cpu:0,cpu:1", chains=2)
    placement = BASELINES[method](problem)
    assert len(set(placement[:4])) == 1 and len(set(placement[4:])) == 1
    assert placement[0] != placement[4]


def test_sct_lp_picks_at_most_one_favourite_child_each_way():
    problem = random_problem(n_groups=60, seed=17, tied_pairs=0)
    favourite = _favourite_children(problem)
    chosen = favourite[favourite >= 0]
    assert len(chosen) == len(set(chosen.tolist())) > 0  # no group is two groups' favourite
    assert all(problem.groups.has_edge(g, int(c)) for g, c in enumerate(favourite) if c >= 0)
    assert list(_favourite_children(chain_problem([1.0] * 5))) == [1, 2, 3, 4, -1]  # a chain never pays a transfer


def test_kernighan_lin_splits_two_chains_along_the_cut_free_line():
    problem = chain_problem([1.0] * 6, devices="cpu:0,cpu:1", chains=2)
    placement = BASELINES["kernighan_lin"](problem)
    assert len(set(placement[:6])) == 1 and len(set(placement[6:])) == 1 and placement[0] != placement[6]


def test_repair_moves_a_split_colocation_set_to_where_its_compute_is():
    problem = chain_problem([1.0, 1.0, 5.0, 1.0])
    problem.groups.graph["colocate"] = [[0, 2]]
    assert repair(problem, (0, 0, 1, 1)) == (1, 0, 1, 1)


def test_repair_moves_groups_off_an_overfull_device():
    problem = random_problem(seed=14, cap_share=0.6)
    placement = repair(problem, (0,) * problem.n_groups)
    assert problem.violations(placement) == []
    assert 0 in placement  # it moves only what it must


def test_repair_repacks_when_no_single_move_fits():
    problem = chain_problem([1.0] * 4)
    for g, kib in enumerate([700, 500, 300, 500]):  # two devices of 1000 KiB: only {700, 300} + {500, 500} fits
        problem.groups.nodes[g].update(param_bytes=kib * 1024, grad_bytes=0, opt_bytes=0, act_bytes=0)
    capped = dataclasses.replace(problem, cluster=parse_cluster("cpu:0,cpu:1", memory="cpu:0=1000KiB,cpu:1=1000KiB"))
    assert repair(capped, (0, 0, 1, 1)) == (0, 1, 0, 1)


def test_run_baselines_collects_placements_and_errors():
    problem = random_problem(seed=15, cap_share=0.6)
    results = run_baselines(problem)
    assert list(results) == list(BASELINES)
    assert isinstance(results["single"], InfeasibleError)
    assert problem.violations(results["etf"]) == []
    with pytest.raises(PlacerError, match="unknown baseline 'nope'"):
        run_baselines(problem, ["nope"])


@pytest.fixture(scope="module")
def large_problem():
    return random_problem(n_groups=2000, seed=16, devices="cpu:0,cpu:1,cpu:2,cpu:3", tied_pairs=20)


@pytest.mark.parametrize("method", METHODS)
def test_methods_scale_to_thousands_of_groups(large_problem, method):
    assert large_problem.violations(BASELINES[method](large_problem)) == []


@pytest.fixture(scope="module")
def zoo_problems(zoo_problem):
    return {name: zoo_problem(name) for name in ZOO}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_zoo_model(zoo_problems, method):
    for name, problem in zoo_problems.items():
        cap = int(0.6 * problem.costs.memory_bytes.sum())
        for cluster in (problem.cluster, parse_cluster("cpu:0,cpu:1", memory=f"cpu:0={cap},cpu:1={cap}")):
            capped = dataclasses.replace(problem, cluster=cluster)
            try:
                placement = BASELINES[method](capped)
            except InfeasibleError:
                assert method == "single" and cluster is not problem.cluster, name
                continue
            assert capped.violations(placement) == [], (name, method)


def test_expert_follows_the_zoo_rule_for_nmt(zoo_problems):
    problem = zoo_problems["nmt"]
    assert set(BASELINES["expert"](problem)) == {0, 1}  # LSTM layer i on device i
