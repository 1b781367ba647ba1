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
