"""lower_bound and summarize on a hand-made grouped graph with known numbers."""

import json

import networkx as nx
import pytest

from graphs.bounds import LowerBound, lower_bound, microbatch_factor, microbatch_table
from graphs.summary import format_summary, summarize


def grouped(costs_cpu, costs_cuda, edges):
    """Groups with fwd = bwd = cost / 2 on each kind."""
    g = nx.DiGraph(name="hand", fingerprint="f", device_kinds=["cpu", "cuda"], colocate=[])
    for i, (cpu, cuda) in enumerate(zip(costs_cpu, costs_cuda)):
        g.add_node(i, name=f"g{i}", members=[f"n{i}"], fwd_ms={"cpu": cpu / 2, "cuda": cuda / 2},
                   bwd_ms={"cpu": cpu / 2, "cuda": cuda / 2}, opt_ms={"cpu": 0.0, "cuda": 0.0},
                   param_bytes=10 * i, grad_bytes=10 * i, opt_bytes=0, act_bytes=1, out_bytes=4, op_mix={"linear": 1})
    g.add_edges_from(edges, bytes=4)
    return g


# a diamond 0 -> {1, 2} -> 3 plus a lone group 4
DIAMOND = grouped([2, 10, 4, 6, 8], [1, 1, 1, 1, 1], [(0, 1), (0, 2), (1, 3), (2, 3)])


def test_critical_path_dominates_on_many_devices():
    assert lower_bound(DIAMOND, ["cpu"] * 4) == LowerBound(critical_path_ms=18.0, work_ms=7.5, bound_ms=18.0)


def test_work_dominates_on_one_device():
    assert lower_bound(DIAMOND, ["cpu"]) == LowerBound(critical_path_ms=18.0, work_ms=30.0, bound_ms=30.0)


def test_fastest_kind_present_is_used():
    # with a GPU in the cluster every group costs 1 ms there
    assert lower_bound(DIAMOND, ["cpu", "cuda"]) == LowerBound(critical_path_ms=3.0, work_ms=2.5, bound_ms=3.0)


def test_unprofiled_kind_or_no_device_is_an_error():
    cpu_only = grouped([1], [1], [])
    for data in cpu_only.nodes.values():
        del data["fwd_ms"]["cuda"], data["bwd_ms"]["cuda"]
    with pytest.raises(ValueError, match="profiled on"):
        lower_bound(cpu_only, ["cuda"])
    with pytest.raises(ValueError):
        lower_bound(DIAMOND, [])


def test_summary_keys_and_text():
    ops = nx.DiGraph(name="hand", fingerprint="f", device_kinds=["cpu", "cuda"], granularity="op")
    for i in DIAMOND:
        data = dict(DIAMOND.nodes[i])
        ops.add_node(f"n{i}", **data)
    ops.add_edges_from((f"n{u}", f"n{v}") for u, v in DIAMOND.edges())
    s = summarize(ops, DIAMOND, ["cpu", "cpu"], bound=lower_bound(DIAMOND, ["cpu", "cpu"]), notes=["a note"])
    json.dumps(s)  # JSON-ready
    assert (s["nodes"], s["edges"], s["groups"]) == (5, 4, 5)
    assert s["param_bytes"] == 100 and s["memory"]["act_bytes"] == 5
    assert s["compute_ms"] == {"cpu": 30.0, "cuda": 5.0}
    assert s["critical_path_ms"] == 18.0 and s["lower_bound_ms"] == 18.0 and s["work_ms"] == 15.0
    assert [h["name"] for h in s["heaviest_groups"]] == ["g1", "g4", "g3", "g2", "g0"]
    assert s["heaviest_groups"][0] == {"name": "g1", "ms": 10.0, "bytes": 21}
    text = format_summary(s)
    assert "lower bound  18.00 ms" in text and "g1" in text and "note: a note" in text


# ----------------------------------------------------------------------------- true bounds
def test_a_profile_scale_above_one_is_undone_and_one_below_kept():
    from graphs.bounds import cost_floor

    scaled = DIAMOND.copy()
    scaled.graph["profile_scale"] = {"cpu": 2.0, "cuda": 0.5}
    assert cost_floor(scaled) == {"cpu": 0.5, "cuda": 1.0}
    bound = lower_bound(scaled, ["cpu"] * 4, floor=cost_floor(scaled))
    assert bound == LowerBound(critical_path_ms=9.0, work_ms=3.75, bound_ms=9.0)
    # a calibration that found the machine faster than profiled lowers it further; a slower one does not raise it
    assert cost_floor(scaled, {"cpu": 0.8, "cuda": 1.3}) == {"cpu": 0.4, "cuda": 1.0}


def test_the_fastest_whole_step_lowers_every_cost_by_its_share_of_the_median():
    from graphs.bounds import cost_floor

    spread = DIAMOND.copy()
    spread.graph["profile_scale"] = {"cpu": 2.0, "cuda": 0.5}
    spread.graph["whole_step_spread"] = {"cpu": 0.5, "cuda": 0.75}  # least samples at half and 3/4 of the median
    assert cost_floor(spread) == {"cpu": 0.25, "cuda": 0.75}
    assert lower_bound(spread, ["cpu"] * 4, floor=cost_floor(spread)).bound_ms == 18.0 * 0.25


def test_virtual_cpu_devices_work_no_faster_than_the_host_has_cores():
    assert lower_bound(DIAMOND, ["cpu"] * 4, cores=2).work_ms == 15.0
    assert lower_bound(DIAMOND, ["cpu"] * 4, cores=8).work_ms == 7.5


def test_pipelining_shortens_the_critical_path_by_the_microbatch_count_at_its_cost():
    piped = DIAMOND.copy()
    piped.graph["microbatch_step_ms_by_kind"] = {"cpu": {1: 100.0, 2: 110.0, 4: 150.0}}
    bound = lower_bound(piped, ["cpu"] * 4, microbatches=(1, 2, 4, 8))  # 8 was not profiled: skipped
    # m=2: critical path 18 * 1.1 / 2 = 9.9, work 7.5 * 1.1 = 8.25; m=4: 18 * 1.5 / 4 = 6.75 but work 11.25
    assert bound.microbatches == 2 and bound.bound_ms == pytest.approx(9.9)
    assert lower_bound(piped, ["cpu"] * 4).bound_ms == 18.0  # without pipelining the chain is whole


def test_a_micro_batch_step_dearer_than_a_larger_batchs_is_held_to_it():
    """A step at batch/4 measured at 150 ms (600 / 4) against 55 at batch/2 was disturbed: it is
    held to 55 (m = 4: 220); batch/8 at 37.5 ms is cheaper than any larger batch's and stays."""
    g = nx.DiGraph(microbatch_step_ms={"1": 100.0, "2": 110.0, "4": 600.0, "8": 300.0})
    assert microbatch_table(g, "cpu") == {1: 100.0, 2: 110.0, 4: 220.0, 8: 300.0}
    assert microbatch_factor(g, "cpu", 4) == pytest.approx(2.2)
    piped = DIAMOND.copy()
    piped.graph["microbatch_step_ms_by_kind"] = {"cpu": {1: 100.0, 2: 110.0, 4: 600.0}}
    # m=4 held to 220: critical path 18 * 2.2 / 4 = 9.9, work 7.5 * 2.2 = 16.5 (the raw 600: 27 and 45)
    bound = lower_bound(piped, ["cpu"] * 4, microbatches=(4,))
    assert (bound.critical_path_ms, bound.bound_ms) == (pytest.approx(9.9), pytest.approx(16.5))


def test_no_simulated_candidate_beats_its_bound():
    """The simulator is one schedule of the same costs (plus transfers and overheads): it
    can never be faster than the bounds, on any placement."""
    import numpy as np

    from envs.sim import Simulator
    from graphs.bounds import candidate_bound
    from graphs.devices import parse_cluster
    from graphs.problem import PlacementProblem
    from graphs.synthetic import random_grouped_graph

    rng = np.random.default_rng(0)
    for seed, devices in [(1, "cpu:0,cpu:1"), (2, "cpu:0,cpu:1,cpu:2,cpu:3"), (3, "cpu:0,cpu:1,cpu:2")]:
        problem = PlacementProblem(random_grouped_graph(30, seed=seed), parse_cluster(devices))
        kinds = [d.kind for d in problem.cluster.devices]
        overall = lower_bound(problem.groups, kinds).bound_ms
        sim = Simulator(problem)
        for _ in range(50):
            placement = rng.integers(0, problem.n_devices, problem.n_groups).tolist()
            bound = candidate_bound(problem.groups, kinds, placement)
            assert overall <= bound + 1e-9 and bound <= sim.simulate(placement).step_ms + 1e-9


@pytest.mark.alone  # a profile taken while another test runs claims too much: measured steps then beat it
def test_no_measured_plan_of_a_small_zoo_model_beats_the_bound_beyond_its_ci(tmp_path, monkeypatch):
    """The bound is true on the real runtime: a measured step's whole confidence interval
    does not lie below it (nor below the candidate's own bound).

    Like is compared with like. A bound is a claim about the machine as it was while
    profiled: a profile taken under load claims too much (its nodes and whole steps ran
    slow), and a step measured in a quieter moment beats it ("measured 4.29 ms, bound
    4.60" on a loaded 2-core host; on one, the bounds of three profiles taken seconds
    apart differed by 40%). So each of 3 rounds profiles afresh (a cache of its own)
    and measures the placements right after, and every measurement is held to the least
    bound of the rounds: the profile's own noise, the spread of its bounds, is allowed
    for, and a round's candidate bounds are scaled down alike (by its overall bound over
    the least). A wrong bound, e.g. twice the critical path, fails as soon as one round
    measures a placement within 2x of a quiet step (the CI's upper end is about the
    slowest of its 5 steps): at load 4 on 2 cores, in two runs of three.
    """
    import torch

    from graphs.bounds import candidate_bound, cost_floor
    from graphs.devices import host_cores
    from graphs.errors import InfeasibleError
    from graphs.problem import build_problem
    from graphs.workload import load_workload
    from placer.baselines import run_baselines
    from placer.runtime.timing import measure_placement

    monkeypatch.setenv("PLACER_CACHE", str(tmp_path))
    spec, rounds = "zoo:transformer:small", 3
    workload = load_workload(spec)
    bounds, measured = [], []  # per round: its overall bound; (name, CI high, candidate bound) of each placement
    threads = torch.get_num_threads()
    try:
        for r in range(rounds):
            problem = build_problem(workload, devices="cpu:0,cpu:1", cache_dir=tmp_path / f"profile{r}")
            kinds = [d.kind for d in problem.cluster.devices]
            floor = cost_floor(problem.groups)
            bounds.append(lower_bound(problem.groups, kinds, floor=floor, cores=host_cores()).bound_ms)
            for name, placement in run_baselines(problem, ["single", "expert", "balanced"]).items():
                if isinstance(placement, InfeasibleError):
                    continue
                step = measure_placement(workload, problem, placement, name, iters=5, warmup=2)
                assert step.feasible, step.reason
                measured.append((r, name, step.ci_ms[1], candidate_bound(problem.groups, kinds, placement,
                                                                          floor=floor)))
    finally:
        torch.set_num_threads(threads)
    least = min(bounds)
    assert measured
    for r, name, high, own in measured:
        noise = bounds[r] / least
        assert high >= least, f"{name}: CI high {high:.2f} ms, bound {least:.2f} (rounds' bounds {bounds})"
        assert high >= own / noise, f"{name}: CI high {high:.2f} ms, candidate bound {own / noise:.2f} (round {r})"
