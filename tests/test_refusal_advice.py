"""A micro-batch refusal advises what its reader can change (one wording source:
placer.runtime.microbatch.accepting, ONE_MICROBATCH): whoever holds a plan
(placer.apply, the pipelining backend) the plan's fields, a workload's author
(placer optimize's note) the workload's; the `None` advice never names an input that
batch_dims already mark None, whose true cause is said instead; an fx-leaf BatchNorm
is refused by its mode at the first micro-batched training call, as any batch norm;
and PipelinedModel.train_step without a loss is one of placer's own errors."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import placer
from graphs.capture import owning_module
from graphs.errors import PlanError
from placer.distributed.pipelining import PipelinedModel, plan_pipeline
from placer.plan import plan_from_assignment
from placer.runtime import microbatch
from placer.runtime.microbatch import ONE_MICROBATCH
from placer.runtime.refusals import PLAN_ADVICE, hook_refusal
from tests.test_microbatch_modes import SmallCNN, batch, head_apart

TWO = ["cpu:0", "cpu:1"]


def first_apart(node) -> str:
    """The inputs and the first layer (`a`, or the module at index 0) on cpu:0, the rest on cpu:1: two stages."""
    return "cpu:0" if node.op == "placeholder" or owning_module(node).startswith(("a", "0")) else "cpu:1"


def renormalizing() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 8, max_norm=1.0), nn.Linear(8, 2))


def ids() -> torch.Tensor:
    return torch.randint(50, (8, 5), generator=torch.Generator().manual_seed(2))


def test_a_parameter_update_is_refused_with_the_plans_fields_and_following_them_runs(one_thread):
    model = renormalizing()
    plan = replace(plan_from_assignment(model, first_apart, TWO, inputs=(ids(),)), microbatches=2, schedule="gpipe")
    placed = placer.apply(model, plan)
    try:
        with pytest.raises(PlanError, match=r"^plan: .*updates parameter '0\.weight' in forward, which micro-batches "
                                            r"would update once each; " + re.escape(
                                                microbatch.accepting("plan", "an update per micro-batch")) + "$") as info:
            placed(ids())
    finally:
        placed.close()
    assert "workload" not in str(info.value)
    for follow in (replace(plan, microbatches=1), replace(plan, microbatch_statistics=True)):
        placed = placer.apply(model, follow)
        try:
            placed(ids()).sum().backward()
        finally:
            placed.close()


def test_the_workloads_author_is_advised_the_workloads_field():
    """placer optimize's note (placer.microbatch_policy) reads static_refusal and
    hook_refusal as they are: for the workload's author, who holds no plan yet."""
    model = renormalizing()
    gm = torch.export.export(model, (ids(),), strict=False).module()
    reason = microbatch.static_refusal(gm.graph, gm, "w.py")
    assert reason.endswith("; set microbatch_statistics = True in the workload to accept an update per micro-batch")
    assert "plan" not in reason
    model[0].weight.register_hook(lambda g: g)
    assert hook_refusal("w.py", model).endswith("; remove the hook to allow micro-batches")
    assert hook_refusal("plan", model, reader="plan").endswith(f"; {ONE_MICROBATCH}, or remove the hook")


class VecFirst(nn.Module):
    """forward(v [64], x [B, 32]): `v` a fixed vector, `x` the batch."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, v, x):
        return self.out(torch.relu(self.a(x))) * v.mean()


class Shifted(nn.Module):
    """forward(x [B, 32], w [B, 16]): both batched."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x, w):
        return self.out(torch.relu(self.a(x)) + w)


def test_an_input_marked_none_is_not_offered_as_the_batch_to_mark_again():
    # trial 10 leftover: the advice "mark 'v' unbatched if 'x' holds the batch" left 'x' None: nothing would split
    model = VecFirst()
    inputs = (torch.rand(64), torch.randn(24, 32))
    plan = plan_from_assignment(model, first_apart, TWO, inputs=inputs, batch_dims={"x": None})
    with pytest.raises(PlanError, match=r"has no batch dimension .*: compute it in loss_fn, if 'x' holds the batch, "
                                        r"move its None in batch_dims to 'v' \(batch_dims = \{'v': None\} in the "
                                        r"workload or the plan, not \{'x': None\}\), or " + re.escape(ONE_MICROBATCH)):
        plan_pipeline(model, plan, inputs, microbatches=2)
    unmarked = plan_from_assignment(model, first_apart, TWO, inputs=inputs)  # x went whole for its length
    with pytest.raises(PlanError, match=r"mark 'v' unbatched if 'x' holds the batch \(batch_dims = \{'v': None\}"):
        plan_pipeline(model, unmarked, inputs, microbatches=2)
    plan_pipeline(model, replace(plan, batch_dims={"v": None}), inputs, microbatches=2)  # the advice runs


def test_a_model_failing_beside_an_input_marked_none_is_not_told_its_length_differs():
    model = Shifted()
    inputs = (torch.randn(24, 32), torch.randn(24, 16))  # w as long as the batch: marked None by mistake
    plan = plan_from_assignment(model, first_apart, TWO, inputs=inputs, batch_dims={"w": None})
    with pytest.raises(PlanError, match=r"the model fails on a batch of 2 rows \(RuntimeError: .*\); does it assume a "
                                        r"fixed batch size, or is 'w', which batch_dims mark never split \(None\), "
                                        r"batched too\? Otherwise, " + re.escape(ONE_MICROBATCH) + "$") as info:
        plan_pipeline(model, plan, inputs, microbatches=2)
    assert "length differing" not in str(info.value)


def test_train_step_without_a_loss_is_placers_own_error():
    # called on a stand-in: a PipelinedModel needs a process group of one rank per stage
    stage = SimpleNamespace(loss_fn=None, spec=SimpleNamespace(microbatches=1), plan=SimpleNamespace(source="plan"))
    with pytest.raises(PlanError, match=r"^plan: train_step needs a loss_fn: pass one, or give it to "
                                        r"PipelinedModel\(\.\.\., loss_fn=\.\.\.\)$"):
        PipelinedModel.train_step(stage, (torch.randn(4, 6),))


BN_REFUSED = r"^plan: module 'bn' \(BatchNorm2d\) computes batch statistics in training, over each micro-batch alone; "


def leaf_plan(model: nn.Module) -> placer.Plan:
    """A four-micro-batch plan of a SmallCNN whose BatchNorm is an fx leaf (the workload's `leaf_modules`)."""
    plan = plan_from_assignment(model, head_apart, TWO, inputs=(batch(),), leaf_modules=[nn.BatchNorm2d])
    assert plan.capture.method == "fx"
    return replace(plan, microbatches=4, schedule="gpipe")


def test_an_fx_leaf_batch_norm_applied_in_eval_is_refused_as_batch_norm_once_trained(one_thread):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    placed = placer.apply(model, leaf_plan(model))
    try:
        torch.testing.assert_close(placed(batch()), copy.deepcopy(model)(batch()), rtol=0, atol=1e-6)  # exact in eval
        placed.train()
        for _ in range(2):  # at the first micro-batched training call, and again
            with pytest.raises(PlanError, match=BN_REFUSED + re.escape(PLAN_ADVICE) + "$"):
                placed(batch())
    finally:
        placed.close()


def test_an_fx_leaf_batch_norm_applied_in_training_is_refused_at_its_first_call(one_thread):
    torch.manual_seed(0)
    model = SmallCNN().train()
    plan = leaf_plan(model)
    placed = placer.apply(model, plan)  # applying is not wrong: the first training call would be
    try:
        with pytest.raises(PlanError, match=BN_REFUSED + re.escape(PLAN_ADVICE) + "$"):
            placed(batch())
    finally:
        placed.close()
    placed = placer.apply(model, replace(plan, microbatch_statistics=True))
    try:
        placed(batch()).sum().backward()
    finally:
        placed.close()


def test_placer_apply_does_not_offer_an_input_marked_none_as_the_batch(one_thread):
    model = VecFirst()
    inputs = (torch.rand(64), torch.randn(24, 32))
    plan = plan_from_assignment(model, first_apart, TWO, inputs=inputs, batch_dims={"x": None})
    placed = placer.apply(model, replace(plan, microbatches=2, schedule="gpipe"))
    try:
        with pytest.raises(PlanError, match=r"if 'x' holds the batch, move its None in batch_dims to 'v'"):
            placed(*inputs)
    finally:
        placed.close()


def test_optimize_keeps_micro_batches_off_for_an_fx_leaf_batch_norm_in_either_mode():
    from graphs.problem import build_problem
    from graphs.workload import Workload
    from placer.microbatch_policy import microbatches_off
    from tests.test_microbatch_modes import trained_cnn

    for model in (trained_cnn(), trained_cnn().train()):
        loaded = Workload(name="cnn", spec="cnn.py", model=model, inputs=(batch(),), leaf_modules=(nn.BatchNorm2d,))
        reason = microbatches_off(loaded, build_problem(loaded, "cpu:0,cpu:1"))
        assert reason is not None and "(BatchNorm2d) computes batch statistics" in reason


class ReturnsItsTemperature(nn.Module):
    """As open_clip's CLIP returns `self.logit_scale.exp()` beside the features."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.b(self.a(x)), self.logit_scale.exp()


def test_an_output_that_does_not_depend_on_the_batch_is_named_so_with_a_fix_that_works(one_thread):
    # new-user trial 12: it was called "a loss computed inside the model" with the advice to compute it in loss_fn,
    # which cannot read the model
    from graphs.trace import trace_model
    from placer.microbatch_policy import scalar_output

    model, x = ReturnsItsTemperature(), torch.randn(8, 4)
    note = scalar_output(trace_model(model, inputs=(x,)).gm.graph, "clip.py")
    assert note.startswith("clip.py: output 'exp' does not depend on the batch (a parameter or constant returned")
    plan = plan_from_assignment(model, lambda n: TWO[owning_module(n) == "b"], TWO, inputs=(x,))
    placed = placer.apply(model, replace(plan, microbatches=2, schedule="gpipe"))
    try:
        with pytest.raises(PlanError, match=r"output 'exp' does not depend on the batch .* trains with one "
                                            r"micro-batch: " + re.escape(ONE_MICROBATCH)):
            placed(x)
    finally:
        placed.close()
    placed = placer.apply(model, plan)  # as advised
    try:
        torch.testing.assert_close(placed(x), model(x))
    finally:
        placed.close()
