"""Plan files: a placement written down so that a training loop can apply it later.

A Plan (format `placer.plan/v2`, DESIGN.md) names the device of every node of the
model's training-mode capture, and how to capture again: the method (torch.export
or torch.fx), the leaf paths, and the example batch's shapes and dtypes (`capture`).
The fingerprint ties the plan to one model and that capture. The runtime captures
the model again (in train and eval mode, and for other input shapes) and finds each
node's device by its identity in the training capture (name, target and module
path: graphs.trace); a node only another capture has gets the device of its module,
else of its producer.

`microbatches` (1) and `schedule` (None; "gpipe" when microbatches > 1) are read by
the pipelined engine, and with them the workload's micro-batch options:
`batch_dims` (forward input -> the dimension its batch lies along; absent inputs
use 0, null marks one never split) and `microbatch_statistics` (false: a model
whose batch statistics micro-batches would change is refused). Both are optional
in the file ({} and false when absent), so plans written before them still load.
The `device_map` (module qualified name -> device) is for people and for
accelerate: device names accelerate accepts ("cpu" for every virtual CPU device,
"cuda:N"), covering every tensor of the model's state_dict.

A v1 plan (no capture info, fx node names) still loads, as one micro-batch captured
by torch.fx; applying it works while its fingerprint still matches the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from graphs.capture import capture_info, example_like, node_params, owning_module, shape_difference
from graphs.devices import Cluster, default_device_spec, host_cores, parse_cluster
from graphs.errors import DeviceSpecError, PlanError
from graphs.files import write_text_atomically
from graphs.problem import PlacementProblem
from graphs.trace import Traced, trace_model
from graphs.trace import fingerprint as model_fingerprint
from graphs.trace import tensors_fingerprint
from graphs.trace_inputs import check_batch_dims
from graphs.workload import Workload
from placer.device_map import accelerate_device_map, accelerate_name, derive_device_map

FORMAT = "placer.plan/v2"
FORMAT_V1 = "placer.plan/v1"
SCHEDULES = ("gpipe",)
_REQUIRED = ("devices", "assignment", "device_map", "fingerprint")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Capture:
    """How the plan's graph was captured, so that the runtime captures it again."""

    method: str = "fx"  # "export" or "fx"
    leaf_paths: list[str] = field(default_factory=list)  # module paths kept whole (fx)
    inputs: list[dict] | None = None  # the example batch: [{"shape": [...], "dtype": "int64"}]; None in v1 plans
    tensors: str | None = None  # graphs.trace.tensors_fingerprint of the model; None in older plans
    shapes: dict[str, list[int]] | None = None  # graphs.capture.tensor_shapes of the model; None in older plans
    batch_dims: dict[str, int] = field(default_factory=dict)  # batch dims besides 0 the capture keeps free (export)


@dataclass
class Plan:
    devices: list[str]  # device names, as in --devices
    assignment: dict[str, str]  # node name (training capture) -> device name, every node
    device_map: dict[str, str]  # module qualified name -> accelerate device name ("" is the whole model)
    fingerprint: str  # graphs.trace.fingerprint of the model and its training capture
    capture: Capture = field(default_factory=Capture)
    microbatches: int = 1  # the batch is split into this many micro-batches, pipelined
    schedule: str | None = None  # the pipeline schedule ("gpipe") when microbatches > 1
    batch_dims: dict[str, int | None] = field(default_factory=dict)  # forward input -> its batch dim (0; None: never)
    microbatch_statistics: bool = False  # batch statistics computed per micro-batch are acceptable
    method: str = "manual"
    seed: int | None = None
    groups: list[list[str]] | None = None  # member node names of each group
    placement: list[int] | None = None  # group -> device index
    simulated_ms: float | None = None
    measured_ms: float | None = None
    workload: str = ""
    created: str = field(default_factory=_now)
    path: Path | None = field(default=None, compare=False, repr=False)  # the file it was read from (not saved)

    @property
    def leaf_paths(self) -> list[str]:
        return self.capture.leaf_paths

    @property
    def source(self) -> str:
        """How error messages name the plan: its file name, or "plan"."""
        return self.path.name if self.path is not None else "plan"

    def to_json(self) -> dict:
        data = asdict(self)
        del data["path"]
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically: a reader never sees a half-written file."""
        return write_text_atomically(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")


def load_plan(path: str | Path, fingerprint: str | None = None) -> Plan:
    """Read a plan file (format v2, or v1 as one fx-captured micro-batch); with
    `fingerprint`, also check it was made for that model.

    Raises
    ------
    PlanError : naming the file, for every way the file can be wrong (unreadable, not
        JSON, unknown format, a missing field, a field of the wrong type, a device the
        plan does not list, another model's fingerprint).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        from placer.run_folder import run_beside  # here: run_folder imports what imports this module

        raise PlanError(f"{path}: no such plan file{run_beside(path)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read plan file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a plan file holds a JSON object, found {type(data).__name__}")
    version = data.pop("format", None)
    if version == FORMAT_V1:
        data["capture"] = {"method": "fx", "leaf_paths": data.pop("leaf_paths", []), "inputs": None}
        if isinstance(data.get("device_map"), dict):
            data["device_map"] = {k: accelerate_name(v) if isinstance(v, str) else v
                                  for k, v in data["device_map"].items()}
    elif str(data.get("schema", "")).startswith("placer.results/"):
        from placer.run_folder import plan_of_run

        raise PlanError(f"{path}: this is a results file (what a run measured), not a plan: {plan_of_run(path, data)}")
    elif version != FORMAT:
        raise PlanError(f"{path}: unknown plan format {version!r} (this placer reads {FORMAT!r} and {FORMAT_V1!r})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise PlanError(f"{path}: plan file lacks {', '.join(missing)}")
    problem = _type_problem(data)
    if problem:
        raise PlanError(f"{path}: {problem}")
    known = set(Plan.__dataclass_fields__) - {"path", "capture"}
    capture = Capture(**{k: v for k, v in data.get("capture", {}).items() if k in Capture.__dataclass_fields__})
    plan = Plan(**{k: v for k, v in data.items() if k in known}, capture=capture, path=path)
    bad = sorted({d for d in plan.assignment.values() if d not in plan.devices})
    if bad:
        raise PlanError(f"{path}: assignment names devices {bad} that are not among the plan's devices {plan.devices}")
    if fingerprint is not None and plan.fingerprint != fingerprint:
        raise PlanError(mismatch_message(plan, fingerprint))
    return plan


def _type_problem(data: dict) -> str | None:
    """What is wrong with the types of a plan's fields, or None."""
    def strings(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    if not (isinstance(data["devices"], list) and all(isinstance(d, str) for d in data["devices"])
            and isinstance(data["assignment"], dict) and isinstance(data["device_map"], dict)
            and isinstance(data["fingerprint"], str)):
        return "devices must be a list of names, assignment and device_map objects, fingerprint a string"
    if not strings(data["assignment"]):
        return "assignment must map node names to device names (strings)"
    if not strings(data["device_map"]):
        return "device_map must map module names to device names (strings)"
    m = data.get("microbatches", 1)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        return f"microbatches must be a whole number >= 1, found {m!r}"
    if data.get("schedule") not in (None, *SCHEDULES):
        return (f"schedule must be null or one of {', '.join(SCHEDULES)}, found {data.get('schedule')!r}"
                + (" (1F1B runs on the pipelining backend: `placer train --backend pipelining --schedule 1f1b`)"
                   if str(data.get("schedule")).lower() == "1f1b" else ""))
    capture = data.get("capture", {})
    kept = capture.get("batch_dims", {}) if isinstance(capture, dict) else {}
    for where, dims, null in (("batch_dims", data.get("batch_dims", {}), True), ("capture.batch_dims", kept, False)):
        if not (isinstance(dims, dict) and all(
                isinstance(k, str) and ((null and d is None) or (type(d) is int and d >= 0)) for k, d in dims.items())):
            return f"{where} must map input names to whole numbers >= 0, found {dims!r}" + (
                " (or to null: an input never split)" if null else "")
    if not isinstance(data.get("microbatch_statistics", False), bool):
        return f"microbatch_statistics must be true or false, found {data['microbatch_statistics']!r}"
    if not isinstance(capture, dict) or capture.get("method", "fx") not in ("export", "fx"):
        return "capture must be an object whose method is export or fx"
    inputs = capture.get("inputs")
    if inputs is not None and not (isinstance(inputs, list) and all(
            isinstance(s, dict) and isinstance(s.get("shape"), list) and isinstance(s.get("dtype"), str)
            and isinstance(getattr(torch, s["dtype"], None), torch.dtype) for s in inputs)):
        return "capture.inputs must list {shape, dtype} of each input"
    if not isinstance(capture.get("tensors"), (str, type(None))):
        return f"capture.tensors must be a string or null, found {capture['tensors']!r}"
    shapes = capture.get("shapes")
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes.values())):
        return "capture.shapes must map each parameter and buffer name to its shape, or be null"
    groups, placement = data.get("groups"), data.get("placement")
    if groups is not None and not (isinstance(groups, list) and all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups)):
        return "groups must be a list of lists of node names, or null"
    n_devices = len(data["devices"])
    if placement is not None and not (isinstance(placement, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < n_devices for d in placement)):
        return f"placement must list a device index from 0 to {n_devices - 1} for each group, or be null"
    if groups is not None and placement is not None and len(placement) != len(groups):
        return (f"placement gives {len(placement)} devices for {len(groups)} groups (one each): the file was cut or "
                f"edited; write the plan again (placer optimize, or placer baseline --out)")
    for key in ("simulated_ms", "measured_ms"):
        value = data.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            return f"{key} must be a finite number or null, found {value!r}"
    return None


def plan_cluster(plan: Plan, memory: str | None = None, devices: str | Cluster | None = None) -> Cluster:
    """Where `plan` runs on this host: its own devices capped by `memory` (--memory), or
    `devices` (a --devices string, capped by `memory`, or a Cluster) standing for them:
    naming every device the plan names, or as many, of the same kinds in the same order
    (cuda:2,cuda:3 for a cuda:0,cuda:1 plan). All that runs a plan (placer.apply,
    measure, train, compare, the measurement pool) gets its devices here.

    Raises
    ------
    DeviceSpecError : this host lacks a device of the plan (naming the plan, its devices,
        this host's and the fix: a plan of this host's), or `memory`/`devices` is malformed.
    PlanError : `devices` cannot stand for the plan's devices one to one.
    """
    if devices is None:
        try:
            parse_cluster(",".join(plan.devices))
        except DeviceSpecError as exc:
            here = default_device_spec()
            gpus = ", ".join(d for d in here.split(",") if d.startswith("cuda")) or "no GPU"
            raise DeviceSpecError(f"{plan.source} places the model on {', '.join(plan.devices)}, but {exc}; this "
                                  f"host has {gpus} and {host_cores()} CPU cores: make a plan for this host's devices "
                                  f"here (placer optimize --devices {here}, or placer baseline --out)") from None
        return parse_cluster(",".join(plan.devices), memory)
    cluster = devices if isinstance(devices, Cluster) else parse_cluster(devices, memory)
    kinds = [(d.split(":", 1)[1] if d.startswith("rank") else d).split(":")[0] for d in plan.devices]
    if not set(plan.devices) <= set(cluster.names) and (
            len(cluster) != len(plan.devices) or [d.kind for d in cluster.devices] != kinds):
        raise PlanError(f"{plan.source} places nodes on {','.join(plan.devices)}; the devices given "
                        f"({cluster.spec()}) must be as many, of the same kinds in the same order "
                        f"({','.join(kinds)}), to stand for them one to one")
    return cluster


def mismatch_message(plan: Plan, fingerprint: str, why: str = "") -> str:
    return (f"{plan.source} was made for another model (fingerprint {plan.fingerprint}, this model {fingerprint}"
            f"{why}): re-run `placer optimize` for this model")


def with_workload_options(plan: Plan, workload: Workload) -> Plan:
    """`plan` with the workload file's micro-batch options added to its own: the
    workload's `batch_dims` over the plan's, input by input, and per-micro-batch
    statistics accepted where either accepts them. What runs a plan together with its
    workload (the launchers) runs it so: a plan made before the workload named them,
    or by hand, follows the workload file as it is now.

    Examples
    --------
    >>> w = Workload(name="w", spec="w.py", model=nn.Linear(2, 2), inputs=(), batch_dims={"x": 1})
    >>> with_workload_options(Plan(["cpu:0"], {}, {}, "f", batch_dims={"mask": 1}), w).batch_dims
    {'mask': 1, 'x': 1}
    """
    return replace(plan, batch_dims={**plan.batch_dims, **workload.batch_dims},
                   microbatch_statistics=plan.microbatch_statistics or workload.microbatch_statistics)


def trace_for_plan(model: nn.Module, plan: Plan, mode: str = "train") -> Traced:
    """Capture `model` the way `plan` was captured (method, leaf paths, an example batch
    of the recorded shapes on the model's device), in `mode`. The training capture is
    the plan's graph: checked against the plan's fingerprint, and every node of it but
    get_attr nodes (a parameter goes with its readers) must be placed. The local
    runtime and both distributed frontends get the plan's graph here.

    Raises
    ------
    PlanError : the model's parameters and buffers, or its training capture, differ from
        the plan's (another model: checked on the tensors before capturing, so that
        another model's forward never fails on the plan's inputs), the plan leaves
        one of its nodes unplaced, or its batch_dims name no input of the forward.
    CaptureError : the model cannot be captured that way.
    """
    _check_tensors(model, plan)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    inputs = None if plan.capture.inputs is None else example_like(plan.capture.inputs, device)
    traced = trace_model(model, leaf_paths=plan.capture.leaf_paths, allow_fallback=False, inputs=inputs,
                         method=plan.capture.method, mode=mode, batch_dims=plan.capture.batch_dims)
    if mode == "train":
        fp = model_fingerprint(model, traced.gm)
        if fp != plan.fingerprint:  # the same tensors (_check_tensors), another graph (new-user trial 12)
            raise PlanError(mismatch_message(plan, fp, "; its parameters and buffers are the plan's, its captured "
                                                       "forward is not: the forward, or a flag it reads, changed"))
        check_batch_dims(traced, plan.batch_dims, f"{plan.source}: ")  # a hand-edited plan
        unplaced = [n.name for n in traced.gm.graph.nodes
                    if n.op not in ("placeholder", "output", "get_attr") and n.name not in plan.assignment]
        if unplaced:
            raise PlanError(f"{plan.source} does not place node {unplaced[0]!r} ({len(unplaced)} unplaced)")
    return traced


def _check_tensors(model: nn.Module, plan: Plan) -> None:
    """Refuse a model that is not the plan's by what shows without capturing it: its
    parameters' and buffers' names and shapes (`capture.tensors`), and, for plans
    older than that, the names the device map gives a device (modules or tensors).

    Raises
    ------
    PlanError : the model differs from the plan's there.
    """
    if plan.capture.tensors is not None:
        if plan.capture.tensors != tensors_fingerprint(model):
            why, fix = (("its parameters' names or shapes differ", "re-run `placer optimize` for this model")  # an
                        if plan.capture.shapes is None else shape_difference(plan.capture.shapes, model))  # old plan
            raise PlanError(f"{plan.source} was made for another model ({why}): {fix}")
        return
    known = {name for name, _ in model.named_modules()} | set(model.state_dict())
    stray = sorted(set(plan.device_map) - known - {""})
    if stray:
        raise PlanError(f"{plan.source} was made for another model (it places {stray[0]!r}, which this "
                        f"{type(model).__name__} lacks): re-run `placer optimize` for this model")


def leaf_paths_of(gm: fx.GraphModule, fallback_paths: Iterable[str]) -> list[str]:
    """Every module the trace kept whole: its call_module targets and the fallback leaves.
    Tracing with these as leaf paths reproduces the graph without the workload's
    leaf_modules classes, so a plan alone is enough to re-trace the model."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return sorted(called | set(fallback_paths))


def plan_from_assignment(model: nn.Module, assign: Callable[[fx.Node], str], devices: Sequence[str], *,
                         inputs: tuple[torch.Tensor, ...] | None = None, leaf_modules: Iterable[type] = (),
                         method: str = "manual", workload: str = "",
                         batch_dims: Mapping[str, int | None] | None = None,
                         microbatch_statistics: bool = False) -> Plan:
    """A plan made by capturing `model` (on `inputs`: torch.export where it can; without
    them torch.fx) and asking `assign(node)` for each node's device: the way to write a
    placement by hand (tests, examples, benchmarks). A parameter's get_attr node must
    go where its reader goes (graphs.capture.owning_module gives both one module), or
    applying the plan is a PlanError.

    Parameters
    ----------
    model : the model to place (captured here, left as it was).
    assign : node of the training capture -> device name.
    devices : the plan's device names, in order (`--devices`).
    inputs : an example batch; without it only torch.fx can capture.
    leaf_modules : module classes to keep whole (selects torch.fx).
    method, workload : recorded in the plan.
    batch_dims, microbatch_statistics : the workload's micro-batch options (graphs.workload).

    Raises
    ------
    PlanError : `assign` names a device not in `devices`, or `batch_dims` a name that
        is no input of the model's forward.
    CaptureError : the model cannot be captured.
    """
    traced = trace_model(model, leaf_modules=leaf_modules, inputs=inputs, batch_dims=batch_dims)
    gm = traced.gm
    assignment = {n.name: assign(n) for n in gm.graph.nodes}
    unknown = sorted(set(assignment.values()) - set(devices))
    if unknown:
        raise PlanError(f"assignment uses devices {unknown} that are not among {list(devices)}")
    check_batch_dims(traced, batch_dims or {})
    devices_of_modules = derive_device_map({n.name: owning_module(n) for n in gm.graph.nodes},
                                           {n.name: node_params(gm, n) for n in gm.graph.nodes}, assignment)
    info = capture_info(traced, inputs, model)
    return Plan(
        devices=list(devices), assignment=assignment,
        device_map=accelerate_device_map(devices_of_modules, model.state_dict(), devices[0]),
        fingerprint=model_fingerprint(model, gm),
        capture=Capture(method=info["method"], leaf_paths=leaf_paths_of(gm, traced.leaf_paths), inputs=info["inputs"],
                        tensors=info["tensors"], shapes=info["shapes"], batch_dims=info["batch_dims"]),
        batch_dims=dict(batch_dims or {}), microbatch_statistics=microbatch_statistics,
        method=method, workload=workload,
    )


def make_plan(problem: PlacementProblem, placement: Sequence[int], method: str, seed: int | None = None,
              simulated_ms: float | None = None, measured_ms: float | None = None, *, microbatches: int = 1,
              schedule: str | None = None) -> Plan:
    """Expand a group placement to every captured node of the problem's OpGraph.

    Nodes no group lists (a capture may leave out inputs and the output) follow their
    neighbour: an input its first user, anything else its first producer.

    Parameters
    ----------
    problem : the placement problem, with its OpGraph (`problem.ops`).
    placement : group id -> device index of `problem.cluster`.
    method, seed, simulated_ms, measured_ms : recorded in the plan.
    microbatches : the batch is split into this many micro-batches (GPipe).
    schedule : the pipeline schedule; default "gpipe" when `microbatches` > 1.
    The workload's micro-batch options (`batch_dims`, `microbatch_statistics`) come
    from the problem.

    Raises
    ------
    PlanError : the problem has no OpGraph, or `microbatches`/`schedule` are invalid.
    InfeasibleError : the placement breaks the problem's constraints.
    """
    if problem.ops is None:
        raise PlanError("cannot make a plan from a problem without its OpGraph (problem.ops)")
    if microbatches < 1:
        raise PlanError(f"microbatches must be at least 1, got {microbatches}")
    schedule = schedule or ("gpipe" if microbatches > 1 else None)
    if schedule not in (None, *SCHEDULES):
        raise PlanError(f"unknown pipeline schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    placement = problem.check(placement)
    ops, names = problem.ops, problem.cluster.names
    groups = [list(problem.groups.nodes[g]["members"]) for g in range(problem.n_groups)]
    assignment = {m: names[placement[g]] for g, members in enumerate(groups) for m in members}
    for node in sorted(ops.nodes, key=lambda n: ops.nodes[n]["order"]):
        if node not in assignment:
            neighbours = list(ops.successors(node)) if ops.nodes[node]["op"] == "placeholder" else list(ops.predecessors(node))
            placed = [assignment[n] for n in neighbours if n in assignment]
            assignment[node] = placed[0] if placed else names[0]
    called = {str(ops.nodes[n]["target"]) for n in ops.nodes if ops.nodes[n]["op"] == "call_module"}
    info = ops.graph.get("capture", {})
    device_map = derive_device_map({n: ops.nodes[n].get("module", "") for n in ops.nodes},
                                   {n: list(ops.nodes[n].get("params", {})) for n in ops.nodes}, assignment)
    return Plan(
        devices=list(names), assignment=assignment,
        device_map=accelerate_device_map(device_map, ops.graph.get("tensor_names", []), names[0]),
        fingerprint=ops.graph.get("fingerprint", problem.fingerprint),
        capture=Capture(method=info.get("method", "fx"), leaf_paths=sorted(called | set(ops.graph.get("leaf_paths", []))),
                        inputs=info.get("inputs"), tensors=info.get("tensors"), shapes=info.get("shapes"),
                        batch_dims=info.get("batch_dims", {})),
        microbatches=microbatches, schedule=schedule,
        batch_dims=dict(problem.batch_dims), microbatch_statistics=problem.microbatch_statistics,
        method=method, seed=seed, groups=groups, placement=list(placement),
        simulated_ms=simulated_ms, measured_ms=measured_ms, workload=problem.workload,
    )
