"""Captures kept for reuse: a model captured once is not captured again for the same
kind of call, and neither is a copy of it made by `Workload.fresh_model` (profiling
and every measured placement work on such copies; a torch.export capture costs
seconds).

A capture is reused only when everything it depends on is unchanged: the call's
structure, shapes, dtypes and devices and its non-tensor arguments, the capture
method, mode and leaves, every parameter's and buffer's name, shape, dtype and device,
and every module's own attributes (values of numbers, strings and the like, and of
the fields of plain objects such as a transformers config; types of anything else).
A reused capture gets a graph of its own over the model's own tensors and
submodules (`rebind`), so placing it changes nothing that is kept.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from graphs.trace import _MODULE_ATTRS, Traced

_SIMPLE = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)
_captures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: (Traced, its state)}
_copied_from: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # copy -> weakref to its source


def note_copy(copy: nn.Module, source: nn.Module) -> None:
    """Record that `copy` is a deep copy of `source`, made just now."""
    _copied_from[copy] = weakref.ref(source)


def request_key(options: tuple, args: tuple, kwargs: dict) -> tuple:
    """The part of a capture's key that the call and the options give."""
    flat, spec = tree_flatten((args, kwargs))
    leaves = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("value", _simple(x))
                   for x in flat)
    return options, str(spec), leaves


def lookup(model: nn.Module, key: tuple) -> Traced | None:
    """A capture of `model`, or of the model it was copied from, for `key`, bound to
    `model`'s own tensors; None when there is none or the model changed since."""
    state = model_state(model)
    for source in (model, _source(model)):
        if source is None:
            continue
        hit = _captures.get(source, {}).get(key)
        if hit is not None and hit[1] == state:
            return rebind(hit[0], source, model)
    return None


def store(model: nn.Module, key: tuple, traced: Traced) -> Traced:
    """Keep `traced` (a capture of `model`), for the model it was copied from too while
    the two are alike (so that the next copy finds it), and return a copy to hand out."""
    state = model_state(model)
    _captures.setdefault(model, {})[key] = (traced, state)
    source = _source(model)
    if source is not None and model_state(source) == state:
        _captures.setdefault(source, {}).setdefault(key, (rebind(traced, model, source), state))
    return rebind(traced, model, model)


def model_state(model: nn.Module) -> tuple:
    """What a capture depends on besides the call (module doc); equal for a model and
    its deep copy."""
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                    for name, t in list(model.named_parameters()) + list(model.named_buffers()))
    attributes = tuple((path, type(m), tuple(sorted((k, _described(v)) for k, v in vars(m).items()
                                                    if k not in _MODULE_ATTRS)))
                       for path, m in model.named_modules())
    return tensors, attributes


def rebind(traced: Traced, source: nn.Module, target: nn.Module) -> Traced:
    """`traced` (a capture of `source`) on a fresh graph whose attributes are `target`'s
    tensors and submodules where the capture read `source`'s, and the capture's own
    (constants, subgraphs) elsewhere."""
    where = {id(m): path for path, m in source.named_modules()}
    for path, m in source.named_modules():
        for key, value in [*vars(m).items(), *m._parameters.items(), *m._buffers.items()]:
            if isinstance(value, torch.Tensor):
                where.setdefault(id(value), f"{path}.{key}" if path else key)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in traced.gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = operator.attrgetter(str(node.target))(traced.gm)
            root[str(node.target)] = operator.attrgetter(where[id(value)])(target) if id(value) in where else value
    return replace(traced, gm=fx.GraphModule(root, graph, class_name=type(traced.gm).__name__))


def _source(model: nn.Module) -> nn.Module | None:
    ref = _copied_from.get(model)
    return ref() if ref is not None else None


def _described(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), value.dtype, value.device
    if hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)) and not callable(value):
        return type(value).__qualname__, tuple(sorted((k, _simple(v)) for k, v in vars(value).items()))
    return _simple(value)


def _simple(value: Any) -> Any:
    """A value that compares by type and content where it can (6 and 6.0 differ), by
    type otherwise."""
    if isinstance(value, _SIMPLE):
        return type(value).__name__, value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return type(value).__name__, tuple(_simple(v) for v in value)
    return type(value).__qualname__
