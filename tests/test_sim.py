"""The simulator's schedule on hand-made graphs with step times worked out by hand,
its feasibility verdicts and timeline, and the calibration fit and cache."""

from __future__ import annotations

import math
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest

from envs.calibrate import calibration_path, fit_calibration, load_calibration, save_calibration
from envs.sim import Calibration, Simulator
from graphs.synthetic import random_grouped_graph
from graphs.devices import Link, parse_cluster
from graphs.problem import Candidate, PlacementProblem

# 1 ms latency and 1 ms per 1000 bytes: transfers easy to add up by hand.
SLOW_LINK = Link(latency_s=1e-3, bandwidth_Bps=1e6)


def grouped(costs: list[tuple[float, float, float]], edges: dict[tuple[int, int], int] = (), colocate=(),
            param_bytes: int = 0) -> nx.DiGraph:
    """A GroupedGraph with (fwd_ms, bwd_ms, opt_ms) per group and bytes per edge."""
    g = nx.DiGraph(name="tiny", fingerprint="tiny-fp", device_kinds=["cpu"], colocate=[list(c) for c in colocate])
    for i, (f, b, o) in enumerate(costs):
        g.add_node(i, name=f"g{i}", members=[f"n{i}"], fwd_ms={"cpu": f}, bwd_ms={"cpu": b}, opt_ms={"cpu": o},
                   param_bytes=param_bytes, grad_bytes=0, opt_bytes=0, act_bytes=0, out_bytes=0, op_mix={"linear": 1})
    for (u, v), nbytes in dict(edges).items():
        g.add_edge(u, v, bytes=nbytes)
    return g


def simulator(graph: nx.DiGraph, devices: str = "cpu:0,cpu:1", memory: str | None = None,
              overhead_ms: float = 0.0, loss_ms: float = 0.0) -> Simulator:
    problem = PlacementProblem(graph, parse_cluster(devices, memory))
    cal = Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK}, chunk_overhead_ms=overhead_ms, loss_ms=loss_ms)
    return Simulator(problem, cal)


def test_chain_on_one_device_is_the_sum_of_its_work_plus_the_loss():
    sim = simulator(grouped([(1, 2, 0), (2, 4, 0), (3, 6, 0)], {(0, 1): 10**6, (1, 2): 10**6}), loss_ms=0.5)
    r = sim.simulate([0, 0, 0])
    assert r.step_ms == pytest.approx(18.5)
    assert r.busy_ms == pytest.approx((18.0, 0.0))
    assert r.feasible and r.reason == ""


def test_parallel_branches_on_two_devices_overlap():
    sim = simulator(grouped([(2, 4, 0), (3, 6, 0)]))
    # forward ends at max(2, 3) = 3; backward ends at max(3 + 4, 3 + 6)
    assert sim.simulate([0, 1]).step_ms == pytest.approx(9.0)
    assert sim.simulate([0, 0]).step_ms == pytest.approx(15.0)


def test_cross_device_edge_pays_latency_and_bandwidth_both_ways():
    sim = simulator(grouped([(1, 1, 0), (1, 1, 0)], {(0, 1): 2000}))
    # fwd g0 0-1, send 1-4 (1 ms + 2000 B at 1 MB/s), fwd g1 4-5; bwd g1 5-6, gradient 6-9, bwd g0 9-10
    assert sim.simulate([0, 1]).step_ms == pytest.approx(10.0)
    assert sim.simulate([0, 0]).step_ms == pytest.approx(4.0)


def test_transfers_on_one_link_wait_for_each_other():
    sim = simulator(grouped([(1, 1, 0)] * 3, {(0, 2): 1000, (1, 2): 1000}))
    # g0 and g1 hand on to g2 by different edges: two chunks on cpu:0, run by priority.
    # fwd: g0 0-1, its output 1-3; g1 1-2, its output waits for the link: 3-5; g2 5-6.
    # bwd: g2 6-7; its gradients, g1's first (backward priority), 7-9 and 9-11; g1 9-10, g0 11-12.
    r = sim.simulate([0, 0, 1], timeline=True)
    assert r.step_ms == pytest.approx(12.0)
    sends = sorted((e["start_ms"], e["end_ms"]) for e in r.timeline if e["kind"] == "xfer" and e["device"] == "cpu:0")
    assert sends == [pytest.approx((1.0, 3.0)), pytest.approx((3.0, 5.0))]


def test_a_chunk_waits_only_for_what_its_groups_need_and_hands_on_outputs_at_its_end():
    sim = simulator(grouped([(1, 1, 0), (1, 1, 0), (1, 1, 0), (1, 1, 0)], {(0, 2): 1000, (1, 3): 0, (2, 3): 0}))
    # fwd: cpu:1 runs g1 at once (0-1; it needs nothing from cpu:0), its output 1-2; g0 0-1 on
    # cpu:0, its output 1-3; g2 3-4, its output 4-5; g3 5-6.
    # bwd: g3 6-7; gradients to g2 7-8 and g1 8-9; g2 8-9, its gradient 9-11; g1 9-10; g0 11-12.
    # (Fused behind g0's input, as fx-order runs were, g1 would wait until 3: 16 ms.)
    r = sim.simulate([0, 1, 1, 0], timeline=True)
    assert r.step_ms == pytest.approx(12.0)
    starts = {(e["kind"], e["group"]): e["start_ms"] for e in r.timeline if e["kind"] in ("fwd", "bwd")}
    assert starts["fwd", 1] == pytest.approx(0.0)
    assert len({e["chunk"] for e in r.timeline if e["kind"] == "fwd"}) == 4


def test_the_optimizer_steps_after_the_whole_backward_cpu_devices_in_turn():
    sim = simulator(grouped([(1, 3, 1), (1, 1, 2)]))
    # loss at 1; backward: cpu:0 1-4, cpu:1 1-2; then the host updates cpu:0 4-5 and cpu:1 5-7
    r = sim.simulate([0, 1], timeline=True)
    assert r.step_ms == pytest.approx(7.0)
    assert r.busy_ms == pytest.approx((5.0, 4.0))
    updates = sorted((e["start_ms"], e["end_ms"], e["device"]) for e in r.timeline if e["kind"] == "opt")
    assert updates == [(4.0, 5.0, "cpu:0"), (5.0, 7.0, "cpu:1")]
    assert sim.simulate([0, 0]).step_ms == pytest.approx(1 + 1 + 3 + 1 + 1 + 2)


@pytest.mark.parametrize("placement, expected", [
    ((0, 0, 0, 0), 9.0),  # one chunk: 0.5 + 4 forward, 0.5 + 4 backward
    ((0, 0, 1, 1), 5.0),  # two chunks side by side: 2.5 forward, 2.5 backward
    ((0, 1, 0, 1), 5.0),  # independent groups on one device need nothing else: one chunk each device
])
def test_every_chunk_pays_one_overhead_per_pass(placement, expected):
    sim = simulator(grouped([(1, 1, 0)] * 4), overhead_ms=0.5)
    assert sim.simulate(placement).step_ms == pytest.approx(expected)


def test_a_chain_across_devices_pays_one_overhead_per_chunk_and_link():
    sim = simulator(grouped([(1, 1, 0)] * 4, {(0, 1): 0, (1, 2): 0, (2, 3): 0}), overhead_ms=0.5)
    # four chunks in a chain: 4 x 1.5 compute and 3 x 1 ms latency, each pass
    assert sim.simulate((0, 1, 0, 1)).step_ms == pytest.approx(2 * (4 * 1.5 + 3 * 1.0))


def test_groups_are_the_atoms_whatever_the_fx_order_of_their_ops():
    """Two independent chains a->c (group 0) and b->d (group 1) traced in the order a,
    b, c, d: the runtime chunks over the plan's groups, so each group stays whole."""
    ops = nx.DiGraph(name="tiny", fingerprint="tiny-fp")
    for order, (name, ms) in enumerate([("a", 1.0), ("b", 1.0), ("c", 3.0), ("d", 1.0)]):
        ops.add_node(name, op="call_function", order=order, fwd_ms={"cpu": ms}, bwd_ms={"cpu": ms})
    ops.add_edge("a", "c", bytes=0)
    ops.add_edge("b", "d", bytes=0)
    groups = grouped([(4, 4, 0), (2, 2, 0)])
    groups.nodes[0]["members"], groups.nodes[1]["members"] = ["a", "c"], ["b", "d"]
    problem = PlacementProblem(groups, parse_cluster("cpu:0,cpu:1"), ops=ops)
    sim = Simulator(problem, Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK}, chunk_overhead_ms=0.5))
    # forward: cpu:0 runs group 0 in one chunk, 0-4.5, beside cpu:1's group 1; backward likewise.
    assert sim.simulate([0, 1]).step_ms == pytest.approx(9.0)
    assert sim.simulate([0, 0]).step_ms == pytest.approx(2 * (0.5 + 6))  # one chunk
    pieces = [e["label"] for e in sim.simulate([0, 1], timeline=True).timeline if e["kind"] == "fwd"]
    assert pieces == ["g0", "g1"]


def test_inputs_and_parameters_are_no_work_and_cross_nothing():
    """A group of only a get_attr (a parameter) makes no chunk and no transfer."""
    ops = nx.DiGraph(name="tiny", fingerprint="tiny-fp")
    ops.add_node("w", op="get_attr", order=0, fwd_ms={"cpu": 0.0}, bwd_ms={"cpu": 0.0})
    ops.add_node("x", op="placeholder", order=1, fwd_ms={"cpu": 0.0}, bwd_ms={"cpu": 0.0})
    ops.add_node("mm", op="call_function", order=2, fwd_ms={"cpu": 2.0}, bwd_ms={"cpu": 2.0})
    ops.add_edge("w", "mm", bytes=10**6)
    ops.add_edge("x", "mm", bytes=10**6)
    groups = grouped([(0, 0, 0), (2, 2, 0)], {(0, 1): 2 * 10**6})
    groups.nodes[0]["members"], groups.nodes[1]["members"] = ["w", "x"], ["mm"]
    problem = PlacementProblem(groups, parse_cluster("cpu:0,cpu:1"), ops=ops)
    sim = Simulator(problem, Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK}, chunk_overhead_ms=0.5))
    assert sim.simulate([0, 1]).step_ms == pytest.approx(2 * 2.5)


def test_compute_scale_multiplies_profiled_costs():
    problem = PlacementProblem(grouped([(1, 2, 1), (2, 4, 1)], {(0, 1): 1}), parse_cluster("cpu:0,cpu:1"))
    cal = Calibration({"cpu": 2.0}, {"cpu": SLOW_LINK}, chunk_overhead_ms=0.0)
    assert Simulator(problem, cal).simulate([0, 0]).step_ms == pytest.approx(2 * 11)


def test_memory_over_a_cap_is_infeasible_and_named():
    sim = simulator(grouped([(1, 1, 0), (1, 1, 0)], param_bytes=1000), memory="cpu:0=1500B")
    r = sim.simulate([0, 0])
    assert not r.feasible and "cpu:0" in r.reason
    assert r.peak_bytes == (2000, 0)
    assert math.isfinite(r.step_ms)
    assert sim.simulate([0, 1]).feasible


def test_split_colocated_groups_are_infeasible():
    sim = simulator(grouped([(1, 1, 0)] * 3, colocate=[(0, 2)]))
    assert not sim.simulate([0, 1, 1]).feasible
    assert "share parameters" in sim.simulate([0, 1, 1]).reason
    assert sim.simulate([1, 0, 1]).feasible


def test_malformed_placement_is_infeasible_not_a_crash():
    sim = simulator(grouped([(1, 1, 0)] * 3))
    for bad in ([0, 1], [0, 1, 2]):
        r = sim.simulate(bad)
        assert not r.feasible and r.step_ms == math.inf and r.reason


def random_problem(n_groups: int = 30, devices: str = "cpu:0,cpu:1,cpu:2", seed: int = 0) -> PlacementProblem:
    return PlacementProblem(random_grouped_graph(n_groups, seed=seed), parse_cluster(devices))


def test_timeline_is_a_consistent_schedule():
    problem = random_problem()
    sim = Simulator(problem, Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK}, chunk_overhead_ms=0.1, loss_ms=0.3))
    placement = np.random.default_rng(1).integers(0, 3, problem.n_groups).tolist()
    r = sim.simulate(placement, timeline=True)
    events = r.timeline
    assert max(e["end_ms"] for e in events) == pytest.approx(r.step_ms)
    assert r.step_ms == sim.simulate(placement).step_ms
    for name in problem.cluster.names:  # one worker per device: its compute never overlaps
        work = sorted((e["start_ms"], e["end_ms"]) for e in events if e["device"] == name and e["kind"] != "xfer")
        assert all(end <= nxt + 1e-9 for (_, end), (nxt, _) in zip(work, work[1:]))
        assert sum(end - start for start, end in work) == pytest.approx(r.busy_ms[problem.cluster.index(name)])
    for label in {e["label"] for e in events if e["kind"] == "xfer"}:  # one link carries one tensor at a time
        sends = sorted((e["start_ms"], e["end_ms"]) for e in events if e["label"] == label)
        assert all(end <= nxt + 1e-9 for (_, end), (nxt, _) in zip(sends, sends[1:]))
    for kind in ("fwd", "bwd"):
        assert sorted(e["group"] for e in events if e["kind"] == kind) == list(range(problem.n_groups))
    start = {(e["kind"], e["group"]): e["start_ms"] for e in events if e["kind"] in ("fwd", "bwd")}
    end = {(e["kind"], e["group"]): e["end_ms"] for e in events if e["kind"] in ("fwd", "bwd")}
    last_fwd = max(v for (k, _), v in end.items() if k == "fwd")
    assert min(v for (k, _), v in start.items() if k == "bwd") >= last_fwd + 0.3 - 1e-9
    for u, v in problem.groups.edges:  # data and gradients arrive before they are used
        assert start["fwd", v] >= end["fwd", u] - 1e-9
        assert start["bwd", u] >= end["bwd", v] - 1e-9
    for e in events:
        if e["kind"] == "xfer":
            src, dst = e["groups"]
            assert e["start_ms"] >= end[e["phase"], src] - 1e-9
            assert start[e["phase"], dst] >= e["end_ms"] - 1e-9


def test_peak_memory_is_the_problems_accounting():
    problem = random_problem()
    placement = [i % 3 for i in range(problem.n_groups)]
    expected = tuple(int(b) for b in problem.memory_per_device(placement))
    assert Simulator(problem).simulate(placement).peak_bytes == expected


def test_calibration_json_round_trip_and_link_spellings():
    cal = Calibration({"cpu": 1.5, "cuda": 0.5}, {"cpu+cuda": (1e-5, 1e10), ("cuda",): Link(2e-5, 5e10)},
                      chunk_overhead_ms=0.2, loss_ms=1.0)
    assert cal.link("cuda", "cpu") == Link(1e-5, 1e10)
    assert cal.link("cuda", "cuda") == Link(2e-5, 5e10)
    assert Calibration.from_json(cal.to_json()) == cal
    fitted = Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK}, pipelined_slowdown=0.2)
    assert Calibration.from_json(fitted.to_json()) == fitted
    older = {k: v for k, v in fitted.to_json().items() if k != "pipelined_slowdown"}
    assert Calibration.from_json(older) == Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK})  # written before it
    # a slowdown of the earlier shape (1 + s (1 - 1/m), field microbatch_slowdown) is not read as this one
    assert Calibration.from_json({**older, "microbatch_slowdown": 0.2}) == Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK})


# loss_ms is not fitted (envs.calibrate._pack): the truth keeps the initial value.
TRUE_CALIBRATION = Calibration({"cpu": 1.3}, {"cpu": Link(0.5e-3, 1e9)}, chunk_overhead_ms=0.2, loss_ms=0.0)


def measured_placements(problem: PlacementProblem, count: int) -> tuple[list[list[int]], list[float]]:
    rng = np.random.default_rng(0)
    placements = [rng.integers(0, problem.n_devices, problem.n_groups).tolist() for _ in range(count)]
    placements.append([0] * problem.n_groups)
    truth = Simulator(problem, TRUE_CALIBRATION)
    return placements, [truth.simulate(p).step_ms for p in placements]


def test_calibration_recovers_known_parameters():
    problem = random_problem(40, "cpu:0,cpu:1", seed=3)
    placements, measured = measured_placements(problem, 30)
    fit = fit_calibration(problem, placements, measured)  # starts from the nominal, far-off calibration
    assert fit.compute_scale["cpu"] == pytest.approx(1.3, rel=0.03)
    assert fit.link("cpu", "cpu").latency_s == pytest.approx(0.5e-3, rel=0.03)
    assert fit.link("cpu", "cpu").bandwidth_Bps == pytest.approx(1e9, rel=0.03)
    assert fit.chunk_overhead_ms == pytest.approx(0.2, rel=0.1)
    fitted = Simulator(problem, fit)
    errors = [abs(fitted.simulate(p).step_ms / m - 1) for p, m in zip(placements, measured)]
    assert max(errors) < 0.02


def test_calibration_recovers_the_micro_batch_slowdown_from_pipelined_measurements():
    problem = random_problem(40, "cpu:0,cpu:1", seed=3)
    truth = Simulator(problem, replace(TRUE_CALIBRATION, pipelined_slowdown=0.3))
    rng = np.random.default_rng(0)
    candidates = [Candidate(tuple(rng.integers(0, 2, problem.n_groups).tolist()), m) for m in (1, 2, 4) * 10]
    candidates.append(Candidate((0,) * problem.n_groups))
    measured = [truth.simulate(c.placement, c.microbatches).step_ms for c in candidates]
    fit = fit_calibration(problem, candidates, measured)
    assert fit.pipelined_slowdown == pytest.approx(0.3, rel=0.1)
    assert fit.compute_scale["cpu"] == pytest.approx(1.3, rel=0.03)
    fitted = Simulator(problem, fit)
    assert max(abs(fitted.simulate(c.placement, c.microbatches).step_ms / t - 1)
               for c, t in zip(candidates, measured)) < 0.02
    held = fit_calibration(problem, candidates, measured, slowdown=False)  # the ablation of the term
    assert held.pipelined_slowdown == 0.0


def test_calibration_keeps_the_loss_time_it_was_given():
    problem = random_problem(40, "cpu:0,cpu:1", seed=3)
    placements, measured = measured_placements(problem, 10)
    initial = Calibration.default(problem.cluster)
    initial = Calibration(initial.compute_scale, initial.links, initial.chunk_overhead_ms, loss_ms=0.7)
    assert fit_calibration(problem, placements, [m * 3 for m in measured], initial=initial).loss_ms == 0.7


def test_calibration_from_one_measurement_stays_sensible():
    problem = random_problem(20, "cpu:0,cpu:1", seed=4)
    placements, measured = measured_placements(problem, 1)
    fit = fit_calibration(problem, placements[:1], measured[:1])
    link = fit.link("cpu", "cpu")
    assert fit.compute_scale["cpu"] > 0 and link.latency_s >= 0 and 0 < link.bandwidth_Bps < math.inf
    assert fit.chunk_overhead_ms >= 0 and fit.loss_ms >= 0
    assert Simulator(problem, fit).simulate(placements[0]).step_ms == pytest.approx(measured[0], rel=0.05)


def test_fit_rejects_mismatched_or_unusable_measurements():
    problem = random_problem(5, "cpu:0,cpu:1")
    with pytest.raises(ValueError):
        fit_calibration(problem, [[0] * 5], [1.0, 2.0])
    with pytest.raises(ValueError):
        fit_calibration(problem, [[0] * 5], [math.inf])


def test_calibration_is_saved_beside_the_profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE", str(tmp_path))
    problem = random_problem(5, "cpu:0,cpu:1")
    assert load_calibration(problem) is None
    path = save_calibration(problem, TRUE_CALIBRATION)
    assert path == calibration_path(problem) and path.is_relative_to(tmp_path)
    assert problem.fingerprint in path.name
    assert load_calibration(problem) == TRUE_CALIBRATION
    other = PlacementProblem(problem.groups, parse_cluster("cpu:0,cpu:1,cpu:2"))
    assert calibration_path(other) != path and load_calibration(other) is None
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable calibration"):
        assert load_calibration(problem) is None


# -- micro-batches (GPipe) ----------------------------------------------------------

def two_stage(table: dict | None = None) -> Simulator:
    graph = grouped([(2, 2, 0), (2, 2, 0)], {(0, 1): 0})
    if table:
        graph.graph["microbatch_step_ms"] = table
    return simulator(graph)


def test_micro_batches_pipeline_forward_then_backward_in_reverse():
    sim = two_stage()
    # m=1: fwd 0-2, link 2-3, 3-5; bwd 5-7, link 7-8, 8-10.
    assert sim.simulate([0, 1]).step_ms == pytest.approx(10.0)
    # m=2 (1 ms a micro-batch, linear): cpu:0 mb0 0-1, mb1 1-2; cpu:1 mb0 2-3, mb1 3-4;
    # backward from 4 on cpu:1 mb1 4-5, mb0 5-6; cpu:0 mb1 6-7, mb0 7-8.
    r = sim.simulate([0, 1], microbatches=2, timeline=True)
    assert r.step_ms == pytest.approx(8.0)
    order = [(e["device"], e["kind"], e["microbatch"]) for e in sorted(r.timeline, key=lambda e: e["start_ms"])
             if e["kind"] in ("fwd", "bwd")]
    assert order == [("cpu:0", "fwd", 0), ("cpu:0", "fwd", 1), ("cpu:1", "fwd", 0), ("cpu:1", "fwd", 1),
                     ("cpu:1", "bwd", 1), ("cpu:1", "bwd", 0), ("cpu:0", "bwd", 1), ("cpu:0", "bwd", 0)]
    assert any("scale linearly" in note for note in sim.notes)


def test_micro_batch_costs_come_from_the_profiled_whole_steps():
    # a micro-batch of half the batch costs 12 / (2 * 10) = 0.6 of the batch: 1.2 ms here;
    # keys as JSON leaves them (strings) are read too.
    sim = two_stage({"1": 10.0, "2": 12.0})
    assert sim.simulate([0, 1], microbatches=2).step_ms == pytest.approx(9.2)
    assert sim.notes == []


def test_the_pipelined_slowdown_scales_every_micro_batch_count_alike_and_leaves_one_alone():
    graph = grouped([(2, 2, 0), (2, 2, 0)], {(0, 1): 0})
    graph.graph["microbatch_step_ms"] = {1: 10.0, 2: 12.0, 4: 16.0}
    problem = PlacementProblem(graph, parse_cluster("cpu:0,cpu:1"))
    cal = Calibration({"cpu": 1.0}, {"cpu": SLOW_LINK}, chunk_overhead_ms=0.0, pipelined_slowdown=0.25)
    sim, plain = Simulator(problem, cal), Simulator(problem, replace(cal, pipelined_slowdown=0.0))
    for m, factor in ((1, 1.0), (2, 1.25), (4, 1.25)):  # one factor for every count above 1
        assert sim.compute_factors(m) == pytest.approx(plain.compute_factors(m) * factor), m
    # 1.2 ms a micro-batch (above) x 1.25 = 1.5: fwd cpu:0 0-1.5, 1.5-3; cpu:1 2.5-4, 4-5.5;
    # bwd cpu:1 5.5-7, 7-8.5; cpu:0 8-9.5, 9.5-11
    assert sim.simulate([0, 1], microbatches=2).step_ms == pytest.approx(11.0)
    assert sim.simulate([0, 1]).step_ms == pytest.approx(10.0)  # one micro-batch: as without it


def test_the_optimizer_step_in_the_profiled_whole_steps_is_paid_once_whatever_the_micro_batches():
    # compute linear in the batch (8 ms whole, 4 + 4 at m = 2) and a 2-ms optimizer step in every
    # profiled step: the profile records 8 + 2 = 10 at m = 1 and 2 x (4 + 2) = 12 at m = 2. A
    # pipelined step runs the optimizer once, so m = 2 on one device costs what m = 1 does.
    graph = grouped([(2, 2, 1), (2, 2, 1)], {(0, 1): 0})
    graph.graph["microbatch_step_ms"] = {1: 10.0, 2: 12.0}
    sim = simulator(graph)
    assert sim.compute_factors(2) == pytest.approx([0.5, 0.5])
    assert sim.simulate([0, 0], microbatches=2).step_ms == pytest.approx(sim.simulate([0, 0]).step_ms)


def test_a_disturbed_micro_batch_step_of_the_profile_is_held_to_a_larger_batchs():
    # a step at batch/4 recorded at 10 ms (40 / 4), dearer than the 6 ms at batch/2: simulated as 6
    disturbed, held = two_stage({"1": 10.0, "2": 12.0, "4": 40.0}), two_stage({"1": 10.0, "2": 12.0, "4": 24.0})
    assert disturbed.simulate([0, 1], microbatches=4).step_ms == pytest.approx(held.simulate([0, 1], 4).step_ms)


def test_memory_counts_every_micro_batch_in_flight():
    graph = grouped([(1, 1, 0), (1, 1, 0)])
    for g in graph.nodes:
        graph.nodes[g]["act_bytes"] = 1000
    graph.graph["batch_size"] = 10
    problem = PlacementProblem(graph, parse_cluster("cpu:0,cpu:1", "cpu:0=2100B"))
    # 10 rows in 4 micro-batches of 3 (torch.chunk): 12 rows' activations live at once
    assert problem.activation_factor(4) == pytest.approx(1.2)
    assert problem.activation_factor(5) == pytest.approx(1.0)
    sim = Simulator(problem)
    assert sim.simulate([0, 0]).feasible
    r = sim.simulate([0, 0], microbatches=4)
    assert not r.feasible and r.peak_bytes == (2400, 0) and "cpu:0 needs 2.3 KiB but has 2.1 KiB" in r.reason


MIXED = "rank0:cpu:0,rank0:cuda:0"  # a GPU named on a rank: the spec needs no GPU on this host


def test_each_device_kind_scales_micro_batches_by_its_own_profiled_steps():
    """cpu: a half batch costs 12 / (2 * 10) = 0.6 of the batch; cuda: 16 / 20 = 0.8. The
    cuda stage (2 ms a pass) then takes 2 x 1.6 = 3.2 ms forward and backward; the old
    rule, the first kind's table for every kind, gave it 2.4."""
    graph = nx.DiGraph(name="mixed", fingerprint="mixed-fp", device_kinds=["cpu", "cuda"], colocate=[])
    for i in range(2):
        graph.add_node(i, name=f"g{i}", members=[f"n{i}"], fwd_ms={"cpu": 1.0, "cuda": 2.0},
                       bwd_ms={"cpu": 1.0, "cuda": 2.0}, opt_ms={"cpu": 0.0, "cuda": 0.0}, param_bytes=0,
                       grad_bytes=0, opt_bytes=0, act_bytes=0, out_bytes=0, op_mix={"linear": 1})
    tables = {"cpu": {"1": 10.0, "2": 12.0}, "cuda": {"1": 10.0, "2": 16.0, "4": 20.0}}
    graph.graph["microbatch_step_ms_by_kind"] = tables
    graph.graph["microbatch_step_ms"] = tables["cpu"]  # the profile's first kind
    problem = PlacementProblem(graph, parse_cluster(MIXED))
    cal = Calibration({"cpu": 1.0, "cuda": 1.0}, {"cpu": SLOW_LINK, "cpu+cuda": SLOW_LINK, "cuda": SLOW_LINK})
    sim = Simulator(problem, cal)
    r = sim.simulate([0, 1], microbatches=2)
    # cpu: 2 x 0.6 = 1.2 forward; cuda: 2 x 1.6 = 3.2 forward, backward from 3.2 to 6.4
    assert r.feasible and r.step_ms == pytest.approx(6.4 + 2 * cal.chunk_overhead_ms * 2)
    # 4 micro-batches: the cpu profile could not run a quarter batch, the cuda one could
    refused = sim.simulate([0, 1], microbatches=4)
    assert not refused.feasible and refused.step_ms == math.inf
    assert refused.reason.startswith("4 micro-batches were not profiled on cpu")
    on_cuda = sim.simulate([1, 1], microbatches=4)  # 4 x (2 + 2) x 20 / (4 x 10) each way, one chunk
    assert on_cuda.feasible and on_cuda.step_ms == pytest.approx(16.0 + 2 * 4 * cal.chunk_overhead_ms)
    assert sim.notes == []
    del graph.graph["microbatch_step_ms"], tables["cpu"]  # no table for cpu at all: linear there, with a note
    sim = Simulator(PlacementProblem(graph, parse_cluster(MIXED)), cal)
    assert sim.simulate([0, 1], microbatches=4).feasible
    assert any("on cpu: micro-batch costs scale linearly" in note for note in sim.notes)
