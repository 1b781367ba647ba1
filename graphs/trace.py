"""Capture a model as one torch.fx graph: the graph that capture (graphs.capture),
profiling, plans, the runtime and the distributed backend all use.

Two captures, tried in this order (the choice and why: docs/DESIGN.md, "Capture"):

1. torch.export, non-strict, training IR (graphs.trace_export): aten ops at op
   grain, keyword arguments, structured outputs (ModelOutput, dicts, namedtuples)
   and buffers updated in forward are recorded as the model runs them; dims of the
   example batch are dynamic where the model allows. Needs an example call and
   torch >= 2.5.
2. torch.fx symbolic tracing (graphs.trace_fx): for older torch, for workloads that
   name `leaf_modules` (export cannot keep a module whole) and for models export
   refuses. A submodule fx cannot trace becomes one opaque node (a "leaf").

Either way the result is one normalized form, `Traced`: flat placeholders, an output
node returning a flat tuple (rebuilt to the eager type by `Traced.unflatten`), no
unused pure nodes, and get_attr nodes that read the model's own tensors (never
copies). A capture is made
in one mode (train or eval: dropout and mode-dependent branches are frozen into it)
and covers the calls `Traced.bind` accepts; the runtime keeps one capture per mode
and input shape. Capturing never changes the model: parameters and buffers are not
written (export runs on fake tensors), and attributes a forward sets are restored;
a forward that sets a Python attribute cannot be captured (CaptureError).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import operator
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from graphs.errors import CaptureError, exit_error

METHODS = ("auto", "export", "fx")
MODES = ("train", "eval")
_ACCEPTED_MAX = 256  # signatures a capture remembers as accepted (calls with ever new shapes run the guard)

# nn.Module's own bookkeeping: not state a forward may be caught changing.
_MODULE_ATTRS = frozenset({
    "training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_backward_hooks",
    "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_is_full_backward_hook", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
})


@dataclass(frozen=True)
class Traced:
    """One capture of a model, in one mode, for one kind of call.

    `gm` is normalized (see the module doc): `gm(*flat)` takes one value per
    placeholder and returns the flat tuple of output leaves. Its get_attr nodes read
    the model's own parameters and buffers.
    """

    gm: fx.GraphModule
    leaf_paths: tuple[str, ...]  # module paths kept whole (fx only): fx failed inside them, or asked for
    fallback_notes: tuple[str, ...]  # one line per fallback, for the user
    method: str  # "export" or "fx"
    training: tuple[bool, ...]  # each module's training flag (model.modules() order) at capture
    signature: inspect.Signature  # of the model's forward
    out_spec: TreeSpec  # rebuilds the eager output from the flat output leaves
    # (forward input, dim): batch dims other than 0 that the capture keeps free (export; trace_model's batch_dims)
    batch_dims: tuple[tuple[str, int], ...] = ()
    # export: how a call flattens onto the placeholders, and the non-tensor leaves it baked in
    in_spec: TreeSpec | None = None
    constants: tuple[tuple[int, Any], ...] = ()
    # fx: arguments baked in (omitted ones at their defaults); the placeholders are the others
    concrete: dict[str, Any] = field(default_factory=dict)
    # None, or why flat placeholder values fall outside what the capture covers (shapes, dtypes)
    guard: Callable[[list], str | None] | None = field(default=None, compare=False)
    # the (dtype, shape) signatures the guard accepted, so that it runs once per signature (a guard
    # reads nothing else): export's size checks and guard function cost 3-25 us, each placed call
    _accepted: set = field(default_factory=set, init=False, compare=False, repr=False)

    @functools.cached_property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    @property
    def output_leaves(self) -> list:
        """The output node's flat leaves: nodes, or constants the model returns."""
        return list(next(n for n in self.gm.graph.nodes if n.op == "output").args[0])

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """Placeholder name -> value for the call `model(*args, **kwargs)`, or None when
        this capture does not cover it (other arguments given, other constants, shapes
        or dtypes outside its guard). Raises TypeError as Python would for a call the
        forward's signature rejects."""
        return self._match(args, kwargs)[0]

    def why_not(self, args: tuple, kwargs: dict) -> str:
        """One phrase: why `bind` refuses the call (for error messages)."""
        return self._match(args, kwargs)[1]

    def unflatten(self, leaves: list) -> Any:
        """The eager output built from the output's flat leaves (fresh containers:
        mutable where eager's are)."""
        return tree_unflatten(list(leaves), self.out_spec)

    def run(self, *args, **kwargs) -> Any:
        """Run the captured graph as the model would run (tests and checks). Raises
        CaptureError for a call the capture does not cover (`why_not` says why)."""
        values, reason = self._match(args, kwargs)
        if values is None:
            raise CaptureError(f"this {self.method} capture does not cover the call: {reason}")
        return self.unflatten(self.gm(*values.values()))

    @functools.cached_property
    def _placeholder_names(self) -> list[str]:
        return [n.name for n in self.placeholders]

    @functools.cached_property
    def _tensor_arity(self) -> int | None:
        """How many tensors a call `model(*tensors)` passes when it binds to the
        placeholders one to one, as canonical_call and the input spec would find (an
        export capture of positional tensors only; no tensor default a call could pass
        itself, no required keyword-only argument); None where calls take the long way."""
        if self.method != "export" or self.in_spec is None or self.constants:
            return None
        n = self.in_spec.num_leaves
        if tree_flatten((tuple(range(n)), {}))[1] != self.in_spec:
            return None
        params = list(self.signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        if (any(isinstance(p.default, torch.Tensor) for p in params) or len(required) > n
                or any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params)
                or (n > len(positional) and not any(p.kind == p.VAR_POSITIONAL for p in params))):
            return None
        return n

    def _match(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any] | None, str]:
        """(placeholder values, "") for a call this capture covers, else (None, why not)."""
        if not kwargs and len(args) == self._tensor_arity and all(isinstance(a, torch.Tensor) for a in args):
            values = dict(zip(self._placeholder_names, args))  # what the long way finds, without binding
            reason = self._refusal(args)
            return (None, reason) if reason else (values, "")
        bound = canonical_call(self.signature, args, kwargs)
        if self.method == "export":
            flat, spec = tree_flatten((bound.args, bound.kwargs))
            if spec != self.in_spec or not all(_same(flat[i], v) for i, v in self.constants):
                passed = ", ".join(k if isinstance(v, torch.Tensor) else f"{k}={_brief(v)}"
                                   for k, v in bound.arguments.items())
                return None, f"it was captured for other arguments or Python values than this call's ({passed})"
            values = dict(zip(self._placeholder_names, flat))
        else:
            bound.apply_defaults()
            if not all(_same(bound.arguments.get(k), v) for k, v in self.concrete.items()):
                baked = ", ".join(f"{k}={v!r}" for k, v in self.concrete.items())
                return None, f"it was captured with {baked}"
            values = {n.name: bound.arguments.get(str(n.target)) for n in self.placeholders}
        reason = self._refusal(list(values.values()))
        return (None, reason) if reason else (values, "")

    def _refusal(self, flat: Sequence) -> str | None:
        """The guard's answer for flat placeholder values (None: covered), asked once per
        signature of dtypes and shapes. Non-tensor values are the capture's constants
        (checked by `_match` before), so only the tensors' signatures tell calls apart."""
        if self.guard is None:
            return None
        key = tuple((x.dtype, x.shape) if isinstance(x, torch.Tensor) else None for x in flat)
        if key in self._accepted:
            return None
        reason = self.guard(list(flat))
        if reason is None and len(self._accepted) < _ACCEPTED_MAX:
            self._accepted.add(key)
        return reason


def trace_model(model: nn.Module, leaf_modules: Iterable[type] = (), leaf_paths: Iterable[str] = (),
                allow_fallback: bool = True, *, inputs: tuple | None = None, kwargs: dict | None = None,
                method: str = "auto", mode: str | None = "train",
                batch_dims: Mapping[str, int | None] | None = None) -> Traced:
    """Capture `model` called as `model(*inputs, **kwargs)` in `mode` as a Traced graph.

    Parameters
    ----------
    model : the module to capture; left as it was found (modes and attributes restored).
    leaf_modules : module classes to keep whole (fx only; their presence selects fx).
    leaf_paths : module paths to keep whole (a plan records the fallback leaves, so
        that a re-capture reproduces the graph).
    allow_fallback : fx only: make a submodule that fails to trace a leaf and retry.
    inputs, kwargs : the example call. Without `inputs` only fx can capture (every
        forward parameter becomes a placeholder). Their values never matter: shapes,
        dtypes and devices do.
    method : "auto" (export, else fx with a note), "export" or "fx".
    mode : "train" or "eval" (every module's flag set for the capture, then restored),
        or None for the flags as they are.
    batch_dims : forward input -> the dimension its batch lies along (the workload's;
        None: not batched), kept dynamic by export so that micro-batches of any size
        fit the capture (dim 0 always is). Recorded in `Traced.batch_dims`.

    Returns
    -------
    The capture, on a graph of its own. The same model, or a copy made by
    `Workload.fresh_model`, captured again the same way gets the kept capture
    (graphs.trace_cache) instead of a new one.

    Raises
    ------
    CaptureError : neither capture works (naming the module, the source line and the
        fix), or a forward sets a Python attribute a graph cannot repeat.
    WorkloadError : the model's forward ended the process (sys.exit); a model that
        fails on its inputs shows in graphs.capture and graphs.profile.
    """
    from graphs import trace_cache
    from graphs.trace_effects import no_side_effects, refuse_input_writes
    from graphs.trace_export import export_available, export_model
    from graphs.trace_fx import cache_hint, trace_fx

    if method not in METHODS:
        raise ValueError(f"unknown capture method {method!r}; choose from {', '.join(METHODS)}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)} or None")
    leaf_classes, paths = tuple(leaf_modules), tuple(leaf_paths)
    use_export = method == "export" or (method == "auto" and inputs is not None and not leaf_classes
                                        and not paths and export_available())
    kwargs = dict(kwargs or {})
    with in_mode(model, mode):
        free = tuple(sorted((name, dim) for name, dim in (batch_dims or {}).items() if dim))  # None: unbatched
        options = (use_export, method, training_flags(model), leaf_classes, paths, allow_fallback, inputs is None)
        key = trace_cache.request_key(options, tuple(inputs or ()), kwargs)  # fx's: it keeps every size free
        # an export depends on neither the method that asked for it nor allow_fallback (fx only): "auto" and
        # "export" share it (profiling and placer.apply ask for the capture that capture() made)
        export_key = trace_cache.request_key(("export", options[2:5], inputs is None, free), tuple(inputs or ()),
                                             kwargs)
        kept = trace_cache.lookup(model, export_key) if use_export else None
        if kept is None:
            kept = trace_cache.lookup(model, key)  # an "auto" whose export failed before: its fx capture
        if kept is not None:
            return kept
        export_error = None
        if use_export:
            try:
                with no_side_effects(model, recorded=True):
                    traced = export_model(model, tuple(inputs or ()), kwargs, free)
                refuse_input_writes(traced.gm, model)
                return trace_cache.store(model, export_key, traced)  # only a capture that passed every check
            except CaptureError:
                raise
            except SystemExit as exc:  # the model's forward ran (on fake tensors) and ended the process
                raise exit_error(f"the model's forward ({type(model).__name__})", exc.code) from None
            except Exception as exc:  # export raises many types from user code and from itself
                if method == "export":
                    raise CaptureError(f"torch.export cannot capture {type(model).__name__}: "
                                       f"{cache_hint(exc) or first_sentence(exc)}") from exc
                export_error = exc
        try:
            with no_side_effects(model, recorded=False):
                traced = trace_fx(model, leaf_classes, paths, allow_fallback, inputs, kwargs, export_error)
        except SystemExit as exc:
            raise exit_error(f"the model's forward ({type(model).__name__})", exc.code) from None
        if export_error is not None:
            hint = cache_hint(export_error)
            note = (f"torch.export could not capture the model ({first_sentence(export_error)}); "
                    f"captured with torch.fx instead" + (f" (to capture it whole, {hint})" if hint else ""))
            traced = _with_note(traced, note)
        refuse_input_writes(traced.gm, model)
        return trace_cache.store(model, key, traced)


def _brief(value: Any) -> str:
    """A value for a one-line message: tensors inside it as their shapes, cut short."""
    return reprlib.repr(tree_map(lambda v: f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else v, value))


def canonical_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """`args`/`kwargs` bound as Python binds them, minus arguments passed at their default value
    itself (`f(x)`, `f(x, mask=None)`: one call). TypeError names the rejecting signature's parameters."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:  # inspect's words alone ("too many positional arguments") name no function
        raise TypeError(f"forward({', '.join(signature.parameters)}): {exc}") from None
    for name, param in signature.parameters.items():
        variadic = param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        if name in bound.arguments and not variadic and bound.arguments[name] is param.default:
            del bound.arguments[name]
    return bound


def training_flags(model: nn.Module) -> tuple[bool, ...]:
    """Every module's training flag, in model.modules() order: the mode a capture froze.
    (The walk is written out: named_modules names every module, at 2-4x the cost.)"""
    flags: list[bool] = []
    seen: set[nn.Module] = set()

    def visit(module: nn.Module) -> None:
        seen.add(module)
        flags.append(module.training)
        for child in module._modules.values():
            if child is not None and child not in seen:
                visit(child)

    visit(model)
    return tuple(flags)


@contextlib.contextmanager
def in_mode(model: nn.Module, mode: str | None) -> Iterator[None]:
    """The block run with the model in `mode` ("train", "eval"; None: as it is), flags restored after."""
    flags = training_flags(model)
    if mode is not None:
        model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in zip(model.modules(), flags):
            m.training = flag


def _equal(a: Any, b: Any) -> bool:
    """a == b as a truth value; tensors by shape and values; False where == fails."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and not a.is_meta and not b.is_meta and bool(torch.equal(a, b)))
    try:
        return bool(a == b)
    except Exception:  # values whose == is not a truth value
        return False


def _with_note(traced: Traced, note: str) -> Traced:
    from dataclasses import replace
    return replace(traced, fallback_notes=(note, *traced.fallback_notes))


def _same(a: Any, b: Any) -> bool:
    """Whether a call's non-tensor argument `a` is the constant `b` a capture baked in."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    return _equal(a, b)


def first_line(exc: BaseException) -> str:
    """The exception's message cut to one line, for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def first_sentence(exc: BaseException) -> str:
    """The first sentence of the message's first line (torch.export's run on, with
    advice that does not apply here)."""
    line = first_line(exc)
    return line.split(". ", 1)[0].rstrip(".")


def module_label(node: fx.Node) -> str | None:
    """The innermost module of the capture's nn_module_stack for messages, "module 'path'
    (Class)" or "the model (Class)"; None where the capture recorded no stack. The class
    is a type, or a string that export qualifies by its module ("<class 'a.B'>", "a.B")."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].rstrip("'>")
    return f"module '{path}' ({name})" if path else f"the model ({name})"


def target_name(node: fx.Node) -> str:
    """A process-independent name of a node's target (a function's repr has an address);
    an aten op is named by its overload, e.g. "aten.linear.default"."""
    if isinstance(node.target, str):
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target)
    try:
        return fx.node._get_qualified_name(node.target)
    except Exception:  # some builtins have no importable qualified name
        return getattr(node.target, "__name__", type(node.target).__name__)


def fingerprint(model: nn.Module, gm: fx.GraphModule) -> str:
    """A short hash of the model's parameter and buffer names, shapes and dtypes and of
    the captured graph's structure (node ops, targets, names and edges). Equal models
    give equal fingerprints. A constant the capture stowed on the graph (not one of
    the model's tensors) counts by shape and dtype, not by its attribute name, which
    may differ between captures. (Otherwise the hash plan format v1 used.)"""
    h = hashlib.sha256()
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    for name, tensor in _named_tensors(model):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    for node in gm.graph.nodes:
        inputs = ",".join(n.name for n in node.all_input_nodes)
        target = target_name(node)
        if node.op == "get_attr":
            value = operator.attrgetter(target)(gm)
            if isinstance(value, torch.Tensor) and id(value) not in owned:
                target = f"constant{tuple(value.shape)}:{value.dtype}"
        h.update(f"{node.op}|{target}|{node.name}|{inputs};".encode())
    return h.hexdigest()[:16]


def tensors_fingerprint(model: nn.Module) -> str:
    """A short hash of the parameter and buffer names and shapes (part of `fingerprint`):
    a plan tells another model by it before capturing."""
    text = "".join(f"{name}:{tuple(tensor.shape)};" for name, tensor in _named_tensors(model))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph in the form every Traced has (module doc), changed in place: unused
    pure nodes dropped, a parameter or buffer returned as an output returned through
    an alias (a node that some device computes, so that the runtime returns it like any
    output and its gradient reaches the parameter), and plain code generation (flat
    placeholders in, the flat output tuple out)."""
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if not node.users and is_pure(node):
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    for read in [n for n in output.all_input_nodes if n.op == "get_attr"]:
        with graph.inserting_before(output):  # named after what it returns, for messages about outputs
            alias = graph.create_node("call_function", torch.ops.aten.alias.default, (read,),
                                      name=f"{str(read.target).replace('.', '_')}_output")
        alias.meta = dict(read.meta)
        output.replace_input_with(read, alias)
    graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()  # older torch checks the pytree input structure there
    gm.recompile()
    return gm


def is_pure(node: fx.Node) -> bool:
    """Whether dropping the node, when nothing reads it, changes nothing: a get_attr,
    an indexing, or an aten op that writes none of its arguments."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.target in fx.node._side_effectful_functions:
        return False
    if node.target is operator.getitem:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.is_mutable
