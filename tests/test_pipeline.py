"""placer.baselines.pipeline: contiguous stages balanced min-max by each device's own
forward + backward time under memory caps, with the micro-batch count the simulator
finds fastest."""

from __future__ import annotations

import networkx as nx
import pytest

from graphs.devices import Cluster, Device, parse_cluster
from graphs.errors import InfeasibleError
from graphs.problem import Candidate, PlacementProblem
from placer.baselines.pipeline import microbatch_choices, pipeline


def chain(costs: list[dict[str, float]], act_bytes: int = 0, param_bytes: int = 0, batch: int | None = None,
          table: dict | None = None) -> nx.DiGraph:
    """A chain of groups with forward = backward = costs[i][kind] ms."""
    g = nx.DiGraph(name="chain", fingerprint="chain-fp", colocate=[])
    if batch:
        g.graph["batch_size"] = batch
    if table:
        g.graph["microbatch_step_ms"] = table
    for i, ms in enumerate(costs):
        g.add_node(i, name=f"g{i}", members=[f"n{i}"], fwd_ms=dict(ms), bwd_ms=dict(ms),
                   opt_ms={k: 0.0 for k in ms}, param_bytes=param_bytes, grad_bytes=0, opt_bytes=0,
                   act_bytes=act_bytes, out_bytes=0, op_mix={"linear": 1})
        if i:
            g.add_edge(i - 1, i, bytes=1000)
    return g


def test_equal_devices_get_equal_contiguous_stages_and_micro_batches_pay():
    problem = PlacementProblem(chain([{"cpu": 1.0}] * 8), parse_cluster("cpu:0,cpu:1"))
    best = pipeline(problem)
    assert isinstance(best, Candidate)
    assert best.placement == (0, 0, 0, 0, 1, 1, 1, 1)
    assert best.microbatches > 1  # costs scale linearly without a profiled table: more is better here


def test_a_faster_device_takes_a_longer_stage():
    cluster = Cluster(devices=(Device("cuda:0", "cuda", "cuda:0"), Device("cpu", "cpu", "cpu", threads=2)))
    problem = PlacementProblem(chain([{"cpu": 1.0, "cuda": 0.1}] * 11), cluster)
    best = pipeline(problem)
    assert best.placement == (0,) * 10 + (1,)  # 10 x 0.1 on the GPU against 1 x 1.0 on the CPU


def test_micro_batches_whose_activations_do_not_fit_are_not_chosen():
    # 10 rows: 4 micro-batches of 3 hold 1.2x the activations, 5 of 2 hold 1.0x; each stage
    # of 4 groups holds 4 x 100 bytes, a cap of 450 B leaves no room for 1.2x.
    table = {1: 8.0, 2: 8.0, 4: 8.0, 5: 8.0}
    problem = PlacementProblem(chain([{"cpu": 1.0}] * 8, act_bytes=100, batch=10, table=table),
                               parse_cluster("cpu:0,cpu:1", "cpu:0=450B,cpu:1=450B"))
    assert microbatch_choices(problem) == [1, 2, 4, 5]
    best = pipeline(problem)
    assert best.microbatches == 5 and best.placement == (0,) * 4 + (1,) * 4


def test_no_split_that_fits_is_an_infeasible_error():
    problem = PlacementProblem(chain([{"cpu": 1.0}] * 4, param_bytes=1000), parse_cluster("cpu:0,cpu:1", "cpu:0=1KB,cpu:1=1KB"))
    with pytest.raises(InfeasibleError, match="no contiguous split into stages fits"):
        pipeline(problem)


def test_optimize_runs_the_pipeline_heuristic_and_its_row_carries_micro_batches_and_schedule():
    from placer.baselines import HEURISTICS
    from placer.optimize import baseline_rows

    assert "pipeline" in HEURISTICS  # so `placer optimize` and `placer baselines` run it by default
    problem = PlacementProblem(chain([{"cpu": 1.0}] * 8), parse_cluster("cpu:0,cpu:1"))
    rows, candidates = baseline_rows(problem, ["pipeline", "single"], seed=0)
    pipelined, single = rows
    assert pipelined.method == "pipeline" and pipelined.microbatches > 1 and pipelined.schedule == "gpipe"
    assert candidates["pipeline"] == Candidate(tuple(pipelined.placement), pipelined.microbatches)
    assert single.microbatches == 1 and single.schedule is None
