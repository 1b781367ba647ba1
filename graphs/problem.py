"""A placement problem: the grouped graph of a workload plus the cluster to place it on.

A *placement* is a sequence of device indices, one per group (group ids are the
GroupedGraph's node ids 0..n-1). Every method (baselines, RL) produces one; the
simulator scores one; a Plan records one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import numpy as np

from graphs.workload import ExpertFn, Workload
from graphs.devices import Cluster, format_size, parse_cluster
from graphs.errors import InfeasibleError

Placement = tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    """What a search proposes and a measurement times: a group placement and the
    number of micro-batches the batch is split into (1: no pipelining)."""

    placement: Placement
    microbatches: int = 1


@dataclass(frozen=True)
class GroupCosts:
    """Dense arrays over groups and devices, derived once per problem (for speed)."""

    fwd_ms: np.ndarray  # [groups, devices]
    bwd_ms: np.ndarray  # [groups, devices]
    opt_ms: np.ndarray  # [groups, devices] optimizer step for the group's parameters
    param_bytes: np.ndarray  # [groups] parameters and buffers
    grad_bytes: np.ndarray  # [groups]
    opt_bytes: np.ndarray  # [groups] optimizer state
    act_bytes: np.ndarray  # [groups] saved for backward
    out_bytes: np.ndarray  # [groups]
    edges: np.ndarray  # [edges, 2] (src, dst) group ids
    edge_bytes: np.ndarray  # [edges]

    @property
    def compute_ms(self) -> np.ndarray:
        return self.fwd_ms + self.bwd_ms

    @property
    def memory_bytes(self) -> np.ndarray:
        """What a group pins on its device for a whole step."""
        return self.param_bytes + self.grad_bytes + self.opt_bytes + self.act_bytes


@dataclass(frozen=True)
class PlacementProblem:
    groups: nx.DiGraph  # GroupedGraph (see graphs/__init__.py)
    cluster: Cluster
    workload: str = ""  # the workload spec it came from, e.g. "zoo:nmt:small"
    ops: nx.DiGraph | None = None  # the profiled OpGraph, when built from a model
    expert: ExpertFn | None = None  # the workload's hand placement rule, if it has one
    # the workload's micro-batch options, which plans carry to the runtime (graphs.workload)
    batch_dims: Mapping[str, int] = field(default_factory=dict, hash=False)  # forward input -> batch dimension
    microbatch_statistics: bool = False  # batch statistics per micro-batch are acceptable

    @property
    def n_groups(self) -> int:
        return self.groups.number_of_nodes()

    @property
    def n_devices(self) -> int:
        return len(self.cluster)

    @property
    def fingerprint(self) -> str:
        return self.groups.graph.get("fingerprint", "")

    @cached_property
    def costs(self) -> GroupCosts:
        g = self.groups
        n = g.number_of_nodes()
        kinds = [d.kind for d in self.cluster.devices]

        def per_device(attr: str) -> np.ndarray:
            return np.array([[g.nodes[i][attr][k] for k in kinds] for i in range(n)], dtype=np.float64).reshape(n, len(kinds))

        def per_group(attr: str) -> np.ndarray:
            return np.array([g.nodes[i][attr] for i in range(n)], dtype=np.float64)

        edges = np.array(sorted(g.edges()), dtype=np.int64).reshape(-1, 2)
        return GroupCosts(
            fwd_ms=per_device("fwd_ms"),
            bwd_ms=per_device("bwd_ms"),
            opt_ms=per_device("opt_ms"),
            param_bytes=per_group("param_bytes"),
            grad_bytes=per_group("grad_bytes"),
            opt_bytes=per_group("opt_bytes"),
            act_bytes=per_group("act_bytes"),
            out_bytes=per_group("out_bytes"),
            edges=edges,
            edge_bytes=np.array([g.edges[int(u), int(v)]["bytes"] for u, v in edges], dtype=np.float64),
        )

    @cached_property
    def colocation_sets(self) -> list[list[int]]:
        """Sets of groups (size >= 2) that must share a device."""
        return [sorted(s) for s in self.groups.graph.get("colocate", []) if len(s) > 1]

    @cached_property
    def colocation_leader(self) -> tuple[int, ...]:
        """For every group, the lowest group id of the (merged) colocation set it belongs
        to: the group whose device it must share; itself when it shares nothing."""
        tied = nx.Graph()
        tied.add_nodes_from(range(self.n_groups))
        for members in self.colocation_sets:
            nx.add_path(tied, members)
        leader = list(range(self.n_groups))
        for component in nx.connected_components(tied):
            for g in component:
                leader[g] = min(component)
        return tuple(leader)

    @property
    def batch_size(self) -> int | None:
        """Rows in the profiled batch: the first tensor input's length along its batch
        dimension where the workload names one (`batch_dims`, read off the capture's
        input shapes), else what capture recorded (OpGraph graph attribute
        `batch_size`: dimension 0)."""
        if self._rows_along_batch_dims is not None:
            return self._rows_along_batch_dims
        for g in (self.groups, self.ops):
            if g is not None and g.graph.get("batch_size"):
                return int(g.graph["batch_size"])
        return None

    @cached_property
    def _rows_along_batch_dims(self) -> int | None:
        """The first batched input's length along its `batch_dims` dimension (inputs by
        forward input name, as batch_dims names them; None: never split); None without
        batch_dims or an OpGraph that records its inputs' shapes."""
        if not self.batch_dims or self.ops is None:
            return None
        ops = self.ops
        names = ops.graph.get("input_names") or sorted(  # placeholders: an OpGraph cached before input_names
            (n for n in ops.nodes if ops.nodes[n]["op"] == "placeholder"), key=lambda n: ops.nodes[n]["order"])
        shapes = [s["shape"] for s in (ops.graph.get("capture") or {}).get("inputs") or []]
        return next((int(shape[d]) for name, shape in zip(names, shapes)
                     if (d := self.batch_dims.get(name, 0)) is not None and len(shape) > d), None)

    def activation_factor(self, microbatches: int = 1) -> float:
        """Activations held with `microbatches` micro-batches in flight, relative to
        one whole batch. GPipe runs every micro-batch's forward before any backward,
        so all of them are live at the end of the forward pass: m micro-batches of
        ceil(B/m) rows (torch.chunk) hold m * ceil(B/m) / B of the batch's
        activations (1 when B is unknown or m divides it)."""
        rows = self.batch_size
        if microbatches <= 1 or not rows:
            return 1.0
        size = -(-rows // microbatches)
        return -(-rows // size) * size / rows

    def memory_per_device(self, placement: Sequence[int], microbatches: int = 1) -> np.ndarray:
        """Bytes each device holds at its peak under the runtime's accounting
        (parameters, gradients, optimizer state, and every activation saved for
        backward, all live at the end of the forward pass, of every micro-batch)."""
        factor = self.activation_factor(microbatches)
        weights = self._memory_weights.get(factor)
        if weights is None:  # made once per factor: the simulator asks for every placement it scores
            c = self.costs
            weights = self._memory_weights[factor] = c.param_bytes + c.grad_bytes + c.opt_bytes + c.act_bytes * factor
        return np.bincount(np.asarray(placement), weights=weights, minlength=self.n_devices)

    @cached_property
    def _memory_weights(self) -> dict[float, np.ndarray]:
        """Activation factor -> bytes each group holds at its device's peak (memory_per_device)."""
        return {}

    def violations(self, placement: Sequence[int], microbatches: int = 1, used: np.ndarray | None = None) -> list[str]:
        """Why a placement (with `microbatches` micro-batches) is invalid or
        infeasible; empty when it is fine. `used`: memory_per_device's answer, when
        the caller has it already."""
        p = np.asarray(placement)
        if p.shape != (self.n_groups,):
            return [f"placement has {p.size} entries for {self.n_groups} groups"]
        if p.size and (p.min() < 0 or p.max() >= self.n_devices):
            return [f"placement names a device index outside 0..{self.n_devices - 1}"]
        if microbatches < 1:
            return [f"microbatches must be at least 1, got {microbatches}"]
        problems = []
        for members in self.colocation_sets:
            if len({int(p[m]) for m in members}) > 1:
                names = ", ".join(self.groups.nodes[m]["name"] for m in members)
                problems.append(f"groups that share parameters are split across devices: {names}")
        used = self.memory_per_device(p, microbatches) if used is None else used
        for i, device in enumerate(self.cluster.devices):
            if device.memory_bytes is not None and used[i] > device.memory_bytes:
                problems.append(f"{device.name} needs {format_size(used[i])} but has {format_size(device.memory_bytes)}")
        return problems

    def check(self, placement: Sequence[int]) -> Placement:
        """Return the placement as a tuple, or raise InfeasibleError naming the first problem."""
        problems = self.violations(placement)
        if problems:
            raise InfeasibleError(problems[0])
        return tuple(int(d) for d in placement)


def build_problem(workload: str | Workload, devices: str | None = None, memory: str | None = None,
                  max_groups: int = 256, cache_dir: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> PlacementProblem:
    """Workload (a spec string or a loaded Workload) -> captured, profiled, grouped
    placement problem on the cluster that `devices`/`memory` describe.

    Profiling runs once per device kind of the cluster (CPU devices with their own
    thread share) and is cached on disk, so a second call is near instant.

    Parameters
    ----------
    workload : a workload spec (`zoo:nmt`, `path/to/workload.py`) or a loaded Workload.
    devices, memory : the `--devices` and `--memory` strings (graphs.devices.parse_cluster).
    max_groups : at most this many placement groups (graphs.group).
    cache_dir : the profile cache (default $PLACER_CACHE or ~/.cache/placer).
    progress : called as progress(done, total) while profiling.

    Raises
    ------
    WorkloadError : the workload cannot be loaded, or fails on its example inputs.
    DeviceSpecError : `devices` or `memory` cannot be read, or names a missing device.
    CaptureError : the model cannot be captured.
    """
    from graphs.capture import capture
    from graphs.group import group
    from graphs.profile import profile
    from graphs.workload import load_workload

    cluster = parse_cluster(devices, memory)
    loaded = load_workload(workload) if isinstance(workload, str) else workload
    cpu_threads = next((d.threads for d in cluster.devices if d.kind == "cpu"), None)
    ops = profile(capture(loaded), loaded, kinds=cluster.kinds, threads=cpu_threads,
                  cache_dir=cache_dir, progress=progress)
    return PlacementProblem(groups=group(ops, max_groups=max_groups), cluster=cluster, workload=loaded.spec,
                            ops=ops, expert=loaded.expert_placement, batch_dims=dict(loaded.batch_dims),
                            microbatch_statistics=loaded.microbatch_statistics)
