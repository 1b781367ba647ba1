"""A model's parameters and buffers on a plan's devices, and the devices a capture
baked into its graph: one implementation for the local runtime (placed.py) and both
distributed frontends (placer.distributed), which differ only in which devices this
process holds.

- `tensor_readers`: the devices that read each tensor. A parameter read on two
  devices is a PlanError (its gradient would be split); a buffer may be, where the
  caller keeps read-only copies (a causal mask every pipeline stage slices), unless
  the model updates it in forward (`written_tensors`): a copy would miss updates.
- `place_tensors`: each tensor to the first of its devices that this process holds,
  keeping its identity, or its storage freed where another process holds them all.
- `localize`: a tensor the graph creates on the capture's device (torch.export writes
  `zeros(..., device=cpu)`) is created on its node's device, and a constant the
  capture stowed on the graph is read from a copy on its reader's device.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from graphs.capture import canonical_names, node_tensors
from graphs.errors import PlanError
from graphs.schedule import written_state

__all__ = ["graph_reads", "written_tensors", "tensor_readers", "place_tensors", "localize"]


def graph_reads(gm: fx.GraphModule, device_of: Callable[[fx.Node], str | None]
                ) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(device name, tensor, reader's name) for each parameter, buffer or stowed constant
    each node of `gm` reads (graphs.capture.node_params), in graph order; nodes whose
    `device_of(node)` is None are passed over. The reader of a get_attr or placeholder
    node is its first user (the op that reads the tensor), else the node itself."""
    for node in gm.graph.nodes:
        device = device_of(node)
        if device is not None:
            access = node.op in ("get_attr", "placeholder") and node.users
            reader = next(iter(node.users)).name if access else node.name
            for tensor in node_tensors(gm, node):
                yield device, tensor, reader


def written_tensors(gm: fx.GraphModule) -> set[int]:
    """ids of the tensors (parameters, buffers) that nodes of `gm` update in place,
    directly, through views or through a chain of updates (graphs.schedule.written_state)."""
    return {id(operator.attrgetter(str(a.target))(gm)) for node in gm.graph.nodes for a in written_state(node, gm)}


def tensor_readers(model: nn.Module, reads: Iterable[tuple[str, torch.Tensor, str]], source: str,
                   shared_buffers: bool = False, written: Collection[int] = ()) -> dict[str, list[str]]:
    """The devices that read each of `model`'s tensors, first reader first.

    Parameters
    ----------
    model : the model whose parameters and buffers count (tensors of `reads` that are
        not its own, constants a capture stowed, are left out).
    reads : (device name, tensor, reading node's name) in execution order (`graph_reads`).
    source : how error messages name the plan.
    shared_buffers : whether a buffer may be read on several devices (the caller keeps
        read-only copies); parameters never may, nor buffers in `written`.
    written : ids of the tensors the model updates in forward (`written_tensors`).

    Returns
    -------
    Canonical qualified name (graphs.capture.canonical_names) -> device names.

    Raises
    ------
    PlanError : a parameter (or, without `shared_buffers`, a buffer; or a buffer the
        model updates in forward) is read on two devices: nodes that share a tensor
        must share a device. The message names the tensor, its module and a node that
        reads it on each device.
    """
    canonical = canonical_names(model)
    readers: dict[str, list[str]] = {}
    first_reader: dict[str, str] = {}  # canonical name -> the node that read it first
    for device, tensor, node in reads:
        name = canonical.get(id(tensor))
        if name is None:
            continue
        devices = readers.setdefault(name, [device])
        first_reader.setdefault(name, node)
        if device in devices:
            continue
        across = f"across {devices[0]} (node {first_reader[name]!r}) and {device} (node {node!r})"
        if isinstance(tensor, nn.Parameter):
            raise PlanError(f"{source} splits parameter {name!r} {across}: nodes that share a parameter "
                            f"({_module(model, name)}'s) must share a device; put them on one")
        if not shared_buffers or id(tensor) in written:
            updated = "updates it in forward" if id(tensor) in written else "uses it"
            raise PlanError(f"{source} splits buffer {name!r} {across}: {_module(model, name)} {updated}, and the "
                            f"nodes that read or update a buffer must share a device; put them on one")
        devices.append(device)
    return readers


def _module(model: nn.Module, name: str) -> str:
    """How a message names the module that holds tensor `name`."""
    path = name.rpartition(".")[0]
    owner = model.get_submodule(path)
    return f"module '{path}' ({type(owner).__name__})" if path else f"the model ({type(model).__name__})"


def place_tensors(model: nn.Module, readers: Mapping[str, Sequence[str]],
                  target: Callable[[str], torch.device | None]) -> dict[str, str]:
    """Move each tensor of `readers` (canonical name -> device names, `tensor_readers`)
    to `target(d)` for the first of its devices `d` whose target is not None; where
    every target is None (another process holds them), free its storage
    (`torch.empty(0)`, its dtype kept). Tensors keep their identity (`.data` and
    `.grad` are replaced), so tied aliases stay tied and the captures, optimizers made
    later and the model all see the moved ones; values never change. Tensors absent
    from `readers` are left where they are.

    Returns
    -------
    Canonical name -> the device name each tensor kept here went to.
    """
    by_id = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    tensors = {name: by_id[key] for key, name in canonical_names(model).items()}
    placed: dict[str, str] = {}
    with torch.no_grad():
        for name, devices in readers.items():
            t = tensors[name]
            for device in devices:
                here = target(device)
                if here is not None:
                    placed[name] = device
                    if t.device != here:
                        t.data = t.data.to(here)
                        if t.grad is not None:
                            t.grad = t.grad.to(here)
                    break
            else:
                t.data = torch.empty(0, dtype=t.dtype)
                t.grad = None
    return placed


def localize(model: nn.Module, gm: fx.GraphModule, where: Callable[[fx.Node], torch.device | None]) -> None:
    """Make what the capture baked in follow the placement, in place (`gm` recompiled):
    a node that creates a tensor with a `device` argument creates it on `where(node)`,
    and a get_attr of a constant the capture stowed (a tensor that is not one of
    `model`'s parameters or buffers) reads a copy of it on `where(node)` (one copy
    per device, kept on `gm`). Nodes `where` answers None for run in another process
    (a device this one cannot allocate on) and are left alone."""
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "get_attr"):
            continue
        here = where(node)
        if here is None:
            continue
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != here:
            node.update_kwarg("device", here)
        elif node.op == "get_attr":
            value = operator.attrgetter(str(node.target))(gm)
            if isinstance(value, torch.Tensor) and id(value) not in owned and value.device != here:
                alias = f"{str(node.target).replace('.', '_')}_on_{here.type}{here.index or 0}"
                if not hasattr(gm, alias):
                    setattr(gm, alias, value.to(here))
                node.target = alias
    gm.recompile()
