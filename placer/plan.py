"""Plan files: a placement written down so that a training loop can apply it later.

A Plan (format `placer.plan/v1`, DESIGN.md) names the device of every traced fx node.
That is what the runtime needs; the accelerate-style `device_map` beside it is for
people (and tools that read accelerate maps): the highest modules whose every node
and parameter sit on one device. The fingerprint ties the plan to one model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch.fx as fx
from torch import nn

from graphs.capture import node_params, owning_module
from graphs.trace import fingerprint as model_fingerprint
from graphs.trace import trace_model
from graphs.errors import PlanError
from graphs.files import write_text_atomically
from graphs.problem import PlacementProblem

FORMAT = "placer.plan/v1"
_REQUIRED = ("devices", "assignment", "device_map", "fingerprint")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Plan:
    devices: list[str]  # device names, as in --devices
    assignment: dict[str, str]  # fx node name -> device name, every traced node
    device_map: dict[str, str]  # module qualified name -> device name ("" is the whole model)
    fingerprint: str  # graphs.trace.fingerprint of the model the plan was made for
    leaf_paths: list[str] = field(default_factory=list)  # trace these module paths as leaves
    method: str = "manual"
    seed: int | None = None
    groups: list[list[str]] | None = None  # member node names of each group
    placement: list[int] | None = None  # group -> device index
    simulated_ms: float | None = None
    measured_ms: float | None = None
    workload: str = ""
    created: str = field(default_factory=_now)
    path: Path | None = field(default=None, compare=False, repr=False)  # the file it was read from (not saved)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["path"]
        return {"format": FORMAT, **data}

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically: a reader never sees a half-written file."""
        return write_text_atomically(path, json.dumps(self.to_json(), indent=1) + "\n")


def load_plan(path: str | Path, fingerprint: str | None = None) -> Plan:
    """Read a plan file; with `fingerprint`, also check it was made for that model.
    Raises PlanError naming the file for every way the file can be wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read plan file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a plan file holds a JSON object, found {type(data).__name__}")
    version = data.pop("format", None)
    if version != FORMAT:
        raise PlanError(f"{path}: unknown plan format {version!r} (this placer reads {FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise PlanError(f"{path}: plan file lacks {', '.join(missing)}")
    if not (isinstance(data["devices"], list) and isinstance(data["assignment"], dict)
            and isinstance(data["device_map"], dict) and isinstance(data["fingerprint"], str)):
        raise PlanError(f"{path}: devices must be a list, assignment and device_map objects, fingerprint a string")
    known = set(Plan.__dataclass_fields__) - {"path"}
    plan = Plan(**{k: v for k, v in data.items() if k in known}, path=path)
    bad = sorted({d for d in plan.assignment.values() if d not in plan.devices})
    if bad:
        raise PlanError(f"{path}: assignment names devices {bad} that are not among the plan's devices {plan.devices}")
    if fingerprint is not None and plan.fingerprint != fingerprint:
        raise PlanError(f"{path.name} was made for another model (fingerprint {plan.fingerprint}, this model {fingerprint})")
    return plan


def derive_device_map(node_modules: Mapping[str, str], node_params: Mapping[str, Iterable[str]],
                      assignment: Mapping[str, str]) -> dict[str, str]:
    """accelerate-style device map: the highest modules whose nodes and parameters all
    sit on one device, plus single parameters of modules that are split.

    `node_modules`: node -> owning module path ("" for the root); `node_params`: node
    -> qualified names of the parameters and buffers it uses.
    """
    devices_under: dict[str, set[str]] = {}  # module path -> devices of everything inside it
    param_device: dict[str, str] = {}

    def note(path: str, device: str) -> None:
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            devices_under.setdefault(".".join(parts[:i]), set()).add(device)

    for node, device in assignment.items():
        note(node_modules.get(node, ""), device)
        for p in node_params.get(node, ()):
            param_device[p] = device
            note(p.rpartition(".")[0], device)

    def parent(path: str) -> str | None:
        return None if path == "" else path.rpartition(".")[0]

    def single(path: str | None) -> bool:
        return path is not None and len(devices_under.get(path, ())) == 1

    device_map = {}
    for path, devs in devices_under.items():
        if single(path) and not single(parent(path)):
            device_map[path] = next(iter(devs))
    for p, device in param_device.items():
        if not single(p.rpartition(".")[0]):
            device_map[p] = device
    return dict(sorted(device_map.items()))


def leaf_paths_of(gm: fx.GraphModule, fallback_paths: Iterable[str]) -> list[str]:
    """Every module the trace kept whole: its call_module targets and the fallback leaves.
    Tracing with these as leaf paths reproduces the graph without the workload's
    leaf_modules classes, so a plan alone is enough to re-trace the model."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return sorted(called | set(fallback_paths))


def plan_from_assignment(model: nn.Module, assign: Callable[[fx.Node], str], devices: Sequence[str], *,
                         leaf_modules: Iterable[type] = (), method: str = "manual", workload: str = "") -> Plan:
    """A plan made by tracing `model` and asking `assign(node)` for each node's device:
    the way to write a placement by hand (tests, examples, benchmarks)."""
    traced = trace_model(model, leaf_modules=leaf_modules)
    gm = traced.gm
    assignment = {n.name: assign(n) for n in gm.graph.nodes}
    unknown = sorted(set(assignment.values()) - set(devices))
    if unknown:
        raise PlanError(f"assignment uses devices {unknown} that are not among {list(devices)}")
    return Plan(
        devices=list(devices), assignment=assignment,
        device_map=derive_device_map({n.name: owning_module(n) for n in gm.graph.nodes},
                                     {n.name: node_params(gm, n) for n in gm.graph.nodes}, assignment),
        fingerprint=model_fingerprint(model, gm), leaf_paths=leaf_paths_of(gm, traced.leaf_paths),
        method=method, workload=workload,
    )


def make_plan(problem: PlacementProblem, placement: Sequence[int], method: str, seed: int | None = None,
              simulated_ms: float | None = None, measured_ms: float | None = None) -> Plan:
    """Expand a group placement to every traced node of the problem's OpGraph.

    Nodes no group lists (a capture may leave out inputs and the output) follow their
    neighbour: an input its first user, anything else its first producer.
    """
    if problem.ops is None:
        raise PlanError("cannot make a plan from a problem without its OpGraph (problem.ops)")
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
    return Plan(
        devices=list(names), assignment=assignment,
        device_map=derive_device_map({n: ops.nodes[n].get("module", "") for n in ops.nodes},
                                     {n: list(ops.nodes[n].get("params", {})) for n in ops.nodes}, assignment),
        fingerprint=ops.graph.get("fingerprint", problem.fingerprint),
        leaf_paths=sorted(called | set(ops.graph.get("leaf_paths", []))),
        method=method, seed=seed, groups=groups, placement=list(placement),
        simulated_ms=simulated_ms, measured_ms=measured_ms, workload=problem.workload,
    )
