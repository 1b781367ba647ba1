"""experiments/probe_interleave.py: interleaved stages, stage i on device i mod devices."""

from __future__ import annotations

import importlib
from itertools import groupby
from pathlib import Path

import pytest

from graphs.devices import parse_cluster
from graphs.problem import PlacementProblem
from graphs.synthetic import random_grouped_graph

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def probe():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENTS))  # the script imports its siblings
        yield importlib.import_module("probe_interleave")


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_stages_go_round_robin_over_the_devices_in_topological_order(probe, chunks):
    problem = PlacementProblem(random_grouped_graph(36, seed=2, tied_pairs=0), parse_cluster("cpu:0,cpu:1,cpu:2"))
    candidate = probe.interleaved(problem, chunks, microbatches=4)
    stages = [device for device, _ in groupby(candidate.placement)]  # groups are numbered in a topological order
    assert candidate.microbatches == 4
    assert stages == [i % 3 for i in range(3 * chunks)]
