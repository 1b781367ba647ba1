"""Around a capture: the model is left as it was found, and what a captured graph
would not repeat on every call is refused (graphs.trace.trace_model uses it).

A forward may set Python attributes (a counter, a cache) and update buffers in
place. A graph repeats neither the attribute writes nor, when torch.fx captured it,
the in-place updates (fx runs them on tensors it does not trace): those are
CaptureErrors naming the module and the fix. Whatever the forward changed while
capturing is put back. A forward that changes one of its inputs in place changes the
caller's tensor in eager; a placed model runs on its own copy of the input where a
device writes it (placer.runtime.chunks), so that is refused too (`refuse_input_writes`).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from graphs.errors import CaptureError
from graphs.schedule import _VIEW_NAMES, _name, mutated_args
from graphs.trace import _MODULE_ATTRS, _equal, module_label

__all__ = ["no_side_effects", "raise_eager_error", "refuse_input_writes", "ValueReads"]

# Ops whose result always shares its first argument's memory, for graphs without values
# to compare (torch.fx): graphs.schedule's views less those that copy at times
# (`reshape`, `flatten`, `contiguous`; indexing is judged by its index), where eager
# then leaves the caller's tensor alone.
_ALWAYS_VIEWS = (_VIEW_NAMES - {"reshape", "reshape_as", "flatten", "contiguous", "getitem"}) | {"slice", "alias",
                                                                                             "unfold", "swapdims"}


def refuse_input_writes(gm: fx.GraphModule, model: nn.Module) -> None:
    """Refuse a captured graph that changes one of the forward's inputs in place.

    Parameters
    ----------
    gm : the capture's graph (torch.export's, whose nodes carry fake values, or torch.fx's).
    model : the model captured, for the message.

    Raises
    ------
    CaptureError
        At the first node that writes an input, directly or through a view (a node
        whose value shares the input's memory; without values, the ops of
        `_ALWAYS_VIEWS` and indexing without tensors), naming the input, the module
        and the fix.
    """
    for node in gm.graph.nodes:
        for arg in mutated_args(node, gm):
            base = _viewed(arg)
            if base is not None and base.op == "placeholder":
                where = module_label(node)
                raise CaptureError(f"{type(model).__name__}.forward changes its input {base.target!r} in place "
                                   f"({node.name}{f' in {where}' if where else ''}), which a placed model would not "
                                   f"do to the caller's tensor. Fix: change a copy in forward "
                                   f"(x = x.clone() first, or x = x * 0.5 instead of x.mul_(0.5))")


def _viewed(node: fx.Node) -> fx.Node | None:
    """The node whose memory `node` surely shares, following views back; None where a
    step may have copied (then no input is written through it)."""
    while node.op in ("call_function", "call_method") and node.args and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        value, before = node.meta.get("val"), source.meta.get("val")
        if isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor):
            if StorageWeakRef(value.untyped_storage()) != StorageWeakRef(before.untyped_storage()):
                return None
        elif node.target is operator.getitem:
            if any(isinstance(a, fx.Node) for a in tree_leaves(node.args[1:])):  # indexing by tensors copies
                return None
        elif _name(node.target) not in _ALWAYS_VIEWS:
            return None
        node = source
    return node


@contextlib.contextmanager
def no_side_effects(model: nn.Module, recorded: bool) -> Iterator[None]:
    """Around a capture: leave the model as it was found, and refuse what a captured
    graph would not repeat on every call.

    Every attribute a forward sets (a Python counter, a cache) is restored, and so are
    the values of buffers and plain tensor attributes it changed in place. A forward
    that set an attribute is a CaptureError; so is one whose in-place tensor updates
    ran for real while capturing unless the capture `recorded` them (torch.export
    does; torch.fx runs them on tensors it does not trace, and loses them). A root
    forward hook looks while the forward runs (torch.export restores attributes
    itself before returning)."""
    before = {path: _attributes(m) for path, m in model.named_modules()}
    tensors = {(path, key): (t, t.detach().clone()) for path, m in model.named_modules()
               for key, t in [*vars(m).items(), *m._buffers.items()]
               if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and not t.is_meta}
    changed: list[str] = []

    def look(*_):
        changed.extend(c for c in _changes(model, before) if c not in changed)

    handle = model.register_forward_hook(look)
    try:
        yield
        look()
    finally:
        handle.remove()
        for path, m in model.named_modules():
            if path in before:
                for key in set(vars(m)) - set(before[path]) - _MODULE_ATTRS:
                    delattr(m, key)
                m.__dict__.update({k: v for k, (v, _) in before[path].items()})
        with torch.no_grad():
            for (path, key), (t, value) in tensors.items():
                if not t.is_inference() and t.shape == value.shape and not torch.equal(t, value):
                    t.copy_(value)
                    if not recorded:
                        changed.append(f"{path}.{key}" if path else f".{key}")
    if changed:
        path, _, attr = changed[0].rpartition(".")
        module = model.get_submodule(path)
        fix = (f"list {type(module).__name__} in `leaf_modules` in the workload file, so that it runs as itself"
               if path else "move that update into a submodule and list its class in `leaf_modules`")
        raise CaptureError(f"module '{path or type(model).__name__}' ({type(module).__name__}) changes its attribute "
                           f"'{attr}' in forward, which a captured graph cannot repeat on every call: {fix}")


def _attributes(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """name -> (value, shallow copy of a list/dict value) of a module's own attributes."""
    return {k: (v, list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else None)
            for k, v in vars(module).items() if k not in _MODULE_ATTRS}


def _changes(model: nn.Module, before: dict[str, dict]) -> list[str]:
    """"path.attr" of every attribute that held a value (not None) before and now holds
    an unequal one (a list or dict changed in place counts). An attribute first set,
    or set from None, is a lazy initialization (a cache filled on the first call):
    eager does it once too, so it does not count."""
    changes = []
    for path, m in model.named_modules():
        for key, (value, copy) in before.get(path, {}).items():
            new = vars(m).get(key)
            if value is None or (new is value and (copy is None or _equal(new, copy))):
                continue
            if new is not value and _equal(new, value):
                continue
            changes.append(f"{path}.{key}" if path else f".{key}")
    return changes


def raise_eager_error(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise what the eager model raises for this call (a wrong input width, say), if it
    does: the user's own error, not a capture's. It runs without gradients on copies of
    the call's tensors, moved to the model's one device, with the random generators of
    the CPU and of that device forked, and buffers and attributes restored after (a
    parameter a forward writes in place, as Embedding's max_norm does, is not)."""
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    args, kwargs = tree_map(lambda v: v.detach().clone().to(device) if isinstance(v, torch.Tensor) else v,
                            (args, kwargs))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                no_side_effects(model, recorded=True):
            model(*args, **kwargs)
    except CaptureError:  # eager ran, setting an attribute: the capture's error stands
        pass


class ValueReads(torch.overrides.TorchFunctionMode):
    """Raises TypeError where a captured forward reads one of `model`'s buffers or tensor
    attributes, or a tensor computed from them alone (`self.k.sum()`, `self.k[0]`), as a
    Python value (`float(self.k)`, `.item()`, `if self.step > 3:`): the capture would
    bake the value in, and an update of the tensor in place afterwards would go unseen,
    a wrong number. fx traces buffers and tensor attributes as concrete tensors, and
    torch.export (non-strict) plain tensor attributes (buffers it fakes, and refuses
    such reads of them as data-dependent): both capture under this mode (graphs.trace_fx,
    graphs.trace_export), so the module doing such a read becomes a leaf (fx), reading it
    live, or the capture is refused."""

    READS = {torch.Tensor.__float__: "float()", torch.Tensor.__int__: "int()", torch.Tensor.__bool__: "an if or bool()",
             torch.Tensor.__index__: "an index", torch.Tensor.item: ".item()", torch.Tensor.tolist: ".tolist()",
             torch.Tensor.numpy: ".numpy()", torch.Tensor.__array__: "numpy", torch.Tensor.__format__: "a format",
             torch.equal: "torch.equal", torch.Tensor.equal: ".equal()", torch.is_nonzero: "torch.is_nonzero"}

    def __init__(self, model: nn.Module):
        super().__init__()
        held = [(f"{p}.{k}" if p else k, v) for p, m in model.named_modules() for k, v in vars(m).items()
                if type(v) is torch.Tensor]  # a plain tensor attribute, as fx reads it: concrete (review 15)
        self.names = {id(t): name for name, t in [*model.named_buffers(), *held]}  # id -> what it is or comes from
        self.derived: list[torch.Tensor] = []  # held, so that their ids stay theirs while tracing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        source = next((self.names[id(a)] for a in tree_flatten((args, kwargs))[0] if id(a) in self.names), None)
        if func in self.READS and source is not None:
            raise TypeError(f"the forward reads '{source}' as a Python value ({self.READS[func]}), which a capture "
                            f"would fix at its value now (read it as a tensor: x * self.k, torch.where)")
        result = func(*args, **(kwargs or {}))
        if source is not None and type(result) is torch.Tensor:  # concrete: computed on the buffer, not traced
            self.names[id(result)] = source
            self.derived.append(result)
        return result
