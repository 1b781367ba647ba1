"""placer.runtime.tensors: who reads each tensor, moving tensors to a plan's devices or
freeing another process's, and making a capture's baked-in devices follow the
placement; the unplaced-node check every frontend shares (placer.plan.trace_for_plan).

CUDA is not available here: `localize` is checked with the "meta" device standing for
a device other than the capture's (the same code path a CUDA rank takes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphs.errors import PlanError
from graphs.trace import trace_model
from placer.plan import plan_from_assignment, trace_for_plan
from placer.runtime.tensors import graph_reads, localize, place_tensors, tensor_readers

META = torch.device("meta")


class Baked(nn.Module):
    """A tied weight, a buffer, a tensor made on the capture's device and a constant
    the capture stows on its graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        h = self.a(x) * self.scale + torch.zeros(x.shape[0], 4, device=x.device) + torch.tensor([0.5])
        return self.b(h) * self.scale


def capture():
    model = Baked()
    return model, trace_model(model, inputs=(torch.randn(3, 4),), method="export").gm


def test_readers_name_each_tensor_once_leave_constants_out_and_refuse_a_split_parameter():
    model, gm = capture()
    readers = tensor_readers(model, graph_reads(gm, lambda n: "cpu:0"), "plan")
    assert set(readers) == {"a.weight", "a.bias", "b.bias", "scale"}  # b.weight is a.weight; no stowed constant
    assert all(devices == ["cpu:0"] for devices in readers.values())
    b_on_1 = graph_reads(gm, lambda n: "cpu:1" if "b" in str(n.meta.get("nn_module_stack", "")) else "cpu:0")
    b_linear = next(n.name for n in gm.graph.nodes if n.op == "call_function" and "b" in
                    str(n.meta.get("nn_module_stack", "")) and "linear" in n.name)
    with pytest.raises(PlanError, match=rf"plan splits parameter 'a.weight' across cpu:0 \(node 'linear'\) and "
                                        rf"cpu:1 \(node '{b_linear}'\)"):  # the readers on each device
        tensor_readers(model, b_on_1, "plan")
    both = [("cpu:1", model.scale, "m1"), ("cpu:0", model.scale, "m0"), ("cpu:1", model.scale, "m2")]
    assert tensor_readers(model, both, "plan", shared_buffers=True) == {"scale": ["cpu:1", "cpu:0"]}
    with pytest.raises(PlanError, match="splits buffer 'scale'"):  # without read-only copies, not even a buffer
        tensor_readers(model, both, "plan")
    with pytest.raises(PlanError, match="splits parameter 'a.bias'"):  # a parameter, never
        tensor_readers(model, [("cpu:0", model.a.bias, "n0"), ("cpu:1", model.a.bias, "n1")], "plan",
                       shared_buffers=True)


def test_place_keeps_what_this_process_holds_with_identity_and_frees_the_rest():
    model, _ = capture()
    weight, scale, bias = model.a.weight, model.scale, model.b.bias
    weight.grad = torch.ones_like(weight)
    bias.grad = torch.ones_like(bias)
    here = torch.device("cpu")  # a CPU tensor cannot take another device's storage: moves are checked on GPUs
    readers = {"a.weight": ["mine"], "scale": ["elsewhere", "mine"], "b.bias": ["elsewhere"]}
    placed = place_tensors(model, readers, lambda d: here if d == "mine" else None)
    assert placed == {"a.weight": "mine", "scale": "mine"}  # a shared buffer: the copy on a device held here
    assert model.a.weight is weight and model.b.weight is weight and weight.shape == (4, 4)
    assert weight.grad is not None and model.scale is scale and scale.shape == (4,)
    assert model.b.bias is bias and bias.numel() == 0 and bias.dtype == torch.float32 and bias.grad is None
    assert model.a.bias.shape == (4,)  # not listed: left alone


def test_localize_moves_baked_devices_and_stowed_constants_to_each_node_s_device():
    model, gm = capture()
    zeros = next(n for n in gm.graph.nodes if n.kwargs.get("device") is not None)
    constants = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("lifted_tensor")]
    assert zeros.kwargs["device"] == torch.device("cpu") and len(constants) == 1
    before = str(constants[0].target)
    localize(model, gm, lambda n: None if n is zeros else META)  # the zeros node runs in another process
    assert zeros.kwargs["device"] == torch.device("cpu")
    localize(model, gm, lambda n: META)
    assert zeros.kwargs["device"] == META
    assert str(constants[0].target) != before and getattr(gm, str(constants[0].target)).device == META
    assert getattr(gm, before).device.type == "cpu"  # the original constant stays for other devices' readers
    assert model.a.weight.device.type == "cpu"  # the model's own tensors are place_tensors' business


def test_a_localized_graph_runs_on_the_device_it_was_placed_on():
    for localized in (False, True):
        model, gm = capture()
        if localized:
            localize(model, gm, lambda n: META)
        gm.to_empty(device=META)  # the model's tensors there too (what place_tensors does on a GPU)
        if localized:
            assert gm(torch.randn(3, 4, device=META))[0].device == META
        else:
            with pytest.raises(RuntimeError, match="device"):
                gm(torch.randn(3, 4, device=META))


def test_every_frontend_gets_the_unplaced_node_check_from_trace_for_plan():
    model = Baked()
    x = torch.randn(3, 4)
    plan = plan_from_assignment(model, lambda n: "cpu:0", ["cpu:0"], inputs=(x,))
    trace_for_plan(model, plan)
    computing = next(name for name in plan.assignment if name.startswith("mul"))
    del plan.assignment[computing]
    with pytest.raises(PlanError, match=rf"does not place node '{computing}' \(1 unplaced\)"):
        trace_for_plan(model, plan)
    trace_for_plan(model, plan, mode="eval")  # other captures are placed by the runtime, node by node
