"""Run a placed model for real: `apply(model, plan)` returns an ordinary nn.Module.

    placed = placer.apply(build_model(), "plan.json")
    opt = torch.optim.SGD(placed.parameters(), lr=0.1)
    loss = loss_fn(placed(x), x); loss.backward(); opt.step()

How: trace the model exactly as the plan's capture did (same leaf paths, checked by
fingerprint), move each parameter and buffer to the device of the nodes that use it,
fuse same-device runs of nodes into chunks (chunks.py), and run the chunks on
per-device workers, forward and backward (executor.py).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from graphs.capture import node_params
from graphs.trace import fingerprint, trace_model
from graphs.devices import Cluster, parse_cluster
from graphs.errors import PlanError
from placer.plan import Plan, load_plan
from placer.runtime.chunks import Chunk, build_chunks
from placer.runtime.executor import ChunkEvent, Executor

__all__ = ["apply", "PlacedModule", "Chunk", "ChunkEvent"]


class PlacedModule(nn.Module):
    """The model run by the placement. It registers the original model's children,
    parameters and buffers under their own names, so `state_dict()` keys are the
    model's own and checkpoints move between placed and unplaced models. Attributes
    it lacks are read from the original model.

    Outputs come back on the device of the first tensor input (as with accelerate's
    dispatched models), so a loss over outputs and inputs works unchanged. One call
    at a time: the device workers are shared by every call of the module.
    """

    def __init__(self, model: nn.Module, plan: Plan, graph: fx.Graph, executor: Executor,
                 tensor_devices: dict[str, str]):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model._parameters.items():
            self.register_parameter(name, p)
        for name, b in model._buffers.items():
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.plan = plan
        self.executor = executor
        self.tensor_devices = tensor_devices  # parameter/buffer qualified name -> device name
        self._placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._output = next(n for n in graph.nodes if n.op == "output").args[0]
        nodes: list[str] = []
        fx.node.map_arg(self._output, lambda n: nodes.append(n.name))
        self._output_nodes = list(dict.fromkeys(nodes))
        self._finalizer = weakref.finalize(self, executor.close)
        object.__setattr__(self, "original", model)  # last: from here on, unknown attributes come from it

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original" not in self.__dict__:
                raise
            return getattr(self.__dict__["original"], name)

    def forward(self, *args, **kwargs):
        inputs = self._bind(args, kwargs)
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        out_device = first.device if first is not None else torch.device("cpu")
        needs_grad = torch.is_grad_enabled() and (
            any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values())
            or any(p.requires_grad for p in self.parameters()))
        values = self.executor.run(inputs, self._output_nodes, out_device, needs_grad)
        return fx.node.map_arg(self._output, lambda n: values[n.name])

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        """Placeholder name -> value, as Python would bind the traced forward's arguments."""
        if len(args) > len(self._placeholders):
            raise TypeError(f"forward() takes {len(self._placeholders)} arguments but {len(args)} were given")
        inputs = {}
        for i, node in enumerate(self._placeholders):
            if i < len(args):
                inputs[node.name] = args[i]
            elif node.target in kwargs:
                inputs[node.name] = kwargs[node.target]
            elif node.args:
                inputs[node.name] = node.args[0]  # the argument's default
            else:
                raise TypeError(f"forward() missing required argument {node.target!r}")
        return inputs

    def close(self) -> None:
        """Stop the device workers (also done when the module is garbage collected)."""
        self._finalizer()

    def extra_repr(self) -> str:
        return f"plan={self.plan.method!r}, devices={self.plan.devices}, chunks={len(self.executor.chunks)}"


def apply(model: nn.Module, plan: Plan | str | Path, cluster: Cluster | None = None) -> PlacedModule:
    """Place `model` by `plan` (a Plan or a plan file) on `cluster` (default: the
    plan's own devices). Moves the model's parameters and buffers in place.

    Raises PlanError when the plan was made for another model, leaves a node
    unplaced, names a device the cluster lacks, or splits a shared parameter.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    source = plan.path.name if plan.path is not None else "plan"
    traced = trace_model(model, leaf_paths=plan.leaf_paths, allow_fallback=False)
    gm = traced.gm
    fp = fingerprint(model, gm)
    if fp != plan.fingerprint:
        raise PlanError(f"{source} was made for another model (fingerprint {plan.fingerprint}, this model {fp})")
    cluster = cluster or parse_cluster(",".join(plan.devices))
    missing = [d for d in plan.devices if d not in cluster.names]
    if missing:
        raise PlanError(f"{source} places nodes on {missing}, which the cluster ({cluster.spec()}) lacks")
    devices = {d.name: d for d in cluster.devices}

    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    unplaced = [n.name for n in body if n.name not in plan.assignment]
    if unplaced:
        raise PlanError(f"{source} does not place node {unplaced[0]!r} ({len(unplaced)} unplaced)")
    tensor_devices = _place_tensors(model, gm, body, plan.assignment, devices, source)
    chunks = build_chunks(model, gm.graph, plan.assignment)
    return PlacedModule(model, plan, gm.graph, Executor(chunks, devices), tensor_devices)


def _place_tensors(model: nn.Module, gm: fx.GraphModule, body: list[fx.Node], assignment: dict[str, str],
                   devices: dict, source: str) -> dict[str, str]:
    """Move each parameter and buffer to the device of the nodes that read it; a tensor
    read on two devices (a tied weight split by the plan) is an error. Parameters keep
    their identity (tied aliases stay tied; optimizers made later see the moved ones).
    Returns qualified name -> device name for every tensor some node reads."""
    owner: dict[int, tuple[str, str]] = {}  # id(tensor) -> (first name seen, device)
    tensor_devices = {}
    for node in body:
        device = assignment[node.name]
        for name in node_params(gm, node):
            tensor = _get_tensor(model, name)
            first, seen = owner.setdefault(id(tensor), (name, device))
            if seen != device:
                raise PlanError(f"{source} splits parameter {first!r} across {seen} and {device}: "
                                f"nodes that share a parameter must share a device")
            tensor_devices[name] = device

    targets = {}
    for name, device in tensor_devices.items():
        targets[id(_get_tensor(model, name))] = torch.device(devices[device].torch_device)
    for p in model.parameters():
        if id(p) in targets and p.device != targets[id(p)]:
            with torch.no_grad():
                p.data = p.data.to(targets[id(p)])
                if p.grad is not None:
                    p.grad = p.grad.to(targets[id(p)])
    for module in model.modules():
        for key, b in module._buffers.items():
            if b is not None and id(b) in targets and b.device != targets[id(b)]:
                module._buffers[key] = b.to(targets[id(b)])
    return tensor_devices


def _get_tensor(model: nn.Module, qualname: str) -> torch.Tensor:
    path, _, attr = qualname.rpartition(".")
    return getattr(model.get_submodule(path), attr)


# Last: measure.py builds on apply. `placer.runtime.measure` is the function from here on.
from placer.runtime.measure import Measurement, measure, measure_eager  # noqa: E402

__all__ += ["Measurement", "measure", "measure_eager"]
