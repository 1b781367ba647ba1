"""Micro-batch refusals follow the mode the model runs in (new-user trial 10, F3): a
plan with m > 1 applied to a model with batch norm in eval mode runs, exactly as the
plain model (running statistics: rows do not mix); the same placed model switched to
training is refused at its first training call, in one line whose advice is for
whoever holds the plan (placer.apply reads no workload), and following that advice
runs. optimize plans a training step, so it keeps micro-batches off for such a model
in any mode."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import placer
from graphs.capture import owning_module
from graphs.errors import PlanError
from graphs.problem import build_problem
from graphs.workload import Workload
from placer.microbatch_policy import microbatches_off
from placer.plan import plan_from_assignment
from placer.runtime.refusals import PLAN_ADVICE

TWO = ["cpu:0", "cpu:1"]
REFUSED = (r"^plan: module 'bn' \(BatchNorm2d\) [^;]*; set the plan's microbatches to 1 \(the same placement, one "
           r"micro-batch\) or its microbatch_statistics to true \(statistics per micro-batch\)$")


class SmallCNN(nn.Module):
    """[batch, 3, 6, 6] -> [batch, 4]: conv, batch norm, pooling per image, a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def trained_cnn() -> SmallCNN:
    """A SmallCNN whose running statistics are not the initial ones, in eval mode."""
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 6, 6) * 2 + 1)
    return model.eval()


def head_apart(node) -> str:
    return "cpu:1" if owning_module(node).startswith("head") else "cpu:0"


def pipelined(model: nn.Module, x: torch.Tensor, microbatches: int = 4) -> placer.Plan:
    """A two-device plan with `microbatches` micro-batches, made as optimize makes plans
    (from the training capture, whatever mode the model is in)."""
    plan = plan_from_assignment(model, head_apart, TWO, inputs=(x,))
    return replace(plan, microbatches=microbatches, schedule="gpipe")


def batch() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_a_model_in_eval_mode_runs_a_micro_batched_plan_exactly_like_the_plain_model(one_thread):
    model, x = trained_cnn(), batch()
    plain = copy.deepcopy(model)
    placed = placer.apply(model, pipelined(model, x))
    try:
        with torch.no_grad():
            out = placed(x)
        assert all(g.executor.microbatches == 4 for g in placed.graphs)  # split, not run whole
        torch.testing.assert_close(out, plain(x), rtol=0, atol=1e-6)
        placed(x).pow(2).mean().backward()  # with gradients too (fitting a head on frozen statistics)
        plain(x).pow(2).mean().backward()
        for name, p in placed.named_parameters():
            torch.testing.assert_close(p.grad, dict(plain.named_parameters())[name].grad, msg=name)
        for name, b in placed.named_buffers():  # eval updates no statistics
            torch.testing.assert_close(b, dict(plain.named_buffers())[name], rtol=0, atol=0)
    finally:
        placed.close()


def test_the_same_placed_model_switched_to_training_is_refused_at_its_first_training_call(one_thread):
    model, x = trained_cnn(), batch()
    placed = placer.apply(model, pipelined(model, x))
    try:
        placed(x)
        before = {name: b.clone() for name, b in placed.named_buffers()}
        placed.train()
        with pytest.raises(PlanError, match=REFUSED) as info:
            placed(x).sum().backward()
        assert "\n" not in str(info.value) and "workload" not in str(info.value)
        for name, b in placed.named_buffers():  # refused before anything ran
            assert torch.equal(b, before[name]), name
        with pytest.raises(PlanError, match=REFUSED):  # and again, not only once
            placed(x)
        placed.eval()
        torch.testing.assert_close(placed(x), copy.deepcopy(model).eval()(x), rtol=0, atol=1e-6)
    finally:
        placed.close()


def test_a_model_in_training_is_refused_at_its_first_call_and_the_advice_runs(one_thread):
    x = batch()
    model = trained_cnn().train()
    plan = pipelined(model, x)
    placed = placer.apply(model, plan)  # applying is not wrong: the first training call would be
    try:
        with pytest.raises(PlanError, match=REFUSED) as info:
            placed(x)
    finally:
        placed.close()
    assert str(info.value).endswith(f"; {PLAN_ADVICE}")
    for follow in (replace(plan, microbatches=1), replace(plan, microbatch_statistics=True)):
        placed = placer.apply(model, follow)
        try:
            placed(x).sum().backward()
        finally:
            placed.close()


def test_optimize_keeps_micro_batches_off_for_batch_norm_in_either_mode():
    """optimize plans a training step: the model's mode when the workload is built does
    not matter (the capture it searches is the training one)."""
    for model in (trained_cnn(), trained_cnn().train()):
        loaded = Workload(name="cnn", spec="cnn.py", model=model, inputs=(batch(),))
        problem = build_problem(loaded, "cpu:0,cpu:1")
        reason = microbatches_off(loaded, problem)
        assert reason is not None and "(BatchNorm2d)" in reason and "microbatch_statistics = True in the workload" \
            in reason
