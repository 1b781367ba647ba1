"""Workloads: a model, one example training batch, its loss and optimizer.

The workload-file contract (DESIGN.md): a Python file defining `build_model()` and
`example_inputs()`; optionally `loss_fn(output, *inputs)`, `make_optimizer(params)`,
`leaf_modules`, `expert_placement(module_path, n_devices)`, and for micro-batches
`batch_dims = {"input_name": dim}` (the dimension each forward input's batch lies
along; default 0; None: not batched, never split) and `microbatch_statistics = True` (accept batch statistics,
BatchNorm say, computed per micro-batch; default False: such models are not
micro-batched). `zoo:NAME[:SIZE]` names a bundled workload instead (graphs.zoo).
Each function's signature is checked when the file loads, before placer calls it:
one that cannot take the arguments placer passes (a `loss_fn(output)` given the
output and the inputs) is a WorkloadError naming the signature required.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from graphs.errors import WorkloadError, exit_error
from graphs.trace_cache import note_copy
from graphs.workload_file import check_workload_file, first_line

LossFn = Callable[..., torch.Tensor]
OptimizerFactory = Callable[..., torch.optim.Optimizer]
ExpertFn = Callable[[str, int], "int | None"]


def default_loss(output, *inputs) -> torch.Tensor:
    """The loss of a workload without `loss_fn`: the sum, over every floating-point
    tensor in the output (a tensor, or the tensors inside tuples, lists, dicts,
    namedtuples and ModelOutputs), of its mean.

    Raises WorkloadError when the output holds no floating-point tensor."""
    leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise WorkloadError(f"the default loss (the sum of the means of the output's floating-point tensors) "
                            f"finds none in the model's {type(output).__name__} output: define "
                            f"loss_fn(output, *inputs) in the workload file")
    return sum(t.float().mean() for t in leaves)


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


@dataclass(frozen=True)
class WorkloadFunction:
    """A function of the workload file, called as itself, except that ending the
    process from it (`sys.exit(n)`, `exit()`, `raise SystemExit`) is a WorkloadError
    naming the file and the function. (KeyboardInterrupt stays an interruption;
    `os._exit` ends the process before anything can see it.)"""

    label: str  # the workload spec: a path or zoo:NAME
    name: str  # the function's name in the workload file
    fn: Callable[..., Any]
    # None, or what is wrong with a value the function returned (None: nothing), e.g. _scalar_loss
    check: Callable[[Any], str | None] | None = None

    def __call__(self, *args, **kwargs):
        try:
            value = self.fn(*args, **kwargs)
        except SystemExit as exc:
            raise exit_error(f"{self.label}: {self.name}()", exc.code) from None
        problem = None if self.check is None else self.check(value)
        if problem is not None:
            raise WorkloadError(f"{self.label}: {self.name}() {problem}")
        return value


def _scalar_loss(value: object) -> str | None:
    """What is wrong with a loss_fn's result, or None for a one-element tensor (what
    backward() takes without an explicit gradient)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return None
    what = f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    return f"returned {what}; loss_fn must return a scalar tensor: reduce it, e.g. with .mean() or .sum()"


@dataclass
class Workload:
    name: str  # short name for output folders and reports, e.g. "nmt-small"
    spec: str  # what the user wrote: a path or "zoo:nmt:small"
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss_fn: LossFn = default_loss
    make_optimizer: OptimizerFactory = default_optimizer
    leaf_modules: tuple[type, ...] = ()
    expert_placement: ExpertFn | None = None  # module path, n_devices -> device index or None
    batch_dims: dict[str, int | None] = field(default_factory=dict)  # forward input -> its batch dim (0; None: never)
    microbatch_statistics: bool = False  # accept batch statistics computed per micro-batch
    notes: list[str] = field(default_factory=list)  # things the user should be told (fallbacks)

    def fresh_model(self) -> nn.Module:
        """An independent copy with the same initial weights (each placement is measured
        on its own copy, so that moving parameters never leaks between runs). Captures
        of the model serve the copy too (graphs.trace_cache)."""
        fresh = copy.deepcopy(self.model)
        note_copy(fresh, self.model)
        return fresh


def load_workload(spec: str, seed: int = 0) -> Workload:
    """Load a workload from a file path or `zoo:NAME[:SIZE]` (size "small" by default).

    Torch's RNG is seeded with `seed` before the model and the inputs are built, so two
    loads give equal weights and inputs. Every contract violation raises WorkloadError
    with one line naming the file (or zoo name) and the problem.
    """
    if spec.startswith("zoo:"):
        return _build(spec, *_zoo_source(spec), seed)
    # The file's folder is importable while it loads and builds, as under `python FILE`
    # (a workload may import a module beside it); it leaves sys.path afterwards.
    with _folder_on_path(Path(spec).resolve().parent):
        return _build(spec, _import_file(spec), Path(spec).stem, seed)


@contextlib.contextmanager
def _folder_on_path(folder: Path) -> Iterator[None]:
    """Put `folder` first on sys.path for the block, then take it off again (unless it was there)."""
    entry = str(folder)
    if entry in sys.path:
        yield
        return
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def _build(spec: str, source: object, short_name: str, seed: int) -> Workload:
    """The Workload of an imported workload module (see load_workload)."""
    for required in ("build_model", "example_inputs"):
        if not callable(getattr(source, required, None)):
            raise WorkloadError(f"{spec}: defines no {required}() function (a workload file needs "
                                f"build_model() and example_inputs())")
        _check_signature(spec, required, getattr(source, required), 0)

    torch.manual_seed(seed)
    model = _call(spec, "build_model", source.build_model)
    if not isinstance(model, nn.Module):
        raise WorkloadError(f"{spec}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise WorkloadError(f"{spec}: build_model() returned a {type(model).__name__} without parameters: there is "
                            f"nothing to train or place (build the model whose weights should be spread)")
    if not any(p.requires_grad for p in model.parameters()):  # a training step's backward would fail (trial 12)
        raise WorkloadError(f"{spec}: no parameter of the {type(model).__name__} build_model() returned requires "
                            f"grad: there is nothing to train (unfreeze what should train, e.g. a head left frozen "
                            f"with the backbone: requires_grad_(True))")
    batch = _as_tensor_tuple(spec, _call(spec, "example_inputs", source.example_inputs))
    leaf_modules = tuple(getattr(source, "leaf_modules", ()) or ())
    bad = [repr(c) for c in leaf_modules if not isinstance(c, type)]
    if bad:
        raise WorkloadError(f"{spec}: leaf_modules must list module classes, got {', '.join(bad)}")

    _check_forward(spec, model, batch)

    def optional(name: str, n_args: int, check: Callable[[Any], str | None] | None = None) -> WorkloadFunction | None:
        fn = getattr(source, name, None)
        if fn is None:
            return None
        if not callable(fn):
            raise WorkloadError(f"{spec}: {name} is a {type(fn).__name__}, not a function")
        _check_signature(spec, name, fn, n_args)
        return WorkloadFunction(spec, name, fn, check)

    return Workload(
        name=short_name, spec=spec, model=model, inputs=batch,
        loss_fn=optional("loss_fn", 1 + len(batch), _scalar_loss) or default_loss,
        make_optimizer=optional("make_optimizer", 1) or default_optimizer,
        leaf_modules=leaf_modules,
        expert_placement=optional("expert_placement", 2),
        batch_dims=_batch_dims(spec, getattr(source, "batch_dims", None), model, batch),
        microbatch_statistics=_flag(spec, "microbatch_statistics", getattr(source, "microbatch_statistics", False)),
    )


# How placer calls each function of a workload file (every argument positional).
_HOOK_CALLS = {
    "build_model": "build_model()",
    "example_inputs": "example_inputs()",
    "loss_fn": "loss_fn(output, *inputs)",
    "make_optimizer": "make_optimizer(params)",
    "expert_placement": "expert_placement(module_path, n_devices)",
}


def _check_signature(spec: str, name: str, fn: Callable[..., Any], n_args: int) -> None:
    """Refuse a workload function that cannot take the `n_args` positional arguments
    placer calls it with (_HOOK_CALLS), before it is called: loss_fn gets the model's
    output and then every example input. A callable whose signature Python cannot
    read (some builtins) passes: its call will tell.

    Raises WorkloadError naming the function, its signature and the one required."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(n_args))
    except TypeError as exc:
        given = f" (here {n_args} arguments: the output and {n_args - 1} example input(s))" if name == "loss_fn" else ""
        raise WorkloadError(f"{spec}: {name}{signature} cannot be called as {_HOOK_CALLS[name]}{given}: {exc}; "
                            f"define it as def {_HOOK_CALLS[name]}") from None


def _check_forward(spec: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Refuse a model whose forward cannot take the example inputs as positional
    arguments, the way placer calls it (`model(*example_inputs())`), before any capture:
    a keyword-only `forward(self, *, x)`, say. A forward whose signature Python cannot
    read passes: its call will tell.

    Raises WorkloadError naming the forward's signature and how to wrap the model."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*inputs)
    except TypeError as exc:
        params = list(signature.parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY]
        needed = [p.name for p in keyword_only if p.default is p.empty] or [p.name for p in keyword_only]
        if needed:
            names = ", ".join(needed)
            passed = ", ".join(positional + [f"{n}={n}" for n in needed])
            fix = (f"placer passes example_inputs() positionally and {names} {'is' if len(needed) == 1 else 'are'} "
                   f"keyword-only: wrap the model in a module whose forward takes {names} positionally, e.g. "
                   f"def forward(self, {', '.join(positional + needed)}): return self.model({passed})")
        else:
            fix = "make example_inputs() return one tensor for each argument forward needs, in its order"
        raise WorkloadError(f"{spec}: {type(model).__name__}.forward{signature} cannot be called as "
                            f"model(*example_inputs()) with {len(inputs)} tensor(s) ({exc}); {fix}") from None


def forward_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Forward parameter name -> the example tensor `model(*inputs)` binds to it (the
    names `batch_dims` may use; a `*args` parameter names none). Empty when the
    inputs do not fit the forward's signature (capture then says why)."""
    try:
        bound = inspect.signature(model.forward).bind(*inputs)
    except (TypeError, ValueError):
        return {}
    return {name: value for name, value in bound.arguments.items() if isinstance(value, torch.Tensor)}


def _batch_dims(spec: str, value: object, model: nn.Module,
                inputs: tuple[torch.Tensor, ...]) -> dict[str, int | None]:
    """The workload's `batch_dims`, checked against the forward's inputs and the
    example batch, negative dimensions counted from the end, None kept (an input never
    split, which does not define the batch either); {} when the file names none.
    Raises WorkloadError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise WorkloadError(f"{spec}: batch_dims must map forward input names to dimensions (None: never split), "
                            f"e.g. batch_dims = {{'x': 1}}, got {value!r}")
    named = forward_inputs(model, inputs)
    dims: dict[str, int | None] = {}
    for name, dim in value.items():
        if name not in named:
            raise WorkloadError(f"{spec}: batch_dims names {name!r}, which is not an input of "
                                f"{type(model).__name__}.forward that example_inputs() fills "
                                f"(its inputs: {', '.join(named) or 'none by name'}): name one of those")
        if dim is None:
            dims[name] = None
            continue
        rank = named[name].dim()
        if rank == 0:
            raise WorkloadError(f"{spec}: batch_dims names {name!r}, a tensor without dimensions (no batch to "
                                f"split): leave it out of batch_dims")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -rank <= dim < rank:
            raise WorkloadError(f"{spec}: batch_dims[{name!r}] = {dim!r}, but {name} has shape "
                                f"{list(named[name].shape)}: use a whole number from 0 to {rank - 1}, or None if "
                                f"{name} is not batched")
        dims[name] = dim % rank
    first = next((n for n, t in named.items() if t.dim() > 0 and dims.get(n, 0) is not None), None)
    if first is not None:
        rows = named[first].shape[dims.get(first, 0)]
        wrong = [n for n, d in dims.items() if d is not None and named[n].shape[d] != rows]
        if wrong:
            raise WorkloadError(f"{spec}: batch_dims puts {wrong[0]}'s batch along dimension {dims[wrong[0]]} "
                                f"(size {named[wrong[0]].shape[dims[wrong[0]]]}), but the batch has {rows} rows "
                                f"({first} along dimension {dims.get(first, 0)}): name the dimension as long as "
                                f"the batch")
    return dims


def _flag(spec: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise WorkloadError(f"{spec}: {name} must be True or False, got {value!r}")
    return value


def _zoo_source(spec: str) -> tuple[object, str]:
    """(the zoo's workload namespace with the size bound, short name) for `zoo:NAME[:SIZE]`."""
    from graphs.zoo import workload_module  # imported late: the zoo pulls in every model definition

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise WorkloadError(f"{spec}: expected zoo:NAME or zoo:NAME:SIZE")
    name, size = parts[1], parts[2] if len(parts) == 3 else "small"
    return workload_module(name, size), f"{name}-{size}"


def _import_file(path_str: str) -> ModuleType:
    """Import a workload file under a unique module name (two files may share a stem)."""
    path = check_workload_file(path_str)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"placer_workload_{digest}_{stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so that classes defined there pickle and deepcopy
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a script's sys.exit() at import must not end placer
        del sys.modules[module_name]
        raise WorkloadError(f"{path_str}: importing it raised {type(exc).__name__}: {first_line(exc)}") from exc
    return module


def _call(label: str, what: str, fn: Callable[[], object]) -> object:
    try:
        return WorkloadFunction(label, what, fn)()
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(f"{label}: {what}() raised {type(exc).__name__}: {first_line(exc)}") from exc


def _as_tensor_tuple(label: str, value: object) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if not isinstance(value, (tuple, list)):
        hint = f": {_wrapper_hint(value)}" if isinstance(value, Mapping) else ""
        raise WorkloadError(f"{label}: example_inputs() returned {type(value).__name__}; "
                            f"it must return a tuple of tensors{hint}")
    for i, item in enumerate(value):
        if not isinstance(item, torch.Tensor):
            raise WorkloadError(f"{label}: example_inputs() item {i} is {type(item).__name__}, not a tensor; "
                                f"it must return a tuple of tensors: {_wrapper_hint(item)}")
    return _own_memory(tuple(value))


def _own_memory(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`batch` with every tensor that shares memory with an earlier one cloned (`(ids, ids)`
    for labels that are the inputs): torch.export captures aliased inputs as one, and
    placer.apply captures again from separate tensors, so a plan made from the aliased
    batch would match no later capture of the model. The values are unchanged."""
    seen: set[int] = set()
    owned = []
    for x in batch:
        address = x.untyped_storage().data_ptr() if x.layout == torch.strided else 0
        owned.append(x.detach().clone().requires_grad_(x.requires_grad) if address and address in seen else x)
        seen.add(address)
    return tuple(owned)


def _wrapper_hint(item: object) -> str:
    """How to give placer tensors only when the model takes `item`, a non-tensor input:
    a wrapper module whose forward takes the tensors and rebuilds `item` from them."""
    if isinstance(item, Mapping):
        keys = list(item)
        names = [k if isinstance(k, str) and k.isidentifier() else f"x{j}" for j, k in enumerate(keys)]
        call = "{" + ", ".join(f"{k!r}: {n}" for k, n in zip(keys, names)) + "}"
    elif isinstance(item, (tuple, list)):
        names = [f"x{j}" for j in range(len(item))]
        call = f"({', '.join(names)}{',' if len(names) == 1 else ''})" if isinstance(item, tuple) else f"[{', '.join(names)}]"
    else:
        return (f"a {type(item).__name__} is no input to place: give it to the model inside a wrapper module "
                f"(def forward(self, x): return self.model(x, {item!r})) or as a default of forward")
    return (f"wrap the model in a module whose forward takes the {type(item).__name__}'s tensors as arguments, e.g. "
            f"def forward(self, {', '.join(names)}): return self.model({call}), and return them as a tuple from "
            f"example_inputs()")
