"""The workload's micro-batch options, from the plan to the engine: `placer.apply`
splits a batch-second model along the dimension the plan names and matches eager
training; without it, micro-batches of such a model are refused or still correct;
batch statistics run per micro-batch only where the plan accepts them."""

from __future__ import annotations

import copy
import textwrap
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import placer
from graphs.capture import owning_module
from graphs.errors import PlanError
from graphs.problem import build_problem
from graphs.workload import Workload, load_workload
from placer.cli import cli
from placer.plan import load_plan, make_plan, plan_from_assignment
from placer.runtime.timing import measure
from tests.equivalence import check_equivalent

TWO = ["cpu:0", "cpu:1"]


class RunningMean(nn.Module):
    """x: [steps, batch, 6] -> [steps, batch, 6]: a running mean over time between two
    layers, so that splitting the steps (dimension 0) would change every later step."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 6)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        steps = torch.arange(1, x.shape[0] + 1, dtype=h.dtype, device=h.device).view(-1, 1, 1)
        return self.out(h.cumsum(0) / steps)


class TimePooled(RunningMean):
    """x: [steps, batch, 6] -> [batch, 6]: the mean over time, then a head."""

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)).mean(0))


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.lin(x)))


def steps_batch(steps: int = 5, batch: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(steps, batch, 6, generator=torch.Generator().manual_seed(steps * 10 + batch)),)


def second_layer_apart(node) -> str:
    """`out` (or `head`) on cpu:1, the rest on cpu:0: a two-stage pipeline."""
    return "cpu:1" if owning_module(node).startswith(("out", "head")) else "cpu:0"


def assert_refused(model: nn.Module, plan: placer.Plan, inputs: tuple, match: str) -> None:
    """The first call of `model` placed by `plan` on `inputs` raises PlanError matching `match`."""
    placed = placer.apply(model, plan)
    try:
        with pytest.raises(PlanError, match=match):
            placed(*inputs)
    finally:
        placed.close()


def piped(model: nn.Module, inputs: tuple, microbatches: int = 2, **options) -> placer.Plan:
    plan = plan_from_assignment(model, second_layer_apart, TWO, inputs=inputs, **options)
    return replace(plan, microbatches=microbatches, schedule="gpipe")


def test_a_batch_second_model_split_along_its_named_dimension_trains_like_the_eager_model():
    source = SimpleNamespace(build_model=RunningMean, example_inputs=steps_batch)
    plan = check_equivalent(source, lambda model, inputs: piped(model, inputs, batch_dims={"x": 1}), seed=False)
    assert plan.microbatches == 2 and plan.batch_dims == {"x": 1}


class SeqFirstAttention(nn.Module):
    """x: [steps, batch, 8] through nn.MultiheadAttention (batch_first=False), whose
    view(steps, batch * heads, d) torch.export records with the example's batch."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.att(x, x, x)[0])


def test_a_seq_first_model_whose_capture_keeps_the_named_batch_dimension_free_trains_like_the_eager_model():
    # new-user trial 5: torch.export kept only dim 0 free, so these micro-batches were refused
    source = SimpleNamespace(build_model=SeqFirstAttention, example_inputs=lambda: (torch.randn(5, 4, 8),))
    plan = check_equivalent(source, lambda model, inputs: piped(model, inputs, batch_dims={"x": 1}), seed=False)
    assert plan.capture.method == "export" and plan.capture.batch_dims == {"x": 1}


def test_a_plan_whose_capture_fixed_the_named_batch_dimension_is_refused_naming_the_capture():
    torch.manual_seed(0)
    model = SeqFirstAttention()
    inputs = (torch.randn(5, 4, 8),)
    made_without = plan_from_assignment(model, second_layer_apart, TWO, inputs=inputs)
    assert_refused(model, replace(made_without, batch_dims={"x": 1}, microbatches=2), inputs,
                   r"the plan's capture may fix the batch's size along dimension 1 of input 'x': torch.export keeps "
                   r"it free only in a capture made with batch_dims naming it, so make the plan again from the "
                   r"workload\. Otherwise, set the plan's microbatches to 1 \(the same placement, one micro-batch\)$")


def test_without_batch_dims_a_batch_second_model_whose_output_loses_the_steps_is_refused():
    model = TimePooled()
    placed = placer.apply(model, piped(model, steps_batch()))
    with pytest.raises(PlanError, match=r"output '\w+' has no batch dimension \(shape \[4, 6\] at 2 rows\).*: "
                                        r"compute it in loss_fn, name the batch's dimension in the workload "
                                        r"\(batch_dims = \{'x': 1\}\) and make the plan again, if it is not 0, or "
                                        r"set the plan's microbatches to 1 \(the same placement, one micro-batch\)$"):
        placed(*steps_batch())
    placed.close()
    named = TimePooled()
    placed = placer.apply(named, piped(named, steps_batch(), batch_dims={"x": 1}))
    torch.testing.assert_close(placed(*steps_batch()), named(*steps_batch()))
    placed.close()


def test_without_batch_dims_a_batch_second_model_that_mixes_its_steps_is_refused_or_correct():
    torch.manual_seed(0)
    model = RunningMean()
    expected = copy.deepcopy(model)(*steps_batch())
    placed = placer.apply(model, piped(model, steps_batch()))
    try:
        out = placed(*steps_batch())
    except PlanError:
        return  # refused: fine
    finally:
        placed.close()
    torch.testing.assert_close(out, expected)


class DroppedRunningMean(RunningMean):
    """RunningMean with dropout before and after the running mean (export: aten.dropout)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(torch.tanh(self.inp(x)))
        steps = torch.arange(1, x.shape[0] + 1, dtype=h.dtype, device=h.device).view(-1, 1, 1)
        return self.out(torch.nn.functional.dropout(h.cumsum(0) / steps, 0.3, self.training))


def test_dropout_is_not_mistaken_for_mixing_and_does_not_hide_it():
    named = DroppedRunningMean()
    placed = placer.apply(named, piped(named, steps_batch(), batch_dims={"x": 1}))
    assert placed(*steps_batch()).shape == (5, 4, 6)  # split along the batch: not refused
    placed.close()
    model = DroppedRunningMean()
    placed = placer.apply(model, piped(model, steps_batch()))
    with pytest.raises(PlanError, match=r"output '\w+' for rows 1-2 alone differs from those rows of a 3-row batch: "
                                        r"the model mixes values along dimension 0 of input 'x', which micro-batches "
                                        r"split; name the batch's dimension in the workload \(batch_dims = \{'x': 1\}\)"
                                        r" and make the plan again, if it is not 0, else "
                                        r"set the plan's microbatches to 1 \(the same placement, one micro-batch\)$"):
        placed(*steps_batch())
    placed.close()


def test_batch_norm_runs_per_micro_batch_only_where_the_plan_accepts_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    refused = Normed()
    assert_refused(refused, piped(refused, (x,)), (x,), r"module 'norm' \(\S*BatchNorm1d\).*; set the plan's "
                   r"microbatches to 1 \(the same placement, one micro-batch\) or its microbatch_statistics to true")
    model = Normed()
    per_half, whole = copy.deepcopy(model), copy.deepcopy(model)
    placed = placer.apply(model, piped(model, (x,), microbatch_statistics=True))
    out = placed(x)
    expected = torch.cat([per_half(x[:4]), per_half(x[4:])])  # each micro-batch normalized by its own statistics
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, whole(x), atol=1e-3)  # not by the whole batch's
    for name, buffer in placed.named_buffers():  # running statistics updated once per micro-batch, in order
        torch.testing.assert_close(buffer.cpu(), dict(per_half.named_buffers())[name])
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    for name, p in placed.named_parameters():
        torch.testing.assert_close(p.grad, dict(per_half.named_parameters())[name].grad)
    placed.close()


def test_a_plan_made_from_the_workload_carries_its_options_to_apply(tmp_path):
    """workload -> problem -> make_plan -> plan file -> apply, as `placer optimize` and a user's loop do."""
    torch.manual_seed(0)
    workload = Workload(name="norm", spec="test:norm", model=Normed(), inputs=(torch.randn(8, 6),),
                        microbatch_statistics=True)
    problem = build_problem(workload, "cpu:0,cpu:1", max_groups=3, cache_dir=str(tmp_path / "cache"))
    assert problem.microbatch_statistics is True
    path = make_plan(problem, [g % 2 for g in range(problem.n_groups)], "alternate", microbatches=2).save(
        tmp_path / "plan.json")
    model = workload.fresh_model()
    per_half = workload.fresh_model()
    placed = placer.apply(model, path)
    x = workload.inputs[0]
    torch.testing.assert_close(placed(x), torch.cat([per_half(x[:4]), per_half(x[4:])]))
    placed.close()



def test_a_seq_first_workloads_plan_keeps_its_batch_dimension_free_from_profile_to_apply(tmp_path):
    """workload with batch_dims -> problem (capture and profile) -> plan file -> apply in micro-batches."""
    torch.manual_seed(0)
    workload = Workload(name="seqfirst", spec="test:seqfirst", model=SeqFirstAttention(), inputs=(torch.randn(5, 4, 8),),
                        batch_dims={"x": 1})
    problem = build_problem(workload, "cpu:0,cpu:1", max_groups=3, cache_dir=str(tmp_path / "cache"))
    plan = make_plan(problem, [g % 2 for g in range(problem.n_groups)], "alternate", microbatches=2)
    assert plan.capture.batch_dims == {"x": 1}
    model, eager = workload.fresh_model(), workload.fresh_model()
    placed = placer.apply(model, load_plan(plan.save(tmp_path / "plan.json")))
    try:
        x = torch.randn(5, 6, 8)
        torch.testing.assert_close(placed(x), eager(x))
    finally:
        placed.close()


class Bag(nn.Module):
    """EmbeddingBag over flat indices with per-bag offsets: the batch is the offsets'."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 8, mode="mean")
        self.out = nn.Linear(8, 3)

    def forward(self, ids, offsets):
        return self.out(self.bag(ids, offsets))


def test_inputs_without_a_common_batch_dimension_are_refused_naming_what_was_split():
    # trial 5: the refusal asked whether the model assumes a fixed batch size
    model = Bag()
    inputs = (torch.randint(0, 50, (20,)), torch.tensor([0, 3, 7, 12]))
    assert_refused(model, piped(model, inputs), inputs,
                   r"only 'ids' was split \(20 rows along dimension 0\); 'offsets' went whole to every micro-batch, "
                   r"its length differing: name each input's batch dimension in batch_dims if they share one, else "
                   r"the model's inputs cannot be split\. Otherwise, set the plan's microbatches to 1 \(the same "
                   r"placement, one micro-batch\)$")


class Scaled(nn.Module):
    """forward(x [B, 8], scale [24]): `scale` is not batched; with 24 rows it is as long as the batch."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(8, 24), nn.Linear(24, 2)

    def forward(self, x, scale, shift=None):  # shift [B, 2]: another argument, another capture
        out = self.out(torch.relu(self.a(x)) * scale.mean())
        return out if shift is None else out + shift


class ColumnScaled(nn.Module):
    """forward(x [B, 24], scale [24]): each column of x scaled; `scale` is not batched."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(24, 24), nn.Linear(24, 2)

    def forward(self, x, scale):
        return self.out(self.a(x) * scale)


@pytest.mark.parametrize("make, width", [(Scaled, 8), (ColumnScaled, 24)])
def test_an_input_the_example_had_not_as_long_as_the_batch_is_never_split(make, width):
    # new-user trial 10: `scale` (24) was split at a batch of 24 rows; the refusal blamed a reduction over the
    # batch, and its advice (accept per-micro-batch statistics) then trained on a split `scale`, silently wrong
    model = make()
    plan = piped(model, (torch.randn(6, width), torch.rand(24)))
    placed = placer.apply(copy.deepcopy(model), plan)
    try:
        for rows in (6, 24, 7):
            x, scale = torch.randn(rows, width), torch.rand(24)
            torch.testing.assert_close(placed(x, scale), model(x, scale))
        if make is Scaled:  # a capture made on first use, for the call with `shift`, splits as the plan's
            x, scale, shift = torch.randn(24, width), torch.rand(24), torch.randn(24, 2)
            torch.testing.assert_close(placed(x, scale, shift), model(x, scale, shift))
    finally:
        placed.close()


@pytest.mark.parametrize("make, width, match", [
    (Scaled, 8, r"micro-batches split 'x' along dimension 0, 'scale' along dimension 0: if one is not batched but "
                r"as long as the batch by chance, mark it never split \(e\.g\. batch_dims = \{'scale': None\} in the "
                r"workload or the plan\) or make the plan from an example batch of another size \(an input it has not "
                r"batch-sized is never split\), or set the plan's microbatches to 1 \(the same placement, one "
                r"micro-batch\): its microbatch_statistics would not fix it\. Otherwise: .*reduces over the batch"),
    (ColumnScaled, 24, r"the model fails on a batch of 2 rows \(RuntimeError: .*\); micro-batches split 'x' along "
                       r"dimension 0, 'scale' along dimension 0: is one not batched, as long as the batch by chance\? "
                       r"If so, mark it never split \(e\.g\. batch_dims = \{'scale': None\} in the workload or the "
                       r"plan\) or make the plan from an example batch of another size \(an input it has not "
                       r"batch-sized is never split\)\. Otherwise, set the plan's microbatches to 1 \(the same "
                       r"placement, one micro-batch\)$"),
])
def test_an_input_as_long_as_the_batch_in_the_example_too_is_named_before_any_other_advice(make, width, match):
    model = make()
    example = (torch.randn(24, width), torch.rand(24))  # the plan's own example: `scale` as long as the batch
    assert_refused(model, piped(model, example), example, match)


BATCH_SECOND_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    batch_dims = {"x": 1}


    class RunningMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.out = nn.Linear(8, 6)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            steps = torch.arange(1, x.shape[0] + 1, dtype=h.dtype).view(-1, 1, 1)
            return self.out(h.cumsum(0) / steps)


    def build_model():
        return RunningMean()


    def example_inputs():
        return (torch.randn(5, 4, 6),)
""")


def test_local_runs_of_a_plan_made_before_the_workload_named_its_batch_dims_follow_the_workload(tmp_path):
    """A plan without batch_dims (made before the workload file named them, or by hand):
    `placer measure` / optimize's measurements (PlacedTrial) and `placer train` split
    along the workload's dimension, as the pipelined launcher does, instead of refusing."""
    spec = tmp_path / "batch_second.py"
    spec.write_text(BATCH_SECOND_FILE)
    workload = load_workload(str(spec))
    assert workload.batch_dims == {"x": 1}
    plan = piped(workload.fresh_model(), workload.inputs)
    assert plan.batch_dims == {} and plan.microbatches == 2
    measured = measure(workload, plan, iters=1, warmup=1)
    assert measured.feasible, measured.notes
    result = CliRunner().invoke(cli, ["train", str(spec), "--plan", str(plan.save(tmp_path / "plan.json")),
                                      "--steps", "1"])
    assert result.exit_code == 0, repr(result.exception)  # a refusal exits with PlanError


class Sampled(RunningMean):
    """x: [steps, batch, 6]: a running mean over the steps, then bernoulli samples of
    it (data-dependent draws the micro-batch probe cannot hold fixed)."""

    def forward(self, x):
        h = super().forward(x)
        return h * torch.bernoulli(torch.sigmoid(h))


def test_micro_batches_the_probe_could_not_check_are_warned_about_once():
    model = Sampled()
    placed = placer.apply(model, piped(model, steps_batch()))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert placed(*steps_batch()).shape == (5, 4, 6)  # not refused: the values were not compared
            placed(*steps_batch())  # the same signature: not probed again
    finally:
        placed.close()
    assert [str(w.message) for w in caught if "probe" in str(w.message)] == [
        "plan: aten.bernoulli in node 'bernoulli' draws random numbers the probe cannot hold fixed: outputs' values "
        "along the split dimension were not compared, so rows mixed along it would go unrefused; where they might, "
        "set the plan's microbatches to 1 (the same placement, one micro-batch)"]


def test_a_hand_edited_plans_batch_dims_that_name_no_input_or_dimension_are_refused():
    # trial 6: {"y": 1} (no such input) and {"x": 5} (a 3-d input) were ignored, the batch split along dim 0
    model = RunningMean()
    plan = piped(model, steps_batch())
    with pytest.raises(PlanError, match=r"batch_dims names 'y', which is no input of the model's forward \(x\): "
                                        r"name one of those$"):
        placer.apply(model, replace(plan, batch_dims={"y": 1}))
    with pytest.raises(PlanError, match=r"batch_dims names dimension 5 of input 'x', which has 3 "
                                        r"\(shape \[5, 4, 6\]\): name the dimension its batch lies along$"):
        placer.apply(model, replace(plan, batch_dims={"x": 5}))  # found on the plan's example batch


class ChainedEma(nn.Module):
    """A buffer updated by a chain of in-place ops and read later in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)
        self.register_buffer("ema", torch.zeros(32))

    def forward(self, x):
        h = self.a(x)
        self.ema.mul_(0.5).add_(h.detach().mean(0))
        return self.b(h + self.ema)


@pytest.mark.parametrize("devices", [TWO, ["cpu:0", "cpu:1", "cpu:2"]])
def test_micro_batches_update_a_buffer_in_turn_as_eager_runs_them(devices):
    # new-user trial 7: every micro-batch's mul_ ran before any add_ (m0 + m1 + m2), and the result varied by run
    torch.manual_seed(0)
    model, x = ChainedEma(), torch.randn(12, 16)
    m = len(devices)

    def assign(node) -> str:
        module = owning_module(node)
        return devices[0] if module == "" else devices[1] if module == "a" else devices[-1]

    plan = replace(plan_from_assignment(copy.deepcopy(model), assign, devices, inputs=(x,), microbatch_statistics=True),
                   microbatches=m)
    placed, eager = placer.apply(copy.deepcopy(model), plan), copy.deepcopy(model)
    try:
        for _ in range(2):
            placed(x).sum().backward()
            for part in x.chunk(m):  # eager, one micro-batch after another
                eager(part).sum().backward()
            torch.testing.assert_close(placed.original.ema, eager.ema)
            for p, q in zip(placed.parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad)
    finally:
        placed.close()


def second_layer_apart_by_index(node) -> str:
    return "cpu:1" if owning_module(node) == "2" else "cpu:0"


def test_a_parameter_with_a_gradient_hook_is_refused_micro_batches_and_the_distributed_backends():
    # new-user trial 10: a clamping hook ran once per micro-batch (a gradient 3x the model's), and the
    # distributed backends trained without it
    from placer.distributed import DistributedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(8, 8)
    plan = plan_from_assignment(model, second_layer_apart_by_index, TWO, inputs=(x,))
    model[0].weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    with pytest.raises(PlanError, match=r"^plan: parameter '0\.weight' has a gradient hook, which micro-batches "
                                        r"would run once each, on each one's share of the gradient; "
                                        r"set the plan's microbatches to 1 \(the same placement, one "
                                        r"micro-batch\), or remove the hook$"):
        placer.apply(model, replace(plan, microbatches=4, schedule="gpipe"))
    eager = copy.deepcopy(model)  # deepcopy leaves hooks behind
    eager[0].weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
    eager(x).sum().backward()
    placed = placer.apply(model, plan)  # one micro-batch: the hook runs once, as in eager
    try:
        placed(x).sum().backward()
        torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad)
    finally:
        placed.close()
    with pytest.raises(PlanError, match=r"parameter '0\.weight' has a gradient hook, which the distributed and "
                                        r"pipelining backends do not run: remove it, or use --backend local"):
        DistributedModel(model, plan, (x,))
