"""The pipelining backend: placer's own cut of the traced graph into stages (no
processes), its refusals, and two or three gloo ranks on loopback running
torch.distributed.pipelining (GPipe and 1F1B) whose parameters after a few steps
equal the unplaced model's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

import placer

from graphs.capture import owning_module
from graphs.errors import PlanError
from graphs.trace import trace_model
from graphs.workload import load_workload
from placer.distributed import (LocalRank, merge_checkpoints, run_local, save_checkpoint,
                                train_pipelined)
from placer.distributed.launch import Pipelined, distributed_model
from placer.distributed.pipelining import plan_pipeline
from placer.distributed.stages import input_only_nodes, split_stages
from placer.plan import Plan, plan_from_assignment
from tests.test_distributed import reference_steps
from tests.test_microbatch_options import RunningMean, piped

THREE = ["cpu:0", "cpu:1", "cpu:2"]
LAYERS = {"a": "cpu:1", "b": "cpu:0", "c": "cpu:2"}  # stage order differs from the device list's

NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        """a -> b -> c; h skips b (passes through its stage); b reads the input `mask`;
        `keep` is made from the input and a buffer alone (every stage makes its own)."""

        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.register_buffer("scale", torch.full((8,), 0.5))

        def forward(self, x, mask):
            h = torch.relu(self.a(x))
            g = self.b(h) * mask
            keep = (x.sum(-1, keepdim=True) > 0).float() * self.scale
            return (self.c(g) + h) * keep


    def build_model():
        return Net()


    def example_inputs():
        return torch.randn(8, 8), (torch.rand(8, 8) > 0.3).float()


    def loss_fn(out, x, mask):
        return (out - x).pow(2).mean()
''')


@pytest.fixture(scope="module")
def net_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("workload") / "net.py"
    path.write_text(NET)
    return str(path)


def layered(gm: fx.GraphModule, devices: dict[str, str]) -> dict[str, str]:
    """A node reading layer L's parameters goes to devices[L]; other nodes to the device
    of the layer last reached in fx order; get_attr nodes to their first user's device."""
    def layer(n: fx.Node) -> str | None:
        names = [str(n.target)] if n.op == "call_module" else [str(a.target) for a in n.all_input_nodes
                                                                 if a.op == "get_attr"]
        return next((name.split(".")[0] for name in names if name.split(".")[0] in devices), None)

    assignment, current = {}, next(iter(devices.values()))
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr"):
            current = devices.get(layer(n), current)
            assignment[n.name] = current
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            assignment[n.name] = assignment[next(iter(n.users)).name] if n.users else current
    return assignment


def layered_plan(model: nn.Module, devices: dict[str, str], device_list: list[str], inputs: tuple | None = None) -> Plan:
    """A plan by `layered`, captured by torch.fx (no `inputs`) or torch.export."""
    assignment = layered(trace_model(model, inputs=inputs).gm, devices)
    return plan_from_assignment(model, lambda n: assignment.get(n.name, device_list[0]), device_list, inputs=inputs)


def run_stages(pipeline, inputs):
    """The stages in turn, each seeing only what it receives and its model inputs."""
    named = dict(zip(pipeline.placeholders, inputs))
    handed: dict = {}
    for s in pipeline.stages:
        seen = {n: handed[n] for n in s.receives} | {n: named[n] for n in s.model_inputs}
        seen.update(zip(s.chunk.outputs, s.chunk.module(*[seen[n] for n in s.chunk.inputs])))
        handed = {n: seen[n] for n in s.sends}
    return fx.node.map_arg(pipeline.output, lambda n: handed[n.name] if n.name in handed else named[n.name])


# -- the cut (no processes) ------------------------------------------------------------

def test_importing_placer_distributed_leaves_torch_pipelining_to_the_pipelining_ranks():
    """torch.distributed.pipelining takes seconds to import: a rank of the other backend
    (and the CLI) never pays for it; a stage of this backend imports it when it is built."""
    code = "import sys, placer.distributed; print('torch.distributed.pipelining' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stages_follow_the_values_and_hand_on_only_activations(net_spec):
    w = load_workload(net_spec)
    model = w.fresh_model()
    gm = trace_model(model).gm
    pipeline = split_stages(gm, gm.graph, layered(gm, LAYERS))
    s0, s1, s2 = pipeline.stages
    assert [s.device for s in pipeline.stages] == ["cpu:1", "cpu:0", "cpu:2"]
    assert s0.receives == () and s1.receives == s0.sends == ("relu",)
    assert s2.receives == s1.sends == ("relu", "mul")  # h passes through stage 1
    assert s1.model_inputs == ("mask",) and s2.model_inputs == ("x",)  # stage 2 makes `keep` from x itself
    pure = input_only_nodes(gm.graph, gm)
    assert {"sum_1", "gt"} <= {n.name for n in pure} and "relu" not in {n.name for n in pure}
    assert any(n.op == "get_attr" and n.target == "scale" for n in pure)  # the buffer
    (out,) = run_stages(pipeline, w.inputs)  # the captured graph returns the output's flat leaves
    assert torch.allclose(out, model(*w.inputs))


def test_an_exported_graph_is_cut_the_same_way(net_spec):
    w = load_workload(net_spec)
    model = w.fresh_model()
    traced = trace_model(model, inputs=w.inputs)
    assert traced.method == "export"
    gm = traced.gm
    pipeline = split_stages(gm, gm.graph, layered(gm, LAYERS))
    assert [s.device for s in pipeline.stages] == ["cpu:1", "cpu:0", "cpu:2"]
    assert [len(s.receives) for s in pipeline.stages] == [0, 1, 2]
    (out,) = run_stages(pipeline, w.inputs)
    assert torch.allclose(out, model(*w.inputs))


def test_a_plan_whose_values_flow_back_is_refused_with_the_other_backend_named(net_spec):
    w = load_workload(net_spec)
    plan = layered_plan(w.fresh_model(), {"a": "cpu:0", "b": "cpu:1", "c": "cpu:0"}, THREE[:2])
    with pytest.raises(PlanError, match=r"is not a pipeline.*--backend distributed$") as info:
        plan_pipeline(w.fresh_model(), plan, w.inputs)
    assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match="is not a pipeline"):  # in the parent, before any rank starts
        train_pipelined(net_spec, plan, 1)


class Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Embedding(4, 4)

    def forward(self, x):
        return self.b(self.a(x).argmax(-1))


def test_values_pipelining_cannot_send_and_bad_micro_batch_counts_are_refused(net_spec):
    model = Argmax()
    plan = layered_plan(model, {"a": "cpu:0", "b": "cpu:1"}, THREE[:2])
    with pytest.raises(PlanError, match=r"'argmax' \(torch.int64, no gradient\).*--backend distributed"):
        plan_pipeline(model, plan, (torch.randn(2, 4),))

    w = load_workload(net_spec)
    plan = layered_plan(w.fresh_model(), LAYERS, THREE)
    with pytest.raises(PlanError, match="8 rows does not split into 3 equal micro-batches"):
        plan_pipeline(w.fresh_model(), plan, w.inputs, microbatches=3)
    with pytest.raises(PlanError, match="1F1B needs at least as many micro-batches as stages"):
        plan_pipeline(w.fresh_model(), plan, w.inputs, microbatches=2, schedule="1f1b")
    spec = plan_pipeline(w.fresh_model(), plan, w.inputs, microbatches=4, schedule="1F1B")
    assert (spec.microbatches, spec.schedule, spec.batch) == (4, "1f1b", 8)
    assert spec.meta["relu"].leaves[0].shape == (2, 8)  # shapes of one micro-batch


# -- ranks ------------------------------------------------------------------------------

def _train_and_save(rank: LocalRank, steps: int, directory: str) -> list[float]:
    torch.set_num_threads(1)
    optimizer = rank.workload.make_optimizer(rank.model.parameters())
    losses = []
    for _ in range(steps):
        rank.model.zero_grad()
        losses.append(rank.model.train_step(rank.workload.inputs, rank.workload.loss_fn))
        optimizer.step()
    save_checkpoint(rank.model, directory)
    return losses


def assert_trained_like_the_unplaced_model(spec: str, plan: Plan, stages: int, microbatches: int, schedule: str,
                                           directory: Path, steps: int = 3, rtol: float = 1e-5,
                                           build=None) -> None:
    results = run_local(spec, plan, stages, _train_and_save, steps, str(directory), timeout_s=180,
                        build=build or Pipelined(microbatches, schedule))
    losses, _, trained = reference_steps(spec, steps)
    state = trained.state_dict()
    assert all(r == results[0] for r in results)  # every rank returns the batch's loss
    assert results[0] == pytest.approx(losses, rel=rtol)
    merged = merge_checkpoints(directory)
    assert set(merged) == set(state)
    for name, expected in state.items():
        scale = expected.float().abs().max().item()
        err = (merged[name].float() - expected.float()).abs().max().item()
        assert err <= rtol * scale + 1e-6, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def test_two_ranks_gpipe_train_the_transformer_like_the_unplaced_model(tmp_path):
    spec = "zoo:transformer"
    w = load_workload(spec)
    gm = trace_model(w.fresh_model(), leaf_modules=w.leaf_modules).gm
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    half = {n.name: "cpu:0" if i < len(body) // 2 else "cpu:1" for i, n in enumerate(body)}
    plan = plan_from_assignment(w.fresh_model(), lambda n: half.get(n.name, "cpu:1"), THREE[:2],
                                leaf_modules=w.leaf_modules)
    assert_trained_like_the_unplaced_model(spec, plan, 2, microbatches=2, schedule="gpipe", directory=tmp_path)


def test_three_ranks_1f1b_pass_values_through_and_train_like_the_unplaced_model(net_spec, tmp_path):
    w = load_workload(net_spec)
    plan = layered_plan(w.fresh_model(), LAYERS, THREE, inputs=w.inputs)
    assert plan.capture.method == "export"
    assert_trained_like_the_unplaced_model(net_spec, plan, 3, microbatches=4, schedule="1f1b", directory=tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["distributed", "pipelining"])
def test_a_cuda_and_cpu_plan_on_two_gloo_ranks_trains_like_the_unplaced_model(net_spec, backend, tmp_path):
    """Rank 0 computes on cuda:0 and hands values to rank 1 on the host through gloo."""
    torch.backends.cuda.matmul.allow_tf32 = False
    w = load_workload(net_spec)
    plan = layered_plan(w.fresh_model(), {"a": "cuda:0", "b": "cpu", "c": "cpu"}, ["cuda:0", "cpu"], inputs=w.inputs)
    build = distributed_model if backend == "distributed" else None
    assert_trained_like_the_unplaced_model(net_spec, plan, 2, microbatches=2, schedule="gpipe", directory=tmp_path,
                                           rtol=1e-4, build=build)


# -- the workload's micro-batch options -------------------------------------------------

STEPS = textwrap.dedent('''
    import torch
    from torch import nn


    class RunningMean(nn.Module):
        """x: [steps, batch, 6]: a running mean over time between two layers."""

        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 6)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            steps = torch.arange(1, x.shape[0] + 1, dtype=h.dtype).view(-1, 1, 1)
            return self.out(h.cumsum(0) / steps)


    def build_model():
        return RunningMean()


    def example_inputs():
        return (torch.randn(5, 4, 6),)


    def loss_fn(out, x):
        return (out - x).pow(2).mean()


    batch_dims = {"x": 1}
''')


def steps_plan(model: nn.Module, inputs: tuple, **options) -> Plan:
    """`inp` on cpu:0, `out` on cpu:1."""
    return plan_from_assignment(model, lambda n: "cpu:1" if owning_module(n).startswith("out") else "cpu:0",
                                THREE[:2], inputs=inputs, **options)


def test_plan_pipeline_splits_along_the_plans_batch_dims_and_honours_its_statistics(tmp_path):
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    w = load_workload(str(path))
    spec = plan_pipeline(w.fresh_model(), steps_plan(w.fresh_model(), w.inputs, batch_dims=w.batch_dims), w.inputs,
                         microbatches=2)
    assert spec.dims == {"x": 1} and spec.batch == 4
    assert spec.meta["div"].leaves[0].shape == (5, 2, 8)  # one micro-batch: every step, half the batch
    with pytest.raises(PlanError, match="5 rows does not split into 2 equal micro-batches"):
        plan_pipeline(w.fresh_model(), steps_plan(w.fresh_model(), w.inputs), w.inputs, microbatches=2)

    normed = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    x = (torch.randn(4, 6),)
    with pytest.raises(PlanError, match="or its microbatch_statistics to true"):
        plan_pipeline(normed, plan_from_assignment(normed, lambda n: "cpu:0", THREE[:1], inputs=x), x, microbatches=2)
    accepting = plan_from_assignment(normed, lambda n: "cpu:0", THREE[:1], inputs=x, microbatch_statistics=True)
    assert plan_pipeline(normed, accepting, x, microbatches=2).microbatches == 2
    # per-micro-batch statistics change the outputs, not how the loss reduces (review: refused as a loss before)
    spec = plan_pipeline(normed, accepting, x, microbatches=2, loss_fn=lambda out, x: out.pow(2).mean())
    assert spec.loss_scale == 0.5


class Centred(nn.Module):
    """x: [batch, 6]: each row less the batch's mean row, between two layers."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize("make, x, head, accepted", [
    (RunningMean, torch.randn(4, 4, 6), r"output '\w+' for rows 1-2 alone differs from those rows of a 3-row "
                                        r"batch: the model mixes values along dimension 0 of input 'x'",
     {"batch_dims": {"x": 1}}),
    (Centred, torch.randn(4, 6), r"reduces over the batch \(output shape \[1, 8\] at 2 rows\)",
     {"microbatch_statistics": True}),
], ids=["steps mixed", "mean over the batch"])
def test_plan_pipeline_refuses_micro_batches_that_mix_rows_as_the_local_runtime_does(make, x, head, accepted):
    """Only the engine's probe on a few rows sees these (no batch norm, no buffer):
    plan_pipeline runs it too, before any rank starts, and refuses with the local
    runtime's message; the same model with its batch named, or its statistics
    accepted, still plans."""
    model = make()
    placed = placer.apply(model, piped(model, (x,)))
    with pytest.raises(PlanError, match=head) as local:
        placed(x)
    placed.close()
    with pytest.raises(PlanError, match=head) as piped_error:
        plan_pipeline(model, piped(model, (x,)), (x,))
    assert str(piped_error.value) == str(local.value)
    spec = plan_pipeline(model, piped(model, (x,), **accepted), (x,))
    assert spec.microbatches == 2 and spec.dims == accepted.get("batch_dims", {"x": 0})


def test_the_launcher_runs_a_plan_with_the_workload_files_batch_dims(tmp_path):
    """A plan made without batch_dims (by hand, or before the workload named them):
    the launcher takes the workload file's, so the two ranks split the batch, not the
    steps, and train like the unplaced model."""
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    spec = str(path)
    w = load_workload(spec)
    plan = steps_plan(w.fresh_model(), w.inputs)
    assert plan.batch_dims == {}
    train_pipelined(spec, plan, 3, checkpoint_dir=tmp_path / "ranks", microbatches=2, schedule="gpipe",
                    timeout_s=180)
    _, _, trained = reference_steps(spec, 3)
    merged = merge_checkpoints(tmp_path / "ranks")
    for name, expected in trained.state_dict().items():
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


# -- how micro-batches' losses make the batch's ------------------------------------------

def test_each_micro_batchs_loss_is_weighted_by_how_the_loss_reduces(net_spec):
    """The mean of the micro-batches' losses for a mean, their sum for a sum (new-user
    trial 6: a summed loss was weighted 1/m, a wrong step with no warning); any other
    combination is refused."""
    w = load_workload(net_spec)
    plan = layered_plan(w.fresh_model(), LAYERS, THREE, inputs=w.inputs)

    def scale(loss_fn):
        return plan_pipeline(w.fresh_model(), plan, w.inputs, microbatches=4, loss_fn=loss_fn).loss_scale

    assert scale(w.loss_fn) == 0.25
    assert scale(lambda out, x, mask: (out - x).pow(2).sum()) == 1.0
    assert plan_pipeline(w.fresh_model(), plan, w.inputs, microbatches=1).loss_scale == 1.0

    def per_kept_entry(out, x, mask):  # normalized by a count that differs between micro-batches
        return ((out - x).pow(2) * mask).sum() / mask.sum()

    with pytest.raises(PlanError, match=r"is neither the mean \(.*\) nor the sum \(.*\) of its 4 micro-batches' "
                                        r"losses .*use --backend local or distributed, which compute it on the "
                                        r"whole batch, or set the plan's microbatches to 1 \(the same "
                                        r"placement, one micro-batch\)$"):
        scale(per_kept_entry)


SUMMED = NET.replace("return (out - x).pow(2).mean()", "return (out - x).pow(2).sum()")


def test_two_ranks_train_a_summed_loss_like_the_unplaced_model(tmp_path):
    spec = tmp_path / "summed.py"
    spec.write_text(SUMMED)
    w = load_workload(str(spec))
    plan = layered_plan(w.fresh_model(), {"a": "cpu:0", "b": "cpu:1", "c": "cpu:1"}, THREE[:2], inputs=w.inputs)
    assert_trained_like_the_unplaced_model(str(spec), plan, 2, microbatches=2, schedule="gpipe",
                                           directory=tmp_path / "ranks")


MASKED = NET.replace("return (out - x).pow(2).mean()", "return ((out - x).pow(2) * mask).sum() / mask.sum()").replace(
    "return torch.randn(8, 8), (torch.rand(8, 8) > 0.3).float()", "return torch.randn(8, 8), torch.ones(8, 8)")


def _step_with_uneven_mask(rank: LocalRank) -> str:
    x, _ = rank.workload.inputs
    mask = torch.ones(8, 8)
    mask[4:, 1:] = 0  # the second micro-batch keeps 4 of 32 entries, the first all 32
    try:
        rank.model.train_step((x, mask))
    except PlanError as exc:
        return str(exc)
    return "no refusal"


def test_a_step_whose_loss_its_micro_batches_do_not_make_is_refused_on_every_rank(tmp_path):
    # new-user trial 7: a masked mean with equal counts in the example batch passed the check, and a later batch
    # with uneven padding trained with wrong gradients
    spec = tmp_path / "masked.py"
    spec.write_text(MASKED)
    w = load_workload(str(spec))
    plan = layered_plan(w.fresh_model(), {"a": "cpu:0", "b": "cpu:1", "c": "cpu:1"}, THREE[:2], inputs=w.inputs)
    assert plan_pipeline(w.fresh_model(), plan, w.inputs, microbatches=2, loss_fn=w.loss_fn).loss_scale == 0.5
    said = run_local(str(spec), plan, 2, _step_with_uneven_mask, timeout_s=180, build=Pipelined(2, "gpipe"))
    assert all("is not what its micro-batches' weighted losses make" in text and "zero them" in text
               for text in said), said
