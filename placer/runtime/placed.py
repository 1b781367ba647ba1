"""Run a placed model for real: `apply(model, plan)` returns an ordinary nn.Module.

    placed = placer.apply(build_model(), "plan.json")
    opt = torch.optim.SGD(placed.parameters(), lr=0.1)
    loss = loss_fn(placed(x), x); loss.backward(); opt.step()

How: capture the model as the plan's capture did (graphs.trace; checked by
fingerprint), move each parameter and buffer to the device of the nodes that read it,
fuse same-device runs of nodes into chunks (chunks.py) and run them on per-device
workers, forward and backward (executor.py, through `Executor.run` only).

A capture freezes one mode and covers calls of some shapes (graphs.trace), so the
module keeps one placed graph per capture: the training capture of the plan, an
eval capture, and captures for other arguments or shapes (a partial last batch of
size 1, another sequence length the model fixes, another value of a Python float
argument), made on first use and kept, the `EXTRA_CAPTURES` most recently used of
them: a loop whose calls each need one (an annealed float, padding to each batch's
own length) would otherwise grow without bound, and a warning says so once. A
node of another capture takes the device of the same node (name, target and module)
in the training capture, else its module's, else its producer's. Each call picks
the capture of the current mode (the `training` flag of every module the model had
when placed, set by `train()`/`eval()`) that accepts its arguments. Capturing after
the parameters were spread over several torch devices is impossible (torch.export
runs on fake tensors, which refuse mixed devices): the eval capture is then made at
apply time, and a call that needs yet another capture is a one-line PlanError
saying how to avoid it.

The output is rebuilt to the eager type (ModelOutput, namedtuple, dict, tuple) on
the device of the first tensor input, like accelerate's dispatched models.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.capture import canonical_names, example_like, node_tensors, owning_module
from graphs.devices import Cluster, Device
from graphs.errors import CaptureError, ExecutionError, PlanError
from graphs.trace import Traced, trace_model
from graphs.trace_effects import raise_eager_error
from graphs.trace_inputs import input_names, placeholder_dims
from placer.plan import Plan, load_plan, plan_cluster, trace_for_plan
from placer.runtime import microbatch
from placer.runtime.executor import Executor
from placer.runtime.model_changes import ModelSnapshot, warn_of_forward_hooks
from placer.runtime.tensors import graph_reads, localize, place_tensors, tensor_readers
from placer.runtime.worker import caller_threads, own_threads

__all__ = ["apply", "PlacedModule"]

_HOST = torch.device("cpu")
EXTRA_CAPTURES = 8  # captures made on first use that a placed model keeps (the least recently used is dropped)


@dataclass
class PlacedCapture:
    """One capture, placed: its node -> device map and the executor that runs it, and
    what every call reads of it, worked out once."""

    traced: Traced
    assignment: dict[str, str]  # node name -> device name
    executor: Executor
    output_nodes: list[str]  # the nodes (or placeholders) the output's leaves read
    leaves: list[tuple[str | None, Any]]  # each output leaf: (node name, None), or (None, the constant it is)
    parameters: tuple[nn.Parameter, ...]  # the parameters the graph reads (the very tensors: they stay its own)
    leaf_modules: tuple[nn.Module, ...]  # modules it calls whole (fx leaves), whose parameters it reads live

    def needs_grad(self, inputs: dict) -> bool:
        """Whether a call on `inputs` (placeholder -> value) builds an autograd graph
        (grad mode aside): some parameter it reads, or some tensor input, requires grad."""
        return (any(p.requires_grad for p in self.parameters)
                or any(p.requires_grad for m in self.leaf_modules for p in m.parameters())
                or any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values()))

    def output(self, values: dict) -> Any:
        """The eager output from the executor's `values` (node name -> value)."""
        return self.traced.unflatten([values[name] if name is not None else constant for name, constant in self.leaves])


class PlacedModule(nn.Module):
    """The model run by the placement. It registers the original model's children,
    parameters and buffers under their own names, so `state_dict()` keys are the
    model's own and checkpoints move between placed and unplaced models; tied
    parameters stay tied. Attributes it lacks are read from the original model, which
    stays reachable as `placed.original` (its methods run unplaced: `self` is the original).

    `copy.deepcopy(placed)` and `torch.save(placed)` copy the original model and the
    plan, and apply the plan again to the copy (`torch.load(..., weights_only=False)`
    to read it back). One call at a time: the device workers are shared by every call.
    `torch.compile(placed)` runs it as it is: the forward is not compiled (dynamo cannot
    trace across the device workers' threads; torch.compiler.disable).
    """

    def __init__(self, model: nn.Module, plan: Plan, devices: dict[str, Device], reference: PlacedCapture,
                 tensor_devices: dict[str, str], eval_capture: Traced | None, unbatched: frozenset[str]):
        super().__init__()
        # The model's own tables, shared (every name, also a second name of one module): `.to()` and
        # `placed.x = ...` (__setattr__) change the original, which a new apply of `placed.original` sees.
        for table in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, table, getattr(model, table))
        self.training = model.training
        self.plan = plan
        self.devices = devices  # device name -> Device
        self.tensor_devices = tensor_devices  # parameter/buffer qualified name -> device name
        self._unbatched = unbatched  # never split, in every capture (_unbatched)
        self.graphs = [reference]
        self._every_module = tuple(model.modules())  # whose flags pick a capture (training_flags' order)
        self._module_devices = _module_devices(reference)
        self._finalizer = weakref.finalize(self, _close_all, self.graphs)
        self._caller_threads = caller_threads(devices.values())  # what apply gave the caller (None: its own)
        self._threads_warned = False
        self._kept, self._made = 1 + (eval_capture is not None), 0  # captures made here (never dropped), on use
        self._snapshot: ModelSnapshot | None = None  # taken once the captures made here are placed
        object.__setattr__(self, "original", model)  # last: from here on, the model's attributes are set on it
        if eval_capture is not None:
            self.graphs.append(self._placed(eval_capture))
        self._snapshot = self._snapshot_now()

    def _snapshot_now(self) -> ModelSnapshot:
        """The model's tables as the graphs hold them (placer.runtime.model_changes). Leaf
        modules run as themselves and read their insides live (a rotary cache they
        re-register included): of those, only their tensors' dtypes and devices."""
        live = [m for graph in self.graphs for leaf in graph.leaf_modules for m in leaf.modules()]
        return ModelSnapshot(list(self.original.named_modules()), live)

    @property
    def executor(self) -> Executor:
        """The executor of the plan's own (training) capture."""
        return self.graphs[0].executor

    @property
    def _output_nodes(self) -> list[str]:
        return self.graphs[0].output_nodes

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original" not in self.__dict__:
                raise
            return getattr(self.__dict__["original"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._models_own(name):  # `placed.scale = 2.0` (new-user trial 11): the model's; the next call checks it
            setattr(self.original, name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self._models_own(name):
            delattr(self.original, name)
        else:
            super().__delattr__(name)

    def _models_own(self, name: str) -> bool:
        """Whether `name` is the model's attribute (its own or its class's), not this wrapper's."""
        model = self.__dict__.get("original")
        return (model is not None and name not in self.__dict__ and not hasattr(type(self), name)
                and (name in vars(model) or hasattr(type(model), name)))

    def train(self, mode: bool = True) -> "PlacedModule":
        super().train(mode)
        self.original.training = mode
        return self

    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        """The model's output for `model(*args, **kwargs)`, of the eager type, on the
        device of the first tensor input. Raises TypeError for a call the forward's
        signature rejects, PlanError where a new capture is needed but impossible
        (parameters spread over devices), ExecutionError once closed or when the model
        changed after apply (placer.runtime.model_changes); where a new capture fails,
        what the eager model raises for the call, else CaptureError."""
        if self._caller_threads not in (None, torch.get_num_threads()) and not self._threads_warned:
            self._threads_warned = True
            warnings.warn(f"placer: this thread runs {torch.get_num_threads()} intra-op threads, where placer.apply "
                          f"gave it {self._caller_threads} (its CPU devices' count, with which the plan was "
                          f"measured): its thread team now competes with the devices' workers for their cores, "
                          f"and the step may run slower than the model unplaced; call "
                          f"torch.set_num_threads({self._caller_threads}) after apply, not another count",
                          stacklevel=_user_stacklevel())
        graph, inputs = self._graph_for(args, kwargs)
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        out_device = first.device if first is not None else _HOST
        needs_grad = torch.is_grad_enabled() and graph.needs_grad(inputs)
        return graph.output(graph.executor.run(inputs, graph.output_nodes, out_device, needs_grad))

    def _graph_for(self, args: tuple, kwargs: dict) -> tuple[PlacedCapture, dict]:
        """The placed graph for this call in the current mode, and its inputs; captured
        and placed now if no graph so far covers the call."""
        if not self._finalizer.alive:  # closed: the executor says so, at once
            return self.graphs[0], {}
        changed = self._snapshot.change()
        if changed is not None:
            raise ExecutionError(f"the model changed after placer.apply ({changed}) and the placed graphs hold what it "
                                 f"had then: make such changes before placer.apply, or apply the plan again to "
                                 f"placed.original")
        flags = tuple([m.training for m in self._every_module])  # training_flags without its walk, every call
        mine = [g for g in self.graphs if g.traced.training == flags]
        for graph in mine:
            inputs = graph.traced.bind(args, kwargs)
            if inputs is not None:
                if graph is not self.graphs[-1] and self.graphs.index(graph) >= self._kept:
                    self.graphs.remove(graph)  # the most recently used capture is dropped last
                    self.graphs.append(graph)
                return graph, inputs
        why = mine[0].traced.why_not(args, kwargs) if mine else "not captured in this mode yet"
        spread = sorted({str(t.device) for t in list(self.original.parameters()) + list(self.original.buffers())})
        if len(spread) > 1:
            mode = "train" if self.training else "eval"
            raise PlanError(f"this call needs a new capture of the model in {mode} mode ({why}), which cannot be made "
                            f"once its parameters are spread over {', '.join(spread)}: call the placed model with "
                            f"arguments and shapes like the plan's example batch (e.g. DataLoader(drop_last=True))")
        reference = self.graphs[0].traced
        try:
            traced = trace_model(self.original, leaf_paths=reference.leaf_paths, allow_fallback=False, inputs=args,
                                 kwargs=kwargs, method=reference.method, mode=None,
                                 batch_dims=dict(reference.batch_dims))
        except CaptureError:
            raise_eager_error(self.original, args, kwargs)
            raise
        finally:  # the forward ran: it may add hooks (transformers') or set what eager sets once (problem_type)
            self._snapshot = self._snapshot_now()
        threads = torch.get_num_threads()
        try:
            graph = self._placed(traced)
        finally:
            own_threads(threads)  # the new executor's start gave the caller apply's count: keep the user's own
        self.graphs.append(graph)
        self._made += 1
        if len(self.graphs) > self._kept + EXTRA_CAPTURES:
            dropped = self.graphs.pop(self._kept).executor
            # A backward of its may be pending (its autograd node holds the executor): its
            # workers stop once nothing does.
            weakref.finalize(dropped, _close_each, list(dropped.workers.values()))
            if self._made == EXTRA_CAPTURES + 1:
                warnings.warn(f"placer: {self._made} calls of this placed model each needed a new capture of the "
                              f"model (the latest because {why}); a capture takes seconds, and only the "
                              f"{EXTRA_CAPTURES} most recently used are kept: pass values that change between calls "
                              f"as tensors and keep shapes fixed (pad to one length; DataLoader(drop_last=True))",
                              stacklevel=_user_stacklevel())
        inputs = traced.bind(args, kwargs)
        if inputs is None:
            raise CaptureError(f"a fresh capture does not accept the call it was made for ({traced.why_not(args, kwargs)})")
        return graph, inputs

    def _placed(self, traced: Traced) -> PlacedCapture:
        """Place another capture of the model: each node on the device of its
        parameters, else of the same node in the training capture, else of its module,
        else of its producer."""
        reference = self.graphs[0]
        ref_nodes = {n.name: n for n in reference.traced.gm.graph.nodes}
        canonical = canonical_names(self.original)
        assignment: dict[str, str] = {}
        for node in traced.gm.graph.nodes:
            if node.op == "get_attr":
                continue
            placed = [self.tensor_devices.get(canonical.get(id(t))) for t in node_tensors(traced.gm, node)]
            same = ref_nodes.get(node.name)
            if any(placed):
                assignment[node.name] = next(d for d in placed if d)
            elif same is not None and same.op == node.op and str(same.target) == str(node.target) \
                    and owning_module(same) == owning_module(node):
                assignment[node.name] = reference.assignment[node.name]
            else:
                assignment[node.name] = self._device_by_module(owning_module(node), node, assignment)
        _with_parameter_reads(traced.gm, assignment)
        return _build(self.original, self.plan, traced, assignment, self.devices, None, self._unbatched)

    def _device_by_module(self, module: str, node: fx.Node, assignment: dict[str, str]) -> str:
        parts = module.split(".") if module else []
        for i in range(len(parts), 0, -1):
            device = self._module_devices.get(".".join(parts[:i]))
            if device is not None:
                return device
        producers = [assignment[a.name] for a in node.all_input_nodes if a.name in assignment]
        return producers[0] if producers else self._module_devices.get("", self.plan.devices[0])

    def close(self) -> None:
        """Stop the device workers (also done when the module is garbage collected)."""
        self._finalizer()

    def __reduce_ex__(self, protocol):
        devices = ",".join(d.name for d in self.devices.values())
        return (_reapply, (self.original, self.plan, devices, self.training))

    def extra_repr(self) -> str:
        return f"plan={self.plan.method!r}, devices={self.plan.devices}, chunks={len(self.executor.chunks)}"


def apply(model: nn.Module, plan: Plan | str | Path, devices: str | Cluster | None = None) -> PlacedModule:
    """Place `model` by `plan` (a Plan or a plan file). Moves the model's parameters and
    buffers in place; never changes their values. Each call runs in the plan's
    `microbatches`, split along its `batch_dims` (0 for an input it does not name; None:
    never split), and with `microbatch_statistics` accepts batch statistics per micro-batch.

    Threads: apply leaves the calling thread with the intra-op thread count the plan
    is measured with (placer.runtime.timing; worker.caller_threads): that of the
    plan's CPU devices, e.g. 1 for cpu:0,cpu:1 on 2 cores, set once every device's
    worker has set its own. The caller runs the loss and the optimizer step and serves
    one CPU device itself; with the host's count its OpenMP team would spin against the
    workers for their cores, many times slower a step. A plan whose one device is the whole host `cpu` (the
    model unplaced), or that has no CPU device, keeps the caller's count. Either way the
    process-wide count (which threads that have not run torch yet copy) ends equal to the
    caller's. `torch.set_num_threads(n)` after apply undoes it; the workers keep theirs.

    Parameters
    ----------
    model : the model the plan was made for (same architecture: checked by fingerprint).
    plan : a Plan or the path of a plan file.
    devices : where to run: None for the plan's own devices; a `--devices` string or a
        Cluster naming as many devices, of the same kinds, in the plan's order
        (`devices="cuda:2,cuda:3"` runs a cuda:0,cuda:1 plan on other GPUs); a Cluster
        that has every device the plan names is used by name.

    Raises
    ------
    PlanError : `model` is already a PlacedModule or a torch.compile wrapper, the plan was made for another model
        (its parameters differ: checked before capturing), leaves a node unplaced, splits a
        shared parameter, `devices` cannot stand for the plan's devices, or its
        micro-batches would change what the model computes (batch statistics without
        `microbatch_statistics`; at the first call for what only running shows).
    CaptureError : the model cannot be captured the way the plan was.
    DeviceSpecError : this host lacks a device the plan names (placer.plan.plan_cluster:
        the plan, its devices, this host's and the fix), or `devices` is malformed.
    """
    if isinstance(model, PlacedModule):
        raise PlanError("the model is already placed: apply the plan to its .original "
                        "(`placer.apply(placed.original, plan)`)")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise PlanError("the model is a torch.compile wrapper: apply the plan to the model itself "
                        "(`placer.apply(model._orig_mod, plan)`); a placed model runs uncompiled")
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    cluster, rename = _devices_for(plan, devices)
    warn_of_forward_hooks(model, _user_stacklevel())
    reference = trace_for_plan(model, plan, mode="train")
    assignment = {name: rename[device] for name, device in plan.assignment.items()}
    _with_parameter_reads(reference.gm, assignment)
    by_name = {d.name: d for d in cluster.devices}
    torch_devices = {by_name[assignment[n.name]].torch_device for n in reference.gm.graph.nodes
                     if n.op not in ("placeholder", "output")}
    # export cannot capture once the tensors are on several devices: the eval capture is made first
    eval_capture = trace_for_plan(model, plan, mode="eval") if len(torch_devices) > 1 else None
    reads = graph_reads(reference.gm, lambda n: None if n.op == "output" else assignment.get(n.name))
    tensor_devices = place_tensors(model, tensor_readers(model, reads, plan.source),
                                   lambda d: torch.device(by_name[d].torch_device))
    unbatched = _unbatched(plan, reference)
    graph = _build(model, plan, reference, assignment, by_name, plan.groups, unbatched)
    return PlacedModule(model, plan, by_name, graph, tensor_devices, eval_capture, unbatched)


def _devices_for(plan: Plan, devices: str | Cluster | None) -> tuple[Cluster, dict[str, str]]:
    """(the cluster to run on, plan device name -> its device name there)."""
    cluster = plan_cluster(plan, devices=devices)
    if set(plan.devices) <= set(cluster.names):
        return cluster, {d: d for d in plan.devices}
    return cluster, dict(zip(plan.devices, cluster.names))


def _unbatched(plan: Plan, traced: Traced) -> frozenset[str]:
    """The placeholders of the plan's capture that its example batch had not as long as
    the batch: never split, so that a later batch where one is so by chance still splits
    only the batched ones (microbatch.split_dims; new-user trial 10)."""
    example = None if plan.microbatches == 1 or plan.capture.inputs is None else \
        traced.bind(example_like(plan.capture.inputs), {})
    if example is None:
        return frozenset()
    batched = microbatch.split_dims(example, placeholder_dims(traced, plan.batch_dims), input_names(traced))
    return frozenset(name for name, value in example.items()
                     if isinstance(value, torch.Tensor) and value.dim() > 0 and name not in batched)


def _build(model: nn.Module, plan: Plan, traced: Traced, assignment: dict[str, str], devices: dict[str, Device],
           groups: list[list[str]] | None, unbatched: frozenset[str]) -> PlacedCapture:
    """The executor of a capture placed by `assignment` (chunked over `groups`, the plan's, for its own capture),
    after what the capture baked in about devices is made to follow the placement (tensors.localize); micro-batched
    as the plan says (microbatches, schedule, microbatch_statistics), each placeholder along the dimension the plan's
    `batch_dims` gives its forward input (graphs.trace_inputs), never those in `unbatched` (`_unbatched` of the
    training capture, for every capture)."""
    gm = traced.gm
    localize(model, gm, lambda n: torch.device(devices[assignment[n.name]].torch_device)
             if n.name in assignment else None)
    dims = placeholder_dims(traced, plan.batch_dims)  # the plan's own (None: marked never split, as refusals say)
    executor = Executor.build(gm, gm, assignment, devices, groups=groups, microbatches=plan.microbatches,
                              schedule=plan.schedule, batch_dims={**dims, **dict.fromkeys(unbatched)},
                              input_names=input_names(traced), microbatch_statistics=plan.microbatch_statistics,
                              source=plan.source, marked=[p for p, d in dims.items() if d is None])
    leaves = [(leaf.name, None) if isinstance(leaf, fx.Node) else (None, leaf) for leaf in traced.output_leaves]
    output_nodes = list(dict.fromkeys(name for name, _ in leaves if name is not None))
    modules = tuple(gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module")
    return PlacedCapture(traced=traced, assignment=assignment, executor=executor, output_nodes=output_nodes,
                         leaves=leaves, parameters=tuple(gm.parameters()), leaf_modules=modules)


def _with_parameter_reads(gm: fx.GraphModule, assignment: dict[str, str]) -> None:
    """Give each get_attr node the plan leaves out (plans place the nodes that read a
    parameter, graphs.capture) the device of its first reader."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name not in assignment:
            assignment[node.name] = assignment[next(iter(node.users)).name]


def _module_devices(graph: PlacedCapture) -> dict[str, str]:
    """Module path (and every prefix of it) -> the device of its first node in the
    training capture: where a node only another capture has goes."""
    devices: dict[str, str] = {}
    for node in graph.traced.gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        parts = owning_module(node).split(".") if owning_module(node) else []
        for i in range(len(parts) + 1):
            devices.setdefault(".".join(parts[:i]), graph.assignment[node.name])
    return devices


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel, for its caller, of the first frame outside placer and
    torch: the user's call (torch.compiler.disable and nn.Module add frames between)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("placer", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _close_each(closable: list) -> None:  # workers, executors
    for item in closable:
        item.close()


def _close_all(graphs: list[PlacedCapture]) -> None:
    _close_each([graph.executor for graph in graphs])


def _reapply(model: nn.Module, plan: Plan, devices: str, training: bool) -> PlacedModule:
    """Unpickling and deep copies: a copy of the original model, placed again. The
    copy is ours, so its tensors may gather on one device for the captures first."""
    first = next(iter(model.parameters()), None)
    if first is not None and len({t.device for t in list(model.parameters()) + list(model.buffers())}) > 1:
        model.to(first.device)
    return apply(model, replace(plan), devices).train(training)
