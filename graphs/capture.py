"""Capture a workload as an OpGraph (schema: graphs/__init__.py): one node per node of the
captured graph but its get_attr nodes (a parameter or buffer belongs to the nodes that read
it: their `params`, which also makes them share a device), with bytes on nodes and edges.

The graph comes from `graphs.trace.trace_model` (profiling, plans and the runtime capture
through it too, so node names agree). Sizes come from the capture itself for torch.export
graphs (each node's fake value, at the example batch's sizes), and from a shape-propagating
run of the graph for fx ones.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Iterator, Mapping

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from graphs.errors import CaptureError, WorkloadError, exit_error
from graphs.schedule import written_state
from graphs.trace import Traced, fingerprint, target_name, tensors_fingerprint, trace_model
from graphs.trace_fx import user_frame
from graphs.workload import Workload, first_line, forward_inputs

# Coarse op categories (envs/features.py OP_TYPES), matched against the lowercased
# name of a function/method target, of an aten op, or of a leaf module's class. First
# match wins, so specific names ("layer_norm", "log_softmax", "scaled_dot_product")
# come first.
_NAME_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "multiheadattention", "attention")),
    ("loss", ("loss", "cross_entropy", "nll")),
    ("norm", ("norm",)),
    ("lstm", ("lstm", "gru", "grucell", "rnn", "rnncell")),
    ("embedding", ("embedding",)),
    ("conv", ("conv",)),
    ("pool", ("pool",)),
    ("linear", ("linear", "addmm")),
    ("matmul", ("matmul", "bmm", "mm", "einsum", "baddbmm")),
    ("activation", ("relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "elu", "mish", "hardswish",
                    "softplus", "dropout")),
    ("reshape", ("view", "reshape", "permute", "transpose", "flatten", "getitem", "getattr", "size",
                 "contiguous", "chunk", "split", "squeeze", "unsqueeze", "expand", "cat", "stack",
                 "identity", "narrow", "select", "unbind", "repeat", "t", "to", "type_as", "float",
                 "slice", "alias", "detach", "clone", "to_copy", "lift_fresh_copy", "arange", "full",
                 "zeros", "ones", "new_ones", "new_zeros", "empty", "scalar_tensor")),
    ("elementwise", ("add", "sub", "mul", "div", "neg", "exp", "log", "sqrt", "rsqrt", "pow", "clamp",
                     "where", "masked_fill", "sum", "mean", "max", "min", "abs", "cumsum", "triu", "tril",
                     "var", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "logical_not", "index", "gather")),
)
_FIXED_CATEGORIES = {"placeholder": "input", "output": "output", "get_attr": "param"}


def capture(workload: Workload) -> nx.DiGraph:
    """Capture the workload's model on its example batch and return its OpGraph.

    torch.export first, torch.fx where export cannot (graphs.trace); modules fx
    cannot trace become leaves (coarser grain). Each fallback is appended to
    `workload.notes`; leaves mark the graph's granularity "module".
    Raises CaptureError when the model cannot be captured at all, WorkloadError when
    it fails on its example inputs.
    """
    try:
        traced = trace_model(workload.model, workload.leaf_modules, inputs=workload.inputs,
                             batch_dims=workload.batch_dims)
    except CaptureError as exc:  # the model's own failure on its inputs is the cause to name (new-user trial 12)
        raise failure_on_inputs(workload.spec, workload.model, workload.inputs) or exc
    workload.notes.extend(traced.fallback_notes)
    return capture_traced(traced, workload.model, workload.inputs, name=workload.name, spec=workload.spec,
                          batch_dims=workload.batch_dims)


def capture_traced(traced: Traced, model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = "",
                   spec: str = "", batch_dims: Mapping[str, int] | None = None) -> nx.DiGraph:
    """The OpGraph of an already captured model (see `capture`); `spec` names the
    workload in error messages; `batch_dims` (forward input -> the dimension its batch
    lies along, default 0) where the graph's `batch_size` is read."""
    gm = traced.gm
    if traced.method == "fx":
        values = traced.bind(tuple(inputs), {})
        try:
            propagate_shapes(gm, tuple(values.values()))
        except NodeFailure as failure:
            raise failure_on_inputs(spec or name or "the model", model, inputs, failure)
    canonical = canonical_names(model)
    g = nx.DiGraph(name=name, fingerprint=fingerprint(model, gm), granularity="module" if traced.leaf_paths else "op",
                   leaf_paths=list(traced.leaf_paths), tensor_names=list(model.state_dict()),
                   capture=capture_info(traced, inputs, model))
    dims = input_batch_dims(model, inputs, batch_dims or {})
    rows = next((t.shape[d] for t, d in zip(inputs, dims)
                 if isinstance(t, torch.Tensor) and d is not None and t.dim() > d), None)
    if rows is not None:
        g.graph["batch_size"] = int(rows)  # the first batched tensor input's, along its batch dimension
    g.graph["input_names"] = forward_names(model, inputs)  # as batch_dims names them (export's `input_1` is `input`)
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]  # a parameter is part of its readers
    for order, node in enumerate(nodes):
        g.add_node(node.name, op=node.op, target=target_name(node), module=owning_module(node),
                   op_type=op_type(node, gm), params=_params_used(node, gm, canonical),
                   out_bytes=_node_bytes(node, gm), order=order)
    for node in nodes:
        for src in node.all_input_nodes:
            if src.op != "get_attr":
                g.add_edge(src.name, node.name, bytes=_edge_bytes(src, node, g))
    _order_side_effects(g, nodes)
    g.graph["colocate"] = colocation_sets(g)
    return g


def _order_side_effects(g: nx.DiGraph, nodes: list[fx.Node]) -> None:
    """Give every node whose value nothing reads an edge (0 bytes) to the next op of its module,
    else the next op, else the output: an in-place update such as BatchNorm's `num_batches_tracked
    += 1` then belongs to its layer instead of floating as a graph of its own (which grouping would
    have to merge blindly), and an unused input joins the graph. Edges follow fx order: acyclic."""
    for i, node in enumerate(nodes):
        if node.users or node.op == "output":
            continue
        later = [n for n in nodes[i + 1:] if n.op.startswith("call_") or n.op == "output"]
        same = [n for n in later if owning_module(n) == owning_module(node) and n.op != "output"]
        target = (same or later)[0]
        g.add_edge(node.name, target.name, bytes=0)


def capture_info(traced: Traced, inputs: tuple[torch.Tensor, ...] | None, model: nn.Module) -> dict:
    """What re-captures the same graph later (plans keep it): the method, the leaf paths, the
    example batch's signature (shapes and dtypes, from which inputs that capture alike are
    built: captures never read values; None without a batch), the batch dims the capture keeps
    free besides dim 0 (`batch_dims`), `tensors` (graphs.trace.tensors_fingerprint of the
    model, checked before a capture) and `shapes` (`tensor_shapes`: which name what differs)."""
    return {"method": traced.method, "leaf_paths": list(traced.leaf_paths), "batch_dims": dict(traced.batch_dims),
            "inputs": None if inputs is None else input_signature(inputs), "tensors": tensors_fingerprint(model),
            "shapes": tensor_shapes(model)}


def tensor_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Each parameter's and buffer's qualified name -> its shape, in the order
    graphs.trace.tensors_fingerprint hashes them."""
    return {name: list(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def shape_difference(recorded: Mapping[str, list[int]], model: nn.Module) -> tuple[str, str]:
    """(in words, the first parameter or buffer whose name or shape differs between `recorded`, a
    `tensor_shapes` table, and `model`; the fix). Where one holds the other whole under a prefix (the
    wrapper a workload file builds around the model the user trains: trial 12), apply the plan there."""
    here, kind, again = tensor_shapes(model), type(model).__name__, "re-run `placer optimize` for this model"
    for outer, inner, plans in ((dict(recorded), here, True), (here, dict(recorded), False)):
        prefix = os.path.commonprefix(list(outer)).rpartition(".")[0]
        if prefix and {k[len(prefix) + 1:]: v for k, v in outer.items()} == inner:
            return ((f"the plan's tensors are this {kind}'s under '{prefix}.'",
                     f"apply it to the wrapper it was made for (whose '{prefix}' is this {kind})") if plans else
                    (f"this {kind}'s tensors are the plan's under '{prefix}.'",
                     f"apply it to model.get_submodule('{prefix}'), which it was made for"))
    for name, shape in recorded.items():
        if name not in here:
            return f"the plan's {name!r} {tuple(shape)} is not in this {kind}", again
        if here[name] != shape:
            return f"{name!r} is {tuple(here[name])} here and {tuple(shape)} in the plan", again
    extra = [name for name in here if name not in recorded]
    return (f"this {kind} has {extra[0]!r} {tuple(here[extra[0]])}, which the plan lacks" if extra
            else "its parameters and buffers come in another order"), again


def forward_names(model: nn.Module, inputs: tuple) -> list[str | None]:
    """The forward input each of `inputs` (as `model(*inputs)` takes them) binds to
    (graphs.workload.forward_inputs); None for one bound to `*args`, or all where the
    inputs do not fit the forward."""
    named = {id(v): name for name, v in forward_inputs(model, inputs).items()}
    return [named.get(id(t)) for t in inputs]


def input_batch_dims(model: nn.Module, inputs: tuple, batch_dims: Mapping[str, int | None]) -> list[int | None]:
    """The dimension each of `inputs` (as `model(*inputs)` takes them) has its batch
    along: `batch_dims` names forward inputs (`forward_names`), 0 for the others
    (unnamed, or bound to `*args`), None for one marked never split."""
    names = forward_names(model, inputs) if batch_dims else [None] * len(inputs)
    return [batch_dims.get(name, 0) for name in names]


def input_signature(inputs: tuple[torch.Tensor, ...]) -> list[dict]:
    """[{"shape": [...], "dtype": "int64"}, ...] of a batch (what `example_like` rebuilds)."""
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs]


def example_like(signature: list[dict], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Zero tensors of the shapes and dtypes `capture_info` recorded, on `device`."""
    return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=device) for s in signature)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Fill every node's meta["tensor_meta"] of an fx graph. Tried first on the meta device
    (shapes only: no arithmetic, no copy of the weights, fast even for big models); a model
    that cannot run there (data-dependent code, tensors created on a fixed device) gets a
    real forward pass instead, its buffers restored after (a forward may update them).

    Raises NodeFailure when the real pass fails (failure_on_inputs tells whose fault)."""
    try:
        weights = {name: torch.empty_like(t, device="meta") for name, t in _named_tensors(gm)}
        torch.func.functional_call(_ShapeRun(gm), weights, tuple(t.to("meta") for t in inputs))
        return
    except Exception:
        pass  # not necessarily the model's fault: the real run below decides
    with torch.no_grad(), buffers_kept(gm):
        _ShapeRecorder(gm).run(*inputs)


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore the values of the module's buffers after the block (a forward may update them)."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


class NodeFailure(Exception):
    """A run of a captured graph failed at `node`: the exception it raised is the
    __cause__. (An attribute, not an arg: fx.Interpreter.run rewrites args[0] of what
    passes through it.) Raised by the interpreters that record a run (_ShapeRecorder,
    graphs.profile's)."""

    def __init__(self, node: fx.Node):
        super().__init__(node.name)
        self.node = node


def failure_on_inputs(spec: str, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                      failure: NodeFailure | None = None) -> Exception | None:
    """What to raise when a run of `model`'s capture on its example `inputs` failed
    (`failure`), or its capture did (None): the model itself is run on them, as a training
    step runs it (buffers restored afterwards). If it fails too, the user's model or inputs
    are at fault: a WorkloadError naming `spec`, the line that fails (else the node), the
    error and a fix. If it runs, the capture is at fault: the node's own exception, for the
    command line to report as an internal error (None without a `failure`)."""
    try:
        with buffers_kept(model):
            model(*inputs)
    except SystemExit as exc:
        return exit_error(f"{spec}: the model's forward", exc.code)
    except Exception as exc:
        where = user_frame(exc)
        node = failure.node if failure is not None else None
        if where == "unknown location" and node is not None and node.op == "call_module":  # a layer run whole
            where = f"layer '{node.target}' ({type(model.get_submodule(str(node.target))).__name__})"
        elif where == "unknown location" and node is not None:  # only torch's code ran (an nn.Linear model)
            module = owning_module(node)
            inside = f" in module '{module}'" if module not in ("", str(node.target)) else ""
            where = f"node '{node.name}' ({target_name(node)}){inside}"
        error = WorkloadError(f"{spec}: the model fails on its example inputs at {where}: {type(exc).__name__}: "
                              f"{first_line(exc)}; fix: {_inputs_fix(inputs, exc)}")
        error.__cause__ = exc
        return error
    cause = None if failure is None else failure.__cause__
    return cause if isinstance(cause, Exception) else failure


def _inputs_fix(inputs: tuple[torch.Tensor, ...], exc: BaseException) -> str:
    """The fix for a model failing on its example inputs: integer inputs that reach a
    layer wanting floats are the commonest case, named; otherwise check the batch."""
    integers = [i for i, t in enumerate(inputs) if not (t.is_floating_point() or t.is_complex())]
    if integers and ("dtype" in str(exc) or "scalar type" in str(exc)):
        i = integers[0]
        return (f"example input {i} is {str(inputs[i].dtype).removeprefix('torch.')}: layers such as nn.Linear "
                f"take floating-point tensors (torch.randn(...) or x.float()); integer ids go through an "
                f"nn.Embedding first")
    return ("make example_inputs() return the tensors forward expects (shapes, dtypes, device): "
            "model(*example_inputs()) in plain PyTorch fails the same way")


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph, recording each node's output as meta["tensor_meta"] (what
    torch's ShapeProp does, minus its printed traceback on failure)."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except (Exception, SystemExit) as exc:  # a leaf module's forward is the workload's code
            raise NodeFailure(n) from exc
        found_tensor = False

        def tensor_meta(obj):
            nonlocal found_tensor
            if isinstance(obj, torch.Tensor):
                found_tensor = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, tensor_meta)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)  # left over from an earlier, failed run
        return result


class _ShapeRun(nn.Module):
    """Runs _ShapeRecorder as a module's forward, so that torch.func.functional_call
    can swap the weights for meta tensors while it runs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return _ShapeRecorder(self.gm).run(*inputs)


def _named_tensors(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    return [(f"gm.{name}", t) for name, t in list(gm.named_parameters()) + list(gm.named_buffers())]


def owning_module(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created the node ("" for the root).
    From the capture's nn_module_stack when it recorded one; otherwise a call_module's own path;
    a get_attr belongs to the first node that reads it (a tied weight to the first layer that
    uses it), or to its parent path."""
    if node.op == "get_attr" and node.users:
        return owning_module(next(iter(node.users)))
    stack = node.meta.get("nn_module_stack")
    if stack:
        key, value = next(reversed(stack.items()))
        path = value[0] if isinstance(value, tuple) else key  # (path, type) since torch 2.1; a type before
        return "" if path.startswith("_empty_nn_module_stack") else path  # export's mark for "no module"
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def op_type(node: fx.Node, gm: fx.GraphModule) -> str:
    """The node's coarse category (envs/features.py OP_TYPES)."""
    if node.op in _FIXED_CATEGORIES:
        return _FIXED_CATEGORIES[node.op]
    if node.op == "call_module":
        name = type(gm.get_submodule(node.target)).__name__.lower()
    elif isinstance(node.target, torch._ops.OpOverload):
        name = node.target._schema.name.partition("::")[2].lower().strip("_")  # "aten::add_" -> "add"
    else:
        name = target_name(node).rpartition(".")[2].lower().strip("_")
    for category, keys in _NAME_CATEGORIES:
        # Short keys ("mm", "t", "to") must match the whole name, longer ones a part of it.
        if any(name == k or (len(k) > 3 and k in name) for k in keys):
            return category
    return "other"


def colocation_sets(g: nx.DiGraph) -> list[list[str]]:
    """Nodes that use the same parameter or buffer must share a device; overlapping sets
    are merged. Sorted by fx order, so the result is deterministic."""
    users: dict[str, list[str]] = {}
    for name, data in g.nodes(data=True):
        for param in data["params"]:
            users.setdefault(param, []).append(name)
    tied = nx.Graph()
    for nodes in users.values():
        if len(nodes) > 1:
            nx.add_path(tied, nodes)
    order = nx.get_node_attributes(g, "order")
    sets = [sorted(c, key=order.__getitem__) for c in nx.connected_components(tied)]
    return sorted(sets, key=lambda s: order[s[0]])


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> the first name the model gives it, so a tied weight reached under two
    names (decoder.weight is encoder.weight) is recognised as one tensor."""
    names: dict[int, str] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(id(tensor), name)
    return names


def node_params(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Qualified names (as the captured module spells them) of the parameters and
    buffers a node reads: its own get_attr target, a leaf module's tensors, or the
    targets of the get_attr nodes it takes as inputs, or whose tensors it updates in
    place through views and other updates (`self.ema.mul_(a).add_(b)`: the add_
    updates `ema`; graphs.schedule.written_state), so that a parameter's readers are
    placed with it, and a buffer is updated where it lives. Attributes that are not
    tensors (a subgraph of a higher-order op) are not listed."""
    if node.op == "get_attr":
        return [str(node.target)] if isinstance(operator.attrgetter(str(node.target))(gm), torch.Tensor) else []
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        prefix = f"{node.target}."
        return [prefix + n for n, _ in module.named_parameters()] + [prefix + n for n, _ in module.named_buffers()]
    reads = [a for a in node.all_input_nodes if a.op == "get_attr"] + written_state(node, gm)
    return list(dict.fromkeys(name for a in reads for name in node_params(gm, a)))



def node_tensors(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """The tensors `node_params` names: what the node reads of the module's state."""
    return [operator.attrgetter(name)(gm) for name in node_params(gm, node)]

def _params_used(node: fx.Node, gm: fx.GraphModule, canonical: dict[int, str]) -> dict[str, int]:
    """{canonical name: bytes} of what the node reads (a tied tensor under one name)."""
    used = {}
    for name in node_params(gm, node):
        t = operator.attrgetter(name)(gm)
        if isinstance(t, torch.Tensor) and id(t) in canonical:
            used[canonical[id(t)]] = t.numel() * t.element_size()
    return used


def _node_bytes(node: fx.Node, gm: fx.GraphModule) -> int:
    """Bytes of the node's output: a get_attr's tensor, fx's recorded tensor_meta, or
    export's fake value (dynamic sizes at the example batch's values)."""
    if node.op == "get_attr":
        value = operator.attrgetter(str(node.target))(gm)
        return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
    if "tensor_meta" in node.meta:
        return _meta_bytes(node.meta["tensor_meta"])
    return _value_bytes(node.meta.get("val"))


def _value_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        numel = 1
        for d in value.shape:
            numel *= d if isinstance(d, int) else int(d.node.hint or 0)
        return numel * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_value_bytes(v) for v in value)
    return 0


def _meta_bytes(meta) -> int:
    """Bytes of every tensor described by the (possibly nested) tensor_meta."""
    if isinstance(meta, TensorMetadata):  # a NamedTuple: test before the tuple case
        return math.prod(int(d) for d in meta.shape) * torch.empty((), dtype=meta.dtype).element_size()
    if isinstance(meta, (tuple, list)):
        return sum(_meta_bytes(m) for m in meta)
    if isinstance(meta, dict):
        return sum(_meta_bytes(m) for m in meta.values())
    return 0


def _edge_bytes(src: fx.Node, dst: fx.Node, g: nx.DiGraph) -> int:
    """What crosses src -> dst: the producer's output, or the element a getitem selects (LSTM's (out, (h, c)))."""
    if dst.op == "call_function" and dst.target is operator.getitem and dst.args[0] is src:
        return g.nodes[dst.name]["out_bytes"]
    return g.nodes[src.name]["out_bytes"]
