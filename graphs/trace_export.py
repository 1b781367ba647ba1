"""Capture by torch.export: non-strict, the training IR (aten ops such as aten.linear,
aten.dropout and aten.batch_norm, not decomposed; in-place ops kept).

Non-strict export runs the model's Python forward on fake tensors, so it reads
keyword arguments and structured outputs as the eager model does and never writes a
real parameter or buffer. Buffers a forward updates in place are updated by the
graph in place (inside `torch.no_grad()` regions too: a `wrap_with_set_grad_enabled`
subgraph), once per call, as in eager.

The batch dim of every input (dim 0, or the one the workload's `batch_dims` names), and
every dim of integer inputs (the sequence length of token ids), is dynamic where the
model allows (`Dim.AUTO`); dims the model fixes, and dims of size 1 in the example, are
specialized. `guard` tells, for
a call, whether its shapes and dtypes are ones the graph was made for; the runtime
captures again (cached) for a call outside them.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from graphs.trace import Traced, canonical_call, first_line, module_label, normalize, training_flags
from graphs.trace_effects import ValueReads

# aten ops that assert trace-time facts (a value's device and dtype when captured):
# placed on another device they would fail, and they compute nothing.
_TRACE_TIME_ASSERTS = ("aten._assert_tensor_metadata",)


def export_available() -> bool:
    """torch.export has a training IR from torch 2.5 on (`export_for_training` until 2.8)."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def export_model(model: nn.Module, args: tuple, kwargs: dict, batch_dims: tuple[tuple[str, int], ...] = ()) -> Traced:
    """Export `model(*args, **kwargs)` in the model's current mode and normalize the
    graph (graphs.trace.normalize). `batch_dims`: (forward input, dim) pairs kept
    dynamic besides dim 0; the capture records them only where the dynamic export
    succeeded. Raises what torch.export raises."""
    signature = inspect.signature(model.forward)
    bound = canonical_call(signature, args, kwargs)
    call_args, call_kwargs = bound.args, bound.kwargs
    try:
        program = _export(model, call_args, call_kwargs, _dynamic_shapes(bound, dict(batch_dims)))
    except Exception:  # some models refuse dynamic dims (and **kwargs have no dynamic-shape form)
        program = _export(model, call_args, call_kwargs, None)
        batch_dims = ()  # every size fixed: none kept free
    gm = program.module()
    _refuse_value_dependent_sizes(gm.graph)
    flat, in_spec = tree_flatten((call_args, call_kwargs))
    guards_fn = getattr(gm, "_guards_fn", None)
    graph = gm.graph
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
                node.op == "call_function" and str(node.target).startswith(_TRACE_TIME_ASSERTS)):
            graph.erase_node(node)
    if guards_fn is not None:
        delattr(gm, "_guards_fn")
    out_spec = gm._out_spec
    normalize(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        raise RuntimeError(f"export made {len(placeholders)} inputs of {len(flat)} argument leaves")
    return Traced(
        gm=gm, leaf_paths=(), fallback_notes=(), method="export", training=training_flags(model), batch_dims=batch_dims,
        signature=signature, out_spec=out_spec, in_spec=in_spec,
        constants=tuple((i, v) for i, v in enumerate(flat) if not isinstance(v, torch.Tensor)),
        guard=_guard([n.meta.get("val") for n in placeholders], program.range_constraints, guards_fn),
    )


def _refuse_value_dependent_sizes(graph: torch.fx.Graph) -> None:
    """Raise ValueError at the first node whose output's size depends on tensor values
    (nonzero, a boolean mask: an unbacked size to torch.export), naming its module.
    Placer costs each node by its output's size, so such a graph has none to cost;
    trace_model falls back to torch.fx, whose sizes are the example's."""
    for node in graph.nodes:
        if any(free_unbacked_symbols(v) for v in tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)):
            where = module_label(node)
            raise ValueError(f"the size of {node.name}'s output{f' in {where}' if where else ''} depends on tensor "
                             f"values")


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> torch.export.ExportedProgram:
    export = getattr(torch.export, "export_for_training", None) if _before_2_9() else None
    export = export or torch.export.export
    with _quiet(), ValueReads(model):  # export bakes a plain tensor attribute read as a number (review 15)
        return export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def _quiet():
    """torch.export prints a failed trace's partial graph to stderr and logs warnings
    and errors about it (a traceback per op fake tensors cannot run, ~270 lines for a
    model that fails on its inputs); a refused export is an ordinary outcome here (fx
    takes over, or the one-line error says why), so the user sees none of it. torch's
    loggers get their levels back afterwards. (Redirecting stderr alone misses the
    records: torch's log handler holds the stream it was made with.)"""
    names = {"torch", *(name for name in list(logging.root.manager.loggerDict) if name.startswith("torch"))}
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _before_2_9() -> bool:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) < (2, 9)


def _dynamic_shapes(bound: inspect.BoundArguments, batch_dims: dict[str, int]) -> dict | None:
    """Which dims may vary (Dim.AUTO: export specializes those the model fixes): the
    batch of every tensor argument (dim 0, and the dim `batch_dims` names for it: a
    seq-first model's batch is dim 1, which micro-batches split), and every dim of
    integer ones (token ids and masks: the sequence length). Image sizes and feature widths stay static:
    symbolic, they cost a convolution net several times the capture time, and a
    training run rarely changes them (another size is another capture). None where
    this torch has no Dim.AUTO."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    if auto is None:
        return None

    def dims(t, named: int = 0):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        free = range(t.dim()) if not t.is_floating_point() else {0, named} & set(range(t.dim()))
        return {i: auto for i in free}

    return {name: tree_map(lambda t: dims(t, batch_dims.get(name, 0)), value)
            for name, value in bound.arguments.items()}


def _guard(vals: list, ranges: dict, guards_fn: nn.Module | None):
    """check(flat placeholder values) -> None, or why they fall outside the capture:
    the dtype, rank and static sizes of each input, each dynamic size within the range
    export assumed (sizes 0 and 1 are specialized, so a partial batch of one gets its
    own capture) and equal where the capture made sizes equal, and export's own
    guards. What the check compares is worked out here, once: a call pays for integer
    comparisons, not for symbolic expressions."""
    inputs = []  # (index, dtype, rank, dims): a dim is (d, size) or (d, symbol, low, high, bounds) or (d, expr)
    for i, val in enumerate(vals):
        if not isinstance(val, torch.Tensor):
            continue
        dims = []
        for d, s in enumerate(val.shape):
            if isinstance(s, int):
                dims.append((d, s))
                continue
            expr = s.node.expr
            if not expr.is_Symbol:
                dims.append((d, expr))
                continue
            bounds = ranges.get(expr)
            low, high = (-math.inf, math.inf) if bounds is None else (_number(bounds.lower), _number(bounds.upper))
            dims.append((d, expr, low, high, bounds))
        inputs.append((i, val.dtype, val.dim(), tuple(dims)))
    guards = _plain(guards_fn.forward) if guards_fn is not None else None

    def check(flat: list) -> str | None:
        sizes: dict = {}
        derived = []
        for i, dtype, rank, dims in inputs:
            x = flat[i]
            if not isinstance(x, torch.Tensor):
                return f"input {i} is {type(x).__name__}, the capture's a tensor"
            if x.dtype != dtype or x.dim() != rank:
                return f"input {i} is {x.dtype} with {x.dim()} dims, the capture's {dtype} with {rank}"
            shape = x.shape
            for dim in dims:
                d, n = dim[0], shape[dim[0]]
                if len(dim) == 2:
                    if isinstance(dim[1], int):
                        if dim[1] != n:
                            return f"input {i} has size {n} in dim {d}, the capture {dim[1]}"
                    else:
                        derived.append((i, d, dim[1], n))
                    continue
                _, symbol, low, high, bounds = dim
                if sizes.setdefault(symbol, n) != n:
                    return f"input {i} has size {n} in dim {d}, which the capture ties to size {sizes[symbol]}"
                if not low <= n <= high:
                    return f"input {i} has size {n} in dim {d}, outside the captured range {bounds.lower}..{bounds.upper}"
        for i, d, expr, n in derived:
            if expr.free_symbols <= sizes.keys() and int(expr.subs(sizes)) != n:
                return f"input {i} has size {n} in dim {d}, the capture {expr.subs(sizes)}"
        if guards is not None:
            try:
                guards(*flat)
            except Exception as exc:  # AssertionError("Guard failed: ...") in torch 2.13
                return first_line(exc)
        return None

    return check


def _number(bound) -> float:
    """A range bound of export's as a Python number (its infinities as math.inf)."""
    if bound.is_Integer:
        return int(bound)
    return math.inf if bound > 0 else -math.inf


def _plain(fn):
    """export's guard function without the wrapper torch._dynamo puts around it
    (`dont_skip_tracing` patches Dynamo's config around every call, about 5 us, which
    matters only while Dynamo traces); `fn` itself where it has no such wrapper."""
    inner = inspect.getclosurevars(fn).nonlocals.get("func") if inspect.isfunction(fn) else None
    return inner if inspect.isfunction(inner) else fn
