"""Capture by torch.fx symbolic tracing: the fallback of graphs.trace (older torch,
workloads with `leaf_modules`, models torch.export refuses).

A submodule fx cannot trace (data-dependent control flow, say) is retried as a leaf:
one opaque node that runs the real module, so the model is still placed, at coarser
grain there. Arguments the example call leaves out are traced at their defaults
(`concrete_args`), so `if mask is not None:` takes the branch eager takes. Tensors fx
stows on the model while tracing (`_tensor_constant0`, ...) move to the graph module,
so a second trace of the same model names them alike.

fx traces buffers (and plain tensor attributes) as the concrete tensors they are, so a
forward that reads one, or a tensor computed from it, as a Python value (`float(self.k)`,
`.item()`, `if self.step > 3:`) would have it baked into the graph, and an update of the
buffer in place would go unseen: a wrong number. Such a read fails the trace
(`trace_effects.ValueReads`), so the module doing it runs as itself (a leaf), reading the
buffer live, or, for the model's own forward, the capture is refused.
"""

from __future__ import annotations

import inspect
import linecache
import operator
import os
import re
import traceback
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils._pytree import SUPPORTED_NODES, TreeSpec, tree_flatten

from graphs.errors import CaptureError
from graphs.trace import Traced, canonical_call, first_line, first_sentence, normalize, training_flags
from graphs.trace_effects import ValueReads

_TORCH_DIR = os.path.dirname(torch.__file__)
MAX_FALLBACK_LEAVES = 64
_ASSERTS = {torch.fx._symbolic_trace._assert_is_none, torch._assert}


class PlacerTracer(fx.Tracer):
    """fx.Tracer that keeps given module classes and module paths whole, remembers
    which module it was inside when tracing failed, and the type of what the forward
    returned (fx records any dict as a plain one: a ModelOutput would come back as a dict)."""

    def __init__(self, leaf_classes: tuple[type, ...], leaf_paths: Iterable[str]):
        super().__init__()
        self.leaf_classes = leaf_classes
        self.leaf_paths = set(leaf_paths)
        self.failed_in: str | None = None  # innermost module path an exception passed through
        self.returned: type | None = None  # the type of the last value made an argument: the forward's return

    def create_arg(self, a):
        arg = super().create_arg(a)
        self.returned = type(a)  # after its parts: the outermost value is set last (the output node's)
        return arg

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or isinstance(m, self.leaf_classes):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def trace_fx(model: nn.Module, leaf_classes: tuple[type, ...], leaf_paths: tuple[str, ...], allow_fallback: bool,
             inputs: tuple | None, kwargs: dict, export_error: BaseException | None = None) -> Traced:
    """Symbolically trace `model` (graphs.trace.trace_model documents the arguments).
    Without `inputs` every forward parameter is a placeholder; with them, only the
    tensor arguments of that call, the rest baked in. `export_error`: why export
    failed before, named in the error if fx fails too.

    Raises CaptureError naming the module, the source line and the fix when fx cannot
    trace the model (with `allow_fallback`, after making up to MAX_FALLBACK_LEAVES
    failing modules leaves)."""
    signature = inspect.signature(model.forward)
    concrete = {} if inputs is None else _concrete_args(signature, inputs, kwargs)
    paths = list(leaf_paths)
    notes: list[str] = []
    for _ in range(MAX_FALLBACK_LEAVES + 1):
        tracer = PlacerTracer(leaf_classes, paths)
        stowed = set(vars(model))
        try:
            with ValueReads(model):
                graph = tracer.trace(model, concrete_args=concrete or None)
            _drop_baked_placeholders(graph, signature, concrete)  # before codegen, which fails on a tuple's leaves
            for node in [n for n in graph.nodes if n.op == "placeholder"]:
                node.args = ()  # no default values: fx writes them into a flattening assignment (a syntax error)
            gm = fx.GraphModule(model, graph, class_name=f"Traced{type(model).__name__}")
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... from user code
            failed_in = tracer.failed_in or ""
            where, reason = user_frame(exc), first_line(exc)
            if allow_fallback and failed_in and failed_in not in paths:
                paths.append(failed_in)
                notes.append(f"fx could not trace inside '{failed_in}' ({reason} at {where}); "
                             f"it is placed as one unit")
                continue
            raise _capture_error(model, failed_in, where, reason, export_error,
                                 _takes_tensors(signature, inputs)) from exc
        finally:
            for key in set(vars(model)) - stowed:
                if key.startswith("_tensor_constant"):
                    delattr(model, key)  # the graph module holds its own reference
        out_spec = _flatten_output(gm.graph, tracer.returned)
        normalize(gm)
        return Traced(gm=gm, leaf_paths=tuple(paths), fallback_notes=tuple(notes), method="fx",
                      training=training_flags(model), signature=signature, out_spec=out_spec, concrete=concrete)
    raise CaptureError(f"gave up tracing {type(model).__name__}: more than {MAX_FALLBACK_LEAVES} modules fail to trace")


def _concrete_args(signature: inspect.Signature, inputs: tuple, kwargs: dict) -> dict:
    """The arguments fx bakes in: every non-tensor argument of the call, and every
    omitted one at its default."""
    bound = canonical_call(signature, inputs, kwargs)
    bound.apply_defaults()
    concrete = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = bound.arguments.get(name)
        if isinstance(value, torch.Tensor):
            continue
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(value)[0]):
            raise CaptureError(f"argument '{name}' holds tensors inside a {type(value).__name__}; "
                               f"torch.fx capture needs each tensor as an argument of its own")
        concrete[name] = value
    return concrete


def _drop_baked_placeholders(graph: fx.Graph, signature: inspect.Signature, concrete: dict) -> None:
    """fx keeps a placeholder `{name}_{k}` for each leaf of a baked argument (none for an
    empty tuple), checked by `_assert_is_none(x)` for None and by `torch._assert(x == value)`
    for a bool, int or float; the binding checks the value instead, so all of them go."""
    baked = [re.compile(rf"{re.escape(name)}_\d+") for name in concrete]
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if str(node.target) in signature.parameters or not any(b.fullmatch(str(node.target)) for b in baked):
            continue
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.eq:
                for check in list(user.users):
                    if check.op == "call_function" and check.target in _ASSERTS and not check.users:
                        graph.erase_node(check)
            if not user.users and (user.target in _ASSERTS or user.target is operator.eq):
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)


def _flatten_output(graph: fx.Graph, returned: type | None) -> TreeSpec:
    """Make the output node return a flat tuple of leaves; returns how to rebuild the
    eager structure. fx records a dict or list output as its immutable kind: rebuilt
    as the plain dict or list eager returns, or as the dict type the forward returned
    (`returned`, a ModelOutput) where pytree knows that type."""
    out = next(n for n in graph.nodes if n.op == "output")
    flattened = getattr(getattr(graph._codegen, "pytree_info", None), "out_spec", None)
    if flattened is not None:  # fx flattened the output itself (a tuple or dict among the baked arguments)
        leaves, spec = list(out.args[0]), flattened
    else:
        value = _plain(out.args[0])
        if (type(value) is dict and returned is not None and returned is not dict and issubclass(returned, dict)
                and returned in SUPPORTED_NODES and all(isinstance(k, str) for k in value)):
            value = returned(**value)
        leaves, spec = tree_flatten(value)
    out.args = (tuple(leaves),)
    return spec


def _plain(value):
    if type(value) in (dict, immutable_dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, immutable_list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_plain(v) for v in value))
    return value


_CACHE_FIX = ("set `use_cache=False` in the model's config (e.g. GPT2Config(..., use_cache=False)) and pass no "
              "use_cache=True")


def cache_class(export_error: BaseException | None) -> str | None:
    """The class name of the cache object (a Hugging Face model's DynamicCache with
    `use_cache=True`) whose presence in the output made torch.export fail, else None."""
    found = re.search(r"Found <class '(?:[\w.]*\.)?(\w*Cache)'> in output", str(export_error or ""))
    return None if found is None else found.group(1)


def cache_hint(export_error: BaseException | None) -> str:
    """"set use_cache=False ..." when torch.export failed because the output holds a
    cache object (`cache_class`), else ""."""
    cache = cache_class(export_error)
    if cache is None:
        return ""
    return f"{_CACHE_FIX}: its output holds a cache object ({cache}), which no capture can return"


def _takes_tensors(signature: inspect.Signature, inputs: tuple | None) -> bool:
    """Whether forward already takes the batch as explicit tensor arguments: every example
    input a tensor, bound to a named parameter (no *args or **kwargs)."""
    named = [p for p in signature.parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return inputs is not None and len(inputs) <= len(named) and all(isinstance(x, torch.Tensor) for x in inputs)


def _capture_error(model: nn.Module, failed_in: str, where: str, reason: str,
                   export_error: BaseException | None, takes_tensors: bool) -> CaptureError:
    """The error when fx fails too; a cache object in the output (cache_class) is the cause
    and fix named first. The wrapper is advised only for a forward that does not take the
    batch as tensors already."""
    cache = cache_class(export_error)
    if cache is not None:  # what the user can act on first: torch.fx's own failure only follows from it here
        return CaptureError(f"cannot capture {type(model).__name__}: its output holds the model's key/value cache "
                            f"({cache}), which no capture can return (torch.fx cannot capture it either). "
                            f"Fix: {_CACHE_FIX}")
    exported = f" (torch.export failed too: {first_sentence(export_error)})" if export_error is not None else ""
    if failed_in:
        fix = "list the offending module's class in `leaf_modules` in the workload file, to keep it whole"
        return CaptureError(f"cannot trace module '{failed_in}' at {where}: {reason}{exported}. Fix: {fix}")
    fix = ("move the code that branches on tensor values into a submodule listed in `leaf_modules`, "
           "or write it without a Python branch (torch.where)")
    if not takes_tensors:
        fix = ("wrap the model in a module whose forward takes the batch as explicit tensor arguments "
               "(e.g. forward(self, input_ids) calling self.model(input_ids=input_ids)), and " + fix)
    return CaptureError(f"cannot trace the model's own forward ({type(model).__name__}) at {where}: "
                        f"{reason}{exported}. Fix: {fix}")


def user_frame(exc: BaseException) -> str:
    """file:line (code) of the innermost traceback frame outside torch and placer."""
    ours = os.path.dirname(__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and os.path.dirname(f.filename) != ours]
    if not frames:
        return "unknown location"
    f = frames[-1]
    code = (linecache.getline(f.filename, f.lineno) or "").strip()
    return f"{f.filename}:{f.lineno}" + (f" ({code})" if code else "")
