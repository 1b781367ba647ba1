"""The towers workloads in experiments/workloads/ (docs/results.md's branchy runs, the
narrow towers among them): each file's own expert placement over two devices trains
exactly like the unplaced model (tests/equivalence.py). The embeddings and inception
blocks workloads are left out for the suite's time (8 and 5 s here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from graphs.capture import owning_module
from tests.equivalence import check_equivalent
from tests.test_cases import TWO, split_in_two

WORKLOADS = Path(__file__).resolve().parents[1] / "experiments" / "workloads"
FILES = ["narrow_towers.py", "towers.py"]


def load_source(name: str):
    spec = importlib.util.spec_from_file_location(f"placer_workload_{Path(name).stem}", WORKLOADS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", FILES)
def test_the_expert_plan_of_each_experiment_workload_trains_like_the_unplaced_model(name):
    source = load_source(name)

    def on_second(node) -> bool:
        return (source.expert_placement(owning_module(node), len(TWO)) or 0) == 1

    plan = check_equivalent(source, lambda model, inputs: split_in_two(model, inputs, on_second), steps=1)
    assert set(plan.assignment.values()) == set(TWO), "the expert rule puts work on both devices"
