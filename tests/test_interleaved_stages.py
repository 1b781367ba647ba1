"""placer.baselines.pipeline.interleaved_stages: stage i on device i mod devices, stages of about equal time."""

from __future__ import annotations

from itertools import groupby

import numpy as np
import pytest

from graphs.devices import parse_cluster
from graphs.problem import PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.baselines.pipeline import interleaved_stages


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_stages_go_round_robin_over_the_devices_in_topological_order(chunks):
    problem = PlacementProblem(random_grouped_graph(36, seed=2, tied_pairs=0), parse_cluster("cpu:0,cpu:1,cpu:2"))
    candidate = interleaved_stages(problem, chunks, microbatches=4)
    stages = [device for device, _ in groupby(candidate.placement)]  # groups are numbered in a topological order
    assert candidate.microbatches == 4
    assert stages == [i % 3 for i in range(3 * chunks)]
    # balanced: no stage takes more than the mean stage plus the largest group
    times = problem.costs.fwd_ms[:, 0] + problem.costs.bwd_ms[:, 0]
    starts = np.flatnonzero(np.diff(candidate.placement, prepend=-1))
    per_stage = np.add.reduceat(times, starts)
    assert per_stage.max() <= times.sum() / (3 * chunks) + times.max() + 1e-9


def test_a_group_sharing_a_parameter_keeps_its_partner_s_device():
    problem = PlacementProblem(random_grouped_graph(36, seed=2, tied_pairs=2), parse_cluster("cpu:0,cpu:1"))
    placement = interleaved_stages(problem, 3, microbatches=2).placement
    leader = problem.colocation_leader
    assert any(leader[g] != g for g in range(36))
    assert all(placement[g] == placement[leader[g]] for g in range(36))


def test_rl_scores_interleaved_stages_only_where_they_can_pipeline():
    from placer.rl.starts import interleaved_candidates

    chain = random_grouped_graph(12, seed=2, tied_pairs=0)
    two = PlacementProblem(chain, parse_cluster("cpu:0,cpu:1"))
    assert interleaved_candidates(two, (1,)) == []  # no micro-batches (e.g. BatchNorm): nothing to interleave
    assert interleaved_candidates(PlacementProblem(chain, parse_cluster("cpu:0")), (1, 2)) == []  # one device
    # 12 groups on 4 devices hold 2 and 3 stages a device, not 4 or 6
    four = PlacementProblem(chain, parse_cluster("cpu:0,cpu:1,cpu:2,cpu:3"))
    assert set(interleaved_candidates(four, (1, 4))) == {interleaved_stages(four, c, 4) for c in (2, 3)}
    assert all(c.microbatches == 4 for c in interleaved_candidates(two, (1, 4)))
