"""Buffers updated in forward by in-place ops (an EMA: `self.ema.mul_(0.9).add_(y)`)
behave as in eager on any plan: the model's own buffer is updated, wherever the plan
puts the ops, or the plan is refused with one line naming the buffer. The model is the
new-user trial's (emavar.py), one class per way of writing the update."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import placer
from graphs.capture import node_params
from graphs.errors import PlanError
from graphs.trace import trace_model
from placer.distributed import LocalRank, run_local
from placer.plan import Plan, plan_from_assignment

TWO = ["cpu:0", "cpu:1"]
VARIANTS = ["chain", "two", "chain_train", "copy", "lerp", "nograd", "view"]


class Ema(nn.Module):
    """Two linears around a buffer updated in forward the way `variant` says."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.register_buffer("ema", torch.full((16,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        v = self.variant
        if v == "chain":
            self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        elif v == "chain_train":
            if self.training:
                self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        elif v == "two":
            self.ema.mul_(0.9)
            self.ema.add_(0.1 * h.detach().mean(0))
        elif v == "copy":
            self.ema.copy_(0.9 * self.ema + 0.1 * h.detach().mean(0))
        elif v == "lerp":
            self.ema.lerp_(h.detach().mean(0), 0.1)
        elif v == "nograd":
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean(0))
        elif v == "view":  # a running mean kept in a slice, no BatchNorm
            self.ema[:4].mul_(0.5).add_(h.detach().mean(0)[:4])
        return self.b(h - self.ema)


def build(variant: str) -> nn.Module:
    torch.manual_seed(0)
    return Ema(variant)


def batch() -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


def ema_readers(model: nn.Module) -> list[str]:
    """The capture's nodes that read or update `ema`, in fx order."""
    gm = trace_model(model, inputs=(batch(),)).gm
    return [n.name for n in gm.graph.nodes if n.op != "get_attr" and "ema" in node_params(gm, n)]


def spread_plan(model: nn.Module) -> Plan:
    """Nodes dealt to the two devices in turn (every cross edge a hand-off), except that
    nodes sharing a parameter or buffer follow its first reader: a placement that
    splits each chain of updates wherever the graph lets it."""
    gm = trace_model(model, inputs=(batch(),)).gm
    device_of, first = {}, {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op != "get_attr"):
        device = TWO[i % 2]
        for name in node_params(gm, node):
            device = first.setdefault(name, device)
        device_of[node.name] = device
    for node in gm.graph.nodes:  # a get_attr goes with its first reader
        if node.op == "get_attr":
            device_of[node.name] = device_of[next(iter(node.users)).name]
    return plan_from_assignment(model, lambda n: device_of[n.name], TWO, inputs=(batch(),))


def train(model: nn.Module, steps: int = 2) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of `steps` SGD steps and the last step's gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(batch())
        out.square().mean().backward()
        optimizer.step()
        outputs.append(out.detach())
    return outputs, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_like_eager(variant: str, plan_of) -> None:
    eager = build(variant)
    placed = placer.apply(build(variant), plan_of(build(variant)))
    (outs, grads), (outs_p, grads_p) = train(eager), train(placed)
    for a, b in zip(outs, outs_p):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-6, atol=1e-6)
    state = placed.state_dict()
    for name, t in eager.state_dict().items():
        torch.testing.assert_close(state[name], t, rtol=1e-6, atol=1e-6, msg=f"{variant}: {name}")
    eager.eval()
    placed.eval()
    with torch.no_grad():
        torch.testing.assert_close(placed(batch()), eager(batch()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(placed.state_dict()["ema"], eager.ema, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_spread_plan_updates_the_buffer_as_eager_does(variant):
    assert_like_eager(variant, spread_plan)


@pytest.mark.parametrize("variant", ["chain", "view"])
def test_the_updates_of_a_chain_are_kept_with_their_buffer(variant):
    readers = ema_readers(build(variant))
    assert {"mul_", "add_"} <= set(readers)  # add_ (captured as add_(mul_, ...)) counts as updating `ema`


@pytest.mark.parametrize("variant", ["chain", "two", "copy", "view"])
def test_a_plan_that_splits_the_updates_of_a_buffer_is_refused_in_one_line(variant):
    model = build(variant)
    readers = ema_readers(model)
    plan = spread_plan(model)
    assignment = {**plan.assignment, **{name: "cpu:1" if i == 0 else "cpu:0" for i, name in enumerate(readers)}}
    split = dataclasses.replace(plan, assignment=assignment, groups=None, placement=None)
    with pytest.raises(PlanError, match=r"splits buffer 'ema' across cpu:. \(node '\w+'\) and cpu:. \(node "
                                          r"'\w+'\): the model \(Ema\) uses it") \
            as caught:
        placer.apply(build(variant), split)
    assert "\n" not in str(caught.value)


def test_micro_batches_refuse_a_buffer_updated_through_a_chain_or_a_no_grad_block():
    from placer.runtime.microbatch import static_refusal

    for variant in ("chain", "nograd", "view"):
        gm = trace_model(build(variant), inputs=(batch(),)).gm
        refusal = static_refusal(gm.graph, gm, "plan")  # the root named as a user knows it, not "module ''"
        assert "the model (Ema) updates buffer 'ema' in forward" in refusal and "module ''" not in refusal


def _two_steps_ema(rank: LocalRank) -> tuple[list[float], torch.Tensor]:
    """Two training steps' losses and this rank's `ema` (empty where another rank holds it)."""
    torch.set_num_threads(1)
    losses = [rank.model.train_step(rank.workload.inputs, rank.workload.loss_fn) for _ in range(2)]
    return losses, rank.model.model.ema.detach().clone()


def test_two_gloo_ranks_update_the_buffer_where_it_lives(tmp_path):
    workload = tmp_path / "ema.py"  # the ranks load the model from a workload file
    workload.write_text("import torch\nfrom torch import nn\n\n" + inspect.getsource(Ema)
                        + "\n\ndef build_model():\n    torch.manual_seed(0)\n    return Ema('chain')\n\n"
                        + "def example_inputs():\n    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1))\n")
    results = run_local(str(workload), spread_plan(build("chain")), 2, _two_steps_ema, timeout_s=120)
    eager = build("chain")
    losses = []
    for _ in range(2):
        out = eager(batch())
        loss = out.mean()  # the default loss of one float output (graphs.workload.default_loss)
        loss.backward()
        losses.append(loss.item())
    held = [ema for _, ema in results if ema.numel()]
    assert len(held) == 1  # one rank holds the buffer and updates it
    torch.testing.assert_close(held[0], eager.ema, rtol=1e-6, atol=1e-6)
    for rank_losses, _ in results:
        assert rank_losses == pytest.approx(losses, rel=1e-5)
