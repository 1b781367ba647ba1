"""`batch_dims` means what the user wrote: its keys are the forward's argument names,
whatever the capture calls its placeholders (torch.export renames `input` to
`input_1` and gives a nested argument one placeholder per leaf); None marks an input
never split, which then does not define the batch either; refusals name inputs as the
forward does; the distributed backends refuse a batch of another shape with
placer's own error."""

from __future__ import annotations

import copy
import json
import textwrap
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import placer
from graphs.errors import PlanError, WorkloadError
from graphs.trace import trace_model
from graphs.trace_inputs import input_names, placeholder_dims
from graphs.workload import load_workload
from placer.distributed import LocalRank, run_local
from placer.distributed.launch import Pipelined
from placer.distributed.pipelining import plan_pipeline
from placer.plan import load_plan, plan_from_assignment
from tests.equivalence import check_equivalent
from tests.test_microbatch_options import TWO, ColumnScaled, Scaled, piped
from tests.test_pipelining import NET, layered_plan


class SeqFirst(nn.Module):
    """input: [steps, batch, 6] -> [steps, batch, 6], a running mean over the steps
    between two layers (split along the steps, every later step would change). The
    argument is named `input`, which torch.export renames `input_1`."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, input, ctx=None):  # ctx: an optional pair of [steps, batch, 6] tensors, mixed into input
        x = input if ctx is None else input + ctx[0] * ctx[1]
        h = torch.tanh(self.inp(x))
        steps = torch.arange(1, x.shape[0] + 1, dtype=h.dtype, device=h.device).view(-1, 1, 1)
        return self.out(h.cumsum(0) / steps)


class Pooled(SeqFirst):
    """input: [steps, batch, 6] -> [batch, 6]: the mean over the steps, then a head."""

    def forward(self, input):
        return self.out(torch.tanh(self.inp(input)).mean(0))


def steps_batch(steps: int = 5, batch: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(steps, batch, 6, generator=torch.Generator().manual_seed(steps * 10 + batch)),)


def test_a_placeholder_torch_export_renames_is_named_as_the_forward_names_it():
    traced = trace_model(SeqFirst(), inputs=steps_batch())
    assert traced.method == "export" and [n.name for n in traced.placeholders] == ["input_1"]
    assert input_names(traced) == {"input_1": "input"}
    assert placeholder_dims(traced, {"input": 1}) == {"input_1": 1}
    nested = trace_model(SeqFirst(), inputs=steps_batch(), kwargs={"ctx": (torch.rand(5, 4, 6), torch.rand(5, 4, 6))})
    leaves = [n.name for n in nested.placeholders][1:]
    assert len(leaves) == 2 and input_names(nested) == {"input_1": "input", **dict.fromkeys(leaves, "ctx")}
    assert placeholder_dims(nested, {"ctx": 1, "input": None}) == {"input_1": None, **dict.fromkeys(leaves, 1)}
    assert input_names(trace_model(SeqFirst(), inputs=steps_batch(), method="fx")) == {"input_1": "input"}  # fx too


@pytest.mark.parametrize("statistics", [False, True])
def test_a_seq_first_input_named_input_splits_along_its_named_dimension_and_trains_like_eager(statistics):
    # batch_dims={"input": 1} was looked up as placeholder 'input_1', missed, and the steps (dim 0) split: refused
    # as mixing rows, or, with per-micro-batch statistics accepted, silently wrong
    source = SimpleNamespace(build_model=SeqFirst, example_inputs=steps_batch)
    plan = check_equivalent(source, lambda model, inputs: piped(model, inputs, batch_dims={"input": 1},
                                                                  microbatch_statistics=statistics), seed=False)
    assert plan.batch_dims == {"input": 1} and plan.capture.batch_dims == {"input": 1}
    placed = placer.apply(SeqFirst(), plan)
    try:
        assert placed.executor.batch_dims == {"input_1": 1}
    finally:
        placed.close()


def test_a_plan_whose_batch_dims_name_input_trains_like_eager_however_the_plan_was_made():
    # a plan that names `input` after it was made (by hand, or by placer optimize, which checks no names): its
    # batch_dims missed placeholder 'input_1', the steps were split, and with per-micro-batch statistics accepted
    # nothing refused it: outputs and gradients silently wrong
    source = SimpleNamespace(build_model=SeqFirst, example_inputs=steps_batch)
    check_equivalent(source, lambda model, inputs: replace(piped(model, inputs, microbatch_statistics=True),
                                                           batch_dims={"input": 1}), seed=False)


def test_every_leaf_of_a_nested_argument_splits_along_the_arguments_dimension():
    torch.manual_seed(0)
    model = SeqFirst()
    eager = copy.deepcopy(model)
    placed = placer.apply(model, piped(model, steps_batch(), batch_dims={"input": 1, "ctx": 1}))
    try:
        x, ctx = torch.randn(5, 4, 6), (torch.rand(5, 4, 6), torch.rand(5, 4, 6))
        out, expected = placed(x, ctx=ctx), eager(x, ctx=ctx)  # a capture made on first use, for `ctx`
        torch.testing.assert_close(out, expected)
        out.pow(2).mean().backward()
        expected.pow(2).mean().backward()
        for (name, p), q in zip(placed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        names = input_names(placed.graphs[-1].traced)
        assert placed.graphs[-1].executor.batch_dims == {p: 1 for p in names}
    finally:
        placed.close()


def test_the_pipelining_backend_splits_along_the_dimension_the_forward_input_is_named_with():
    model = SeqFirst()
    plan = piped(model, steps_batch(), batch_dims={"input": 1})
    spec = plan_pipeline(model, plan, steps_batch(), microbatches=2)
    assert spec.dims == {"input_1": 1} and spec.batch == 4


def test_messages_name_an_input_as_the_forward_does():
    model = Pooled()
    placed = placer.apply(model, piped(model, steps_batch()))
    try:
        with pytest.raises(PlanError, match=r"has no batch dimension .*\(batch_dims = \{'input': 1\}\)"):
            placed(*steps_batch())
    finally:
        placed.close()
    with pytest.raises(PlanError, match=r"batch_dims names dimension 5 of input 'input', which has 3 "):
        placer.apply(SeqFirst(), piped(SeqFirst(), steps_batch(), batch_dims={"input": 5}))
    with pytest.raises(PlanError, match=r"batch_dims names 'input_1', which is no input of the model's forward "
                                        r"\(input, ctx\): name one of those$"):
        piped(SeqFirst(), steps_batch(), batch_dims={"input_1": 1})


class VecFirst(nn.Module):
    """forward(v [64], x [B, 32]): `v` is a fixed vector, `x` the batch (new-user trial 10, F2)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, v, x):
        return self.c(torch.relu(self.a(x))) * v.mean()


def vec_first_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(64, generator=g), torch.randn(24, 32, generator=g)


def test_a_first_input_that_is_not_the_batch_is_advised_unbatched_and_so_marked_trains_like_eager():
    model = VecFirst()
    placed = placer.apply(model, piped(model, vec_first_batch()))
    try:  # the advice was batch_dims = {'v': 1}, a dimension v lacks
        with pytest.raises(PlanError, match=r"output '\w+' has no batch dimension .*: compute it in loss_fn, mark 'v' "
                                            r"unbatched if 'x' holds the batch \(batch_dims = \{'v': None\} in the "
                                            r"workload or the plan\), or set the plan's microbatches to 1 \(the "
                                            r"same placement, one micro-batch\)$"):
            placed(*vec_first_batch())
    finally:
        placed.close()
    source = SimpleNamespace(build_model=VecFirst, example_inputs=vec_first_batch)
    plan = check_equivalent(source, lambda m, inputs: piped(m, inputs, batch_dims={"v": None}), seed=False)
    placed = placer.apply(VecFirst(), plan)
    try:
        assert placed.executor.batch_dims == {"v": None}
        v, x = vec_first_batch()
        assert placed.executor.forward({"v": v, "x": x}, grad=False)[1].split.dims == {"x": 0}
    finally:
        placed.close()


@pytest.mark.parametrize("make, width", [(Scaled, 8), (ColumnScaled, 24)])
def test_an_unbatched_input_as_long_as_the_batch_is_advised_none_and_so_marked_trains_like_eager(make, width):
    # new-user trial 10 (F1): a fixed `scale` of 24 beside an example batch of 24 was split; the only fix offered
    # was another example batch size
    example = (torch.randn(24, width), torch.rand(24))
    model = make()
    placed = placer.apply(model, piped(model, example))
    try:
        with pytest.raises(PlanError, match=r"if one is not batched but as long as the batch by chance, mark it never "
                                            r"split \(e\.g\. batch_dims = \{'scale': None\} in the workload or the "
                                            r"plan\) or make the plan from an example batch of another size|is one not "
                                            r"batched, as long as the batch by chance\? If so, mark it never split "
                                            r"\(e\.g\. batch_dims = \{'scale': None\}"):
            placed(*example)
    finally:
        placed.close()
    source = SimpleNamespace(build_model=make, example_inputs=lambda: example)
    check_equivalent(source, lambda m, inputs: piped(m, inputs, batch_dims={"scale": None}), seed=False)


VEC_FIRST_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class VecFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(32, 16), nn.Linear(16, 5)

        def forward(self, v, x, scale):
            return self.c(torch.relu(self.a(x))) * v.mean() * scale


    def build_model():
        return VecFirst()


    def example_inputs():
        return torch.rand(64), torch.randn(24, 32), torch.tensor(2.0)
''')


@pytest.mark.parametrize("value, expected", [
    ("{'v': None}", {"v": None}),
    ("{'scale': None, 'v': None}", {"scale": None, "v": None}),  # a 0-d input may be marked too
    ("{'v': None, 'x': -1}", {"v": None, "x": 1}),  # x defines the batch: 32 rows along its dimension 1
])
def test_a_workload_file_marks_an_input_unbatched_with_none(tmp_path, value, expected):
    path = tmp_path / "vec_first.py"
    path.write_text(VEC_FIRST_FILE + f"\nbatch_dims = {value}\n")
    assert load_workload(str(path)).batch_dims == expected


def test_a_workload_files_batch_dims_other_than_dimensions_or_none_are_refused(tmp_path):
    path = tmp_path / "vec_first.py"
    path.write_text(VEC_FIRST_FILE + "\nbatch_dims = {'v': 'none'}\n")
    with pytest.raises(WorkloadError, match=r"batch_dims\['v'\] = 'none', but v has shape \[64\]: use a whole number "
                                            r"from 0 to 0, or None if v is not batched$"):
        load_workload(str(path))


def test_a_plan_with_an_unbatched_input_round_trips_and_its_file_is_checked(tmp_path):
    model = VecFirst()
    plan = plan_from_assignment(model, lambda n: "cpu:0", ["cpu:0"], inputs=vec_first_batch(), batch_dims={"v": None})
    assert plan.batch_dims == {"v": None} and plan.capture.batch_dims == {}  # the capture keeps no dimension free
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["batch_dims"] == {"v": None}
    assert load_plan(path).batch_dims == {"v": None}
    for field, value, match in [
        ("batch_dims", {"v": "none"}, r"batch_dims must map input names to whole numbers >= 0, found \{'v': 'none'\} "
                                      r"\(or to null: an input never split\)$"),
        ("capture", {**data["capture"], "batch_dims": {"x": None}},
         r"capture.batch_dims must map input names to whole numbers >= 0, found \{'x': None\}$"),
    ]:
        path.write_text(json.dumps({**data, field: value}))
        with pytest.raises(PlanError, match=match):
            load_plan(path)


# -- the distributed backends: a batch of another shape ----------------------------------

def _step_on_half_the_batch(rank: LocalRank) -> tuple[str, str]:
    x, mask = rank.workload.inputs
    try:
        rank.model.train_step((x[:4], mask[:4]), rank.workload.loss_fn)
    except Exception as exc:  # what each backend raises, reported back by name
        return type(exc).__name__, str(exc)
    return "", "no refusal"


@pytest.mark.parametrize("build", [None, Pipelined(1, "gpipe")], ids=["distributed", "pipelining"])
def test_a_distributed_step_on_a_batch_of_another_shape_is_a_plan_error_with_the_fix(tmp_path, build):
    spec = tmp_path / "net.py"
    spec.write_text(NET)
    w = load_workload(str(spec))
    plan = layered_plan(w.fresh_model(), {"a": "cpu:0", "b": "cpu:1", "c": "cpu:1"}, TWO, inputs=w.inputs)
    options = {} if build is None else {"build": build}
    said = run_local(str(spec), plan, 2, _step_on_half_the_batch, timeout_s=180, **options)
    for kind, text in said:
        assert kind == "PlanError", text
        assert text.startswith("batch shapes [(4, 8), (4, 8)] differ from the example batch's [(8, 8), (8, 8)]: ")
        assert "give every step a batch of those shapes" in text
