"""The pipeline heuristic on a model with tied weights (new-user trial 10, F5): a GPT-2
whose output layer reads the embedding's weight. A plan keeps a parameter with all its
readers, so the first and last stage share a device and values flow back to it: the
local runtime runs that plan micro-batched and trains like the plain model, and the
pipelining backend, which needs a chain of stages, refuses it in one line naming the
tied parameter and the backend that runs it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from graphs.errors import PlanError
from graphs.problem import build_problem
from graphs.workload import Workload, load_workload
from placer.baselines.pipeline import pipeline
from placer.distributed.pipelining import plan_pipeline
from placer.plan import Plan, make_plan
from tests.equivalence import check_equivalent

CASE = Path(__file__).parent / "cases" / "hf_gpt2_tied_lm_head.py"


@pytest.fixture(scope="module")
def gpt() -> Workload:
    pytest.importorskip("transformers")
    return load_workload(str(CASE))


@pytest.fixture(scope="module")
def heuristic_plan(gpt) -> Plan:
    """The pipeline heuristic's placement on two CPU devices, with two micro-batches
    (the count it picks depends on this host's profile)."""
    problem = build_problem(gpt, "cpu:0,cpu:1")
    candidate = pipeline(problem)
    return make_plan(problem, candidate.placement, "pipeline", microbatches=2, schedule="gpipe")


def test_the_heuristics_plan_keeps_the_tied_weight_and_its_readers_on_one_of_two_devices(gpt, heuristic_plan):
    assert sorted(set(heuristic_plan.assignment.values())) == ["cpu:0", "cpu:1"]
    model = gpt.fresh_model()
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight


def test_the_pipelining_backend_refuses_it_naming_the_tied_parameter_and_the_local_backend(gpt, heuristic_plan):
    with pytest.raises(PlanError, match=r"^plan is not a pipeline: values flow both ways between cpu:\d, cpu:\d \(its "
                                        r"devices do not form contiguous stages: '\w+' and '\w+' read one parameter, "
                                        r"'lm\.(transformer\.wte|lm_head)\.weight', which stays on cpu:\d with its "
                                        r"readers, and '\w+' runs on cpu:\d between them\); the local backend runs "
                                        r"it, micro-batches included: run it with --backend local or --backend "
                                        r"distributed$") as info:
        plan_pipeline(gpt.fresh_model(), heuristic_plan, gpt.inputs)
    assert "\n" not in str(info.value)


def test_the_local_backend_trains_it_micro_batched_like_the_plain_model(gpt, heuristic_plan):
    source = SimpleNamespace(build_model=gpt.fresh_model, example_inputs=lambda: gpt.inputs, loss_fn=gpt.loss_fn)
    plan = check_equivalent(source, lambda model, inputs: heuristic_plan, seed=False)
    assert plan.microbatches == 2
