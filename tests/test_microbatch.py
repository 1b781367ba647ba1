"""Micro-batches (GPipe) behind the placed module: the gradients are the full batch's
for any loss reduction, uneven splits follow torch.chunk, the schedule is GPipe's,
activations of every micro-batch count, and models that micro-batches would change
are refused with one line naming the module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphs.errors import PlanError
from placer.runtime import microbatch
from tests.test_executor import Placed


class Chain(nn.Module):
    def __init__(self, width: int = 12, depth: int = 4):
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])

    def forward(self, x):
        return self.layers(x)


def assert_close_rel(actual, expected, what: str, rtol: float = 1e-5):
    """max |a - e| <= rtol * max |e|: sums over micro-batches round differently."""
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item() + 1e-8, f"{what}: max error {err:.3g}"


def halves(node) -> str:
    """The first two layers on cpu:0, the rest on cpu:1: a two-stage pipeline."""
    return "cpu:0" if node.name.startswith(("layers_0", "layers_1", "layers_2", "layers_3")) else "cpu:1"


def test_an_empty_batch_runs_as_one_call(one_thread):
    # new-user trial 7: its three empty micro-batches were refused as a model that fails on 1 row
    model = Chain()
    placed = Placed(model, halves, microbatches=3)
    x = torch.randn(0, 12)
    assert placed(x).shape == (0, 12) and torch.equal(placed(x), model(x))
    placed.executor.close()


def test_a_batch_the_model_fails_on_whole_raises_what_eager_raises(one_thread):
    # new-user trial 7: a float64 batch was refused as a model that fails on 2 rows ("fixed batch size?")
    model = Chain()
    placed = Placed(model, halves, microbatches=3)
    x = torch.randn(6, 12, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        model(x)
    with pytest.raises(RuntimeError, match="dtype") as caught:
        placed(x)
    assert not isinstance(caught.value, PlanError)
    placed.executor.close()


@pytest.mark.parametrize("m, rows", [(2, 8), (4, 10), (3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradients_are_the_full_batchs_for_any_loss_reduction(m, rows, reduction, one_thread):
    torch.manual_seed(0)
    model = Chain()
    ref = copy.deepcopy(model)
    placed = Placed(model, halves, microbatches=m)
    x, target = torch.randn(rows, 12), torch.randn(rows, 12)
    out = placed(x)
    F.mse_loss(out, target, reduction=reduction).backward()
    expected = ref(x)
    F.mse_loss(expected, target, reduction=reduction).backward()
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close_rel(p.grad, q.grad, f"gradient of {name}")
    placed.executor.close()


def test_the_schedule_is_gpipes(one_thread):
    placed = Placed(Chain(), halves, microbatches=4)
    ex = placed.executor
    ex.timeline = []
    placed(torch.randn(8, 12)).sum().backward()
    events = sorted(ex.timeline, key=lambda e: e.start)
    last_forward = max(e.end for e in events if e.phase == "forward")
    assert all(e.start >= last_forward for e in events if e.phase == "backward")  # all forwards first
    for device in ("cpu:0", "cpu:1"):
        mine = [e for e in events if e.device == device]
        assert [e.microbatch for e in mine if e.phase == "forward"] == [0, 1, 2, 3]
        assert [e.microbatch for e in mine if e.phase == "backward"] == [3, 2, 1, 0]
    ex.close()


def test_activations_of_every_micro_batch_in_flight_are_counted(one_thread):
    peaks = {}
    for m in (1, 2):
        placed = Placed(Chain(), halves, microbatches=m)
        placed.executor.count_activations = True
        placed(torch.randn(8, 12)).sum().backward()
        peaks[m] = dict(placed.executor.peak_bytes)
        placed.executor.close()
    assert peaks[1]["cpu:1"] > 0 and peaks[2] == peaks[1]  # all micro-batches live at the end of forward


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # x: [steps, batch, 6]
        h, _ = self.rnn(x)
        return self.out(h)


def test_a_workload_may_name_another_batch_dimension(one_thread):
    torch.manual_seed(0)
    model = SeqFirst()
    ref = copy.deepcopy(model)
    placed = Placed(model, lambda n: "cpu:1" if n.name == "out" else "cpu:0", microbatches=2, batch_dims={"x": 1})
    x = torch.randn(5, 6, 6)
    out = placed(x)
    out.pow(2).mean().backward()
    expected = ref(x)
    expected.pow(2).mean().backward()
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close_rel(p.grad, q.grad, f"gradient of {name}")
    placed.executor.close()


def test_split_follows_torch_chunk_and_hands_other_inputs_whole():
    x, mask, scale = torch.randn(10, 3), torch.ones(3), 2.0
    s = microbatch.split({"x": x, "mask": mask, "scale": scale}, 4, {})
    assert s.sizes == [3, 3, 3, 1] and s.dims == {"x": 0}
    assert all(p["mask"] is mask and p["scale"] == scale for p in s.inputs)
    assert microbatch.split({"x": torch.randn(4, 3)}, 3, {}).sizes == [2, 2]  # torch.chunk gives 2, not 3
    assert torch.equal(microbatch.gather([p["x"] for p in s.inputs], [0]), x)


def test_the_batch_is_the_first_tensor_inputs_rows_along_each_inputs_own_dimension():
    x, other, row = torch.randn(4, 3), torch.randn(3, 4), torch.randn(4)
    assert microbatch.split_dims({"x": x, "other": other, "row": row, "scale": 2.0}, {}) == {"x": 0, "row": 0}
    assert microbatch.split_dims({"x": x, "other": other}, {"other": 1}) == {"x": 0, "other": 1}
    assert microbatch.split_dims({"scale": 2.0, "flag": torch.tensor(True)}, {}) == {}


# -- refusals -----------------------------------------------------------------------

class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.norm(self.lin(x))


def test_batch_norm_in_training_is_refused_unless_the_workload_accepts_per_micro_batch_statistics(one_thread):
    refused = Placed(Normed(), lambda n: "cpu:1" if n.name == "norm" else "cpu:0", microbatches=2)
    with pytest.raises(PlanError, match=r"module 'norm' \(BatchNorm1d\).*microbatch_statistics to true"):
        refused(torch.randn(8, 6))  # at the first micro-batched call (refusals.capture_refusal)
    refused.executor.close()
    placed = Placed(Normed(), lambda n: "cpu:1" if n.name == "norm" else "cpu:0", microbatches=2,
                    microbatch_statistics=True)
    assert placed(torch.randn(8, 6)).shape == (8, 6)
    placed.executor.close()
    evaluating = Normed().eval()
    Placed(evaluating, lambda n: "cpu:0", microbatches=2).executor.close()  # running statistics: fine


class LossInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, target):
        return F.mse_loss(self.lin(x), target)


def test_an_output_without_a_batch_dimension_is_refused_at_the_first_call(one_thread):
    placed = Placed(LossInside(), lambda n: "cpu:0", microbatches=2, microbatch_statistics=True)
    with pytest.raises(PlanError, match="output 'mse_loss' is a scalar over the whole batch, such as a loss computed inside the model.*compute it in loss_fn"):
        placed(torch.randn(8, 6), torch.randn(8, 6))
    placed.executor.close()


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)


def test_a_reduction_over_the_batch_is_refused_unless_accepted(one_thread):
    placed = Placed(Centered(), lambda n: "cpu:0", microbatches=2)
    with pytest.raises(PlanError, match="node 'mean' reduces over the batch"):
        placed(torch.randn(8, 6))
    placed.executor.close()
    accepted = Placed(Centered(), lambda n: "cpu:0", microbatches=2, microbatch_statistics=True)
    assert accepted(torch.randn(8, 6)).shape == (8, 6)
    accepted.executor.close()


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(x).softmax(0)  # mixes the rows, keeps the shape


def test_mixing_the_rows_without_changing_shapes_is_refused_unless_accepted(one_thread):
    placed = Placed(Softmaxed(), lambda n: "cpu:0", microbatches=2)
    with pytest.raises(PlanError, match=r"^plan: output 'softmax' for rows 0-1 alone differs from those rows of a "
                                        r"3-row batch: the model mixes values along dimension 0 of input 'x'"):
        placed(torch.randn(8, 6))
    placed.executor.close()
    accepted = Placed(Softmaxed(), lambda n: "cpu:0", microbatches=2, microbatch_statistics=True)
    assert accepted(torch.randn(8, 6)).shape == (8, 6)
    accepted.executor.close()


class Noisy(nn.Module):
    """Dropout of every kind, and noise drawn from nothing but shapes."""

    def __init__(self, sampled: bool = False):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.rnn = nn.GRU(6, 6, num_layers=2, dropout=0.5, batch_first=True)
        self.sampled = sampled

    def forward(self, x):  # x: [batch, steps, 6]
        h = F.alpha_dropout(self.drop(self.lin(x)), 0.2, True)
        h = self.rnn(h)[0] + 0.1 * torch.randn_like(h) * (torch.rand(h.shape) > 0.5)
        q = h.unsqueeze(1)
        h = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5).squeeze(1)
        return h * torch.bernoulli(torch.sigmoid(h)) if self.sampled else h


def layout_of(model: nn.Module, x: torch.Tensor) -> microbatch.Layout:
    placed = Placed(model, lambda n: "cpu:1" if n.name == "rnn" else "cpu:0", microbatches=2)
    devices = [torch.device("cpu")] * len(placed.executor.chunks)
    try:
        return microbatch.layout(placed.executor.chunks, devices, {"x": x}, {"x": 0}, placed.output_nodes, "plan")
    finally:
        placed.executor.close()


def test_random_numbers_are_held_fixed_while_the_probe_compares_values(one_thread):
    torch.manual_seed(0)
    x, model = torch.randn(4, 5, 6), Noisy()
    state = torch.get_rng_state()
    found = layout_of(model, x)
    assert found.reduction is None and found.unchecked is None  # compared, and dropout is not mixing
    assert torch.equal(torch.get_rng_state(), state)
    sampled = layout_of(Noisy(sampled=True), x)  # bernoulli of data cannot be held fixed: not compared, said so
    assert sampled.reduction is None
    assert sampled.unchecked.startswith("aten.bernoulli in node 'bernoulli' draws random numbers the probe cannot hold")


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        self.seen.add_(1)
        return self.lin(x)


def test_a_buffer_updated_in_forward_is_refused():
    model = Counting()
    gm = torch.export.export(model, (torch.randn(4, 6),), strict=False).module()
    placed = Placed(gm, lambda n: "cpu:0", gm=gm, microbatches=2)
    with pytest.raises(PlanError, match="updates buffer 'seen' in forward"):
        placed(torch.randn(4, 6))  # at the first micro-batched call (refusals.capture_refusal)
    placed.executor.close()
    assert "updates buffer 'seen'" in microbatch.static_refusal(gm.graph, gm, "plan")  # a plain module will do
    assert microbatch.static_refusal(fx.symbolic_trace(Chain()).graph, Chain(), "plan") is None


def test_a_parameter_updated_in_forward_is_refused_naming_it():
    """new-user trial 8: Embedding(max_norm=...) renormalizes its weight in place; the
    refusal blamed a reduction over the batch."""
    model = nn.Sequential(nn.Embedding(50, 8, max_norm=1.0), nn.Linear(8, 2))
    gm = torch.export.export(model, (torch.randint(50, (4, 5)),), strict=False).module()
    assert "(Embedding) updates parameter '0.weight' in forward" in microbatch.static_refusal(gm.graph, gm, "plan")


def test_schedules_other_than_gpipe_are_for_the_pipelining_backend():
    with pytest.raises(PlanError, match="'1f1b' runs only on the pipelining backend"):
        Placed(Chain(), halves, microbatches=2, schedule="1f1b")
