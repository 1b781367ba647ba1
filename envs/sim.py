"""The step-time simulator: what one training step of a placed model would cost.

It replays the runtime's schedule (placer.runtime) on profiled costs instead of
running the model, so a reward costs well under a millisecond instead of a whole
training step:

- the work comes in *units* in a fixed order: the runs of one group's ops in the
  traced (fx) order the runtime follows, or, for a problem without its OpGraph,
  the groups in id order (ids are a topological order); a group's ops are
  mostly contiguous in fx order, so a unit is mostly a whole group;
- one worker per device, running its units in that order in the forward pass and
  in reverse in the backward pass;
- every contiguous run of units on one device is one chunk of the runtime: it
  starts when its device is free and all its inputs from other devices have
  arrived, pays a dispatch overhead, runs its units back to back, and hands its
  outputs on when it ends;
- a tensor that crosses devices occupies the directed link for
  latency + bytes / bandwidth, and transfers on one link go one after another;
- the whole forward pass completes, then the loss, then the backward pass, whose
  gradients flow along the reversed edges at the same transfer cost;
- once the whole backward pass is done, the optimizer steps every device's
  parameters: the CPU devices' one after another on the host, each GPU's on the
  GPU, concurrently.

Because every device's order agrees with the global unit order, one pass in that
order (and one in reverse) computes this schedule exactly; no event queue is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from graphs.devices import Cluster, Link
from graphs.problem import PlacementProblem

# Dispatching a chunk to a worker (queue hand-off, Python call overhead), before
# calibration; measured placements refine it.
DEFAULT_CHUNK_OVERHEAD_MS = 0.05
CACHE_SIZE = 8192


def link_key(key: frozenset[str] | tuple[str, ...] | str) -> frozenset[str]:
    """A link's key: the set of device kinds it joins ("cpu+cuda", ("cpu", "cuda") and
    frozenset({"cpu", "cuda"}) all name the same link; "cpu" is cpu<->cpu)."""
    if isinstance(key, str):
        return frozenset(key.split("+"))
    return frozenset(key)


@dataclass(frozen=True)
class Calibration:
    """The simulator's free parameters, fitted to measurements by envs.calibrate."""

    compute_scale: dict[str, float]  # device kind -> factor on its profiled compute times
    links: dict[frozenset[str], Link]  # kind pair -> link; Link or (latency_s, bandwidth_Bps) accepted
    chunk_overhead_ms: float = DEFAULT_CHUNK_OVERHEAD_MS  # per chunk dispatch, each pass
    loss_ms: float = 0.0  # between the end of the forward pass and the start of backward

    def __post_init__(self) -> None:
        links = {link_key(k): v if isinstance(v, Link) else Link(*map(float, v)) for k, v in self.links.items()}
        object.__setattr__(self, "links", links)
        object.__setattr__(self, "compute_scale", {k: float(v) for k, v in self.compute_scale.items()})

    @classmethod
    def default(cls, cluster: Cluster) -> Calibration:
        """Profiled costs as measured and the cluster's nominal links."""
        return cls(compute_scale={k: 1.0 for k in cluster.kinds}, links=dict(cluster.links))

    def link(self, kind_a: str, kind_b: str) -> Link:
        return self.links[frozenset({kind_a, kind_b})]

    def to_json(self) -> dict:
        """A JSON-ready dict (from_json reads it back)."""
        return {
            "compute_scale": dict(self.compute_scale),
            "links": {"+".join(sorted(k)): {"latency_s": v.latency_s, "bandwidth_Bps": v.bandwidth_Bps}
                      for k, v in self.links.items()},
            "chunk_overhead_ms": self.chunk_overhead_ms,
            "loss_ms": self.loss_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping | str) -> Calibration:
        """From to_json's dict, or its text."""
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            compute_scale=dict(data["compute_scale"]),
            links={k: Link(float(v["latency_s"]), float(v["bandwidth_Bps"])) for k, v in data["links"].items()},
            chunk_overhead_ms=float(data["chunk_overhead_ms"]),
            loss_ms=float(data["loss_ms"]),
        )


@dataclass(frozen=True)
class SimResult:
    step_ms: float  # inf when the placement is malformed
    busy_ms: tuple[float, ...]  # per device: compute, chunk dispatch and optimizer time
    peak_bytes: tuple[int, ...]  # per device (PlacementProblem.memory_per_device)
    feasible: bool
    reason: str = ""  # why it is infeasible; "" when feasible
    # With simulate(..., timeline=True): one dict per event, {"device", "kind" (fwd, bwd,
    # opt, xfer), "label" (group name, or "src->dst" devices for a transfer), "start_ms",
    # "end_ms"}, plus "group" (fwd/bwd) or "groups" (xfer: the producing and consuming group).
    timeline: list[dict] | None = field(default=None, compare=False)

    @property
    def step_s(self) -> float:
        return self.step_ms / 1000.0


@dataclass(frozen=True)
class Units:
    """The simulator's units of work, in the runtime's order (see the module doc)."""

    group: list[int]  # unit -> its group
    share: np.ndarray  # [units, 2]: the unit's share of its group's forward and backward time
    edges: dict[tuple[int, int], float]  # (unit, unit) -> bytes


@dataclass(frozen=True)
class PassCosts:
    """One pass's time per unit and device, as plain lists for the simulator's loop."""

    per_unit: list[list[float]]  # [unit][device]
    cumulative: list[list[float]]  # [device][k]: the time of units 0..k-1 (a chunk's is a difference)

    @classmethod
    def of(cls, ms: np.ndarray) -> PassCosts:
        cumulative = np.vstack([np.zeros((1, ms.shape[1])), np.cumsum(ms, axis=0)]).T
        return cls(ms.tolist(), cumulative.tolist())


def execution_units(problem: PlacementProblem) -> Units:
    """Split the groups into runs of consecutive ops in fx order (the runtime chunks
    by fx order, so a group whose ops interleave with another's runs in pieces).
    Model inputs and the output are no chunk's work in the runtime: left out."""
    n, ops = problem.n_groups, problem.ops
    if ops is None:
        edges = zip(map(tuple, problem.costs.edges.tolist()), problem.costs.edge_bytes.tolist())
        return Units(list(range(n)), np.ones((n, 2)), dict(edges))
    group_of = {m: i for i in range(n) for m in problem.groups.nodes[i]["members"]}
    run_ops = sorted((m for m in group_of if ops.nodes[m]["op"] not in ("placeholder", "output")),
                     key=lambda m: ops.nodes[m]["order"])
    unit_of: dict[str, int] = {}
    units: list[int] = []
    for m in run_ops:
        if not units or units[-1] != group_of[m]:
            units.append(group_of[m])
        unit_of[m] = len(units) - 1
    # A group's pieces share its time as their ops' profiled times do (on the first
    # device's kind: proportions hardly differ by kind), evenly when all are free.
    kind = problem.cluster.devices[0].kind
    work = np.zeros((len(units), 2))
    for m, k in unit_of.items():
        work[k] += (ops.nodes[m]["fwd_ms"][kind], ops.nodes[m]["bwd_ms"][kind])
    group_work = np.zeros((n, 2))
    np.add.at(group_work, units, work)
    total = group_work[units]
    even = np.broadcast_to(1.0 / np.bincount(units, minlength=n)[units][:, None], work.shape).copy()
    share = np.divide(work, total, out=even, where=total > 0)
    edges: dict[tuple[int, int], float] = {}
    crossed: set[tuple[str, int]] = set()  # a value moves once to a unit, however many of its ops read it
    for a, b, nbytes in ops.edges(data="bytes"):
        if a in unit_of and b in unit_of and unit_of[a] != unit_of[b] and (a, unit_of[b]) not in crossed:
            crossed.add((a, unit_of[b]))
            key = (unit_of[a], unit_of[b])
            edges[key] = edges.get(key, 0.0) + float(nbytes or 0)
    return Units(units, share, edges)


class Simulator:
    """Simulates placements of one problem under one calibration.

    Everything that does not depend on the placement (the units, their costs under
    the calibration, their edges, the links) is turned into plain Python lists once,
    here, so that simulate() is a tight loop (>= 1,000 calls a second for 256
    groups); results are memoised by placement.
    """

    def __init__(self, problem: PlacementProblem, calibration: Calibration | None = None):
        self.problem = problem
        self.calibration = calibration or Calibration.default(problem.cluster)
        cal = self.calibration
        devices = problem.cluster.devices
        costs = problem.costs
        scale = [cal.compute_scale.get(d.kind, 1.0) for d in devices]
        units = execution_units(problem)
        self._unit_group = units.group
        self._identity = units.group == list(range(problem.n_groups))  # units are the groups: no mapping
        self._fwd = PassCosts.of(costs.fwd_ms[units.group] * units.share[:, :1] * scale)
        self._bwd = PassCosts.of(costs.bwd_ms[units.group] * units.share[:, 1:] * scale)
        self._opt = costs.opt_ms * scale  # [group, device], summed per device with numpy
        self._names_of_units = [problem.groups.nodes[g]["name"] for g in units.group]
        self._preds: list[list[tuple[int, int, float]]] = [[] for _ in units.group]  # (src, edge, bytes)
        self._succs: list[list[tuple[int, int, float]]] = [[] for _ in units.group]  # (dst, edge, bytes)
        for e, ((u, v), nbytes) in enumerate(sorted(units.edges.items())):
            self._preds[v].append((u, e, nbytes))
            self._succs[u].append((v, e, nbytes))
        self._n_edges = len(units.edges)
        n_dev = len(devices)
        links = [[cal.links.get(frozenset({a.kind, b.kind})) or problem.cluster.link(i, j) if i != j else None
                  for j, b in enumerate(devices)] for i, a in enumerate(devices)]
        self._latency_ms = [[l.latency_s * 1e3 if l else 0.0 for l in row] for row in links]
        self._ms_per_byte = [[1e3 / l.bandwidth_Bps if l else 0.0 for l in row] for row in links]
        self._n_dev = n_dev
        self._names = [d.name for d in devices]
        self._on_host = [d.kind == "cpu" for d in devices]
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._evaluate)

    def simulate(self, placement: Sequence[int], timeline: bool = False) -> SimResult:
        """Step time, per-device busy time and peak memory, and feasibility of a placement
        (group id -> device index); with timeline=True also every event of the step."""
        p = tuple(placement.tolist()) if isinstance(placement, np.ndarray) else tuple(map(int, placement))
        if timeline:
            return self._evaluate(p, record=True)
        return self._cached(p)

    def step_ms(self, placement: Sequence[int]) -> float:
        return self.simulate(placement).step_ms

    def _evaluate(self, p: tuple[int, ...], record: bool = False) -> SimResult:
        problem = self.problem
        if len(p) != problem.n_groups or (p and (min(p) < 0 or max(p) >= self._n_dev)):
            return SimResult(math.inf, (0.0,) * self._n_dev, (0,) * self._n_dev, False, problem.violations(p)[0])
        problems = problem.violations(p)
        events = [] if record else None
        step_ms, busy = self._schedule(p, events)
        peak = tuple(int(b) for b in problem.memory_per_device(p))
        return SimResult(step_ms, tuple(busy), peak, not problems, "; ".join(problems), events)

    def _schedule(self, p: tuple[int, ...], events: list | None) -> tuple[float, list[float]]:
        """Forward in unit order, the loss, backward in reverse order, then the
        optimizer step; returns the step time and each device's busy time."""
        n, n_dev = len(p), self._n_dev
        busy = [0.0] * n_dev
        links_free = [[0.0] * n_dev for _ in range(n_dev)]  # when each directed link is next idle
        arrival = [0.0] * self._n_edges  # when an edge's tensor (or gradient) reached its consumer's device
        q = p if self._identity else [p[g] for g in self._unit_group]  # each unit's device
        on = np.asarray(q)
        cuts = [0, *(np.flatnonzero(on[1:] != on[:-1]) + 1).tolist(), len(q)]
        chunks = [(q[a], a, b) for a, b in zip(cuts, cuts[1:]) if b > a]  # (device, units a..b-1)
        free = self._pass(q, chunks, self._preds, self._succs, self._fwd, "fwd", [0.0] * n_dev,
                          arrival, links_free, busy, events)
        loss_end = max(free) + self.calibration.loss_ms
        free = self._pass(q, chunks[::-1], self._succs, self._preds, self._bwd, "bwd", [loss_end] * n_dev,
                          arrival, links_free, busy, events)
        # optimizer.step() is one call on the caller's thread once backward is done: the
        # host runs the CPU devices' updates one after another, while each GPU runs its
        # own (launched asynchronously) alongside.
        devices = np.asarray(p)
        opt_ms = np.bincount(devices, weights=self._opt[np.arange(n), devices], minlength=n_dev).tolist()
        backward_end = max(free[d] for d in set(p)) if n else loss_end
        host = backward_end
        step = backward_end
        for d in sorted(set(p)):
            start = backward_end
            if self._on_host[d]:
                start, host = host, host + opt_ms[d]
            end = start + opt_ms[d]
            busy[d] += opt_ms[d]
            if events is not None and opt_ms[d] > 0:
                self._event(events, d, "opt", "optimizer", start, end)
            step = max(step, end)
        return step, busy

    def _pass(self, q: Sequence[int], chunks: list[tuple[int, int, int]], inputs: list, outputs: list,
              cost: PassCosts, kind: str, free: list[float], arrival: list[float], links_free: list[list[float]],
              busy: list[float], events: list | None) -> list[float]:
        """Run every chunk (device, first unit, end) in turn, taking tensors from
        `inputs` and sending to `outputs` (the edges, or the reversed edges for
        gradients); `q` is each unit's device. Updates arrival/links_free/busy and
        returns `free`, when each device's worker is idle again.

        As in the runtime, a chunk starts once all its inputs from other devices are
        there (inputs from its own device are, by the order), runs its units back to
        back, and hands its outputs on when it ends: so only its total time matters,
        a difference of prefix sums."""
        latency, per_byte, overhead = self._latency_ms, self._ms_per_byte, self.calibration.chunk_overhead_ms
        for d, a, b in chunks:
            ready = free[d]
            for v in range(a, b):
                for u, e, _ in inputs[v]:
                    if q[u] != d and arrival[e] > ready:
                        ready = arrival[e]
            cumulative = cost.cumulative[d]
            t = free[d] = ready + overhead + cumulative[b] - cumulative[a]
            busy[d] += t - ready
            if events is not None:
                self._chunk_events(events, d, kind, cost, range(a, b) if kind == "fwd" else range(b - 1, a - 1, -1),
                                   ready)
            for v in range(a, b):
                for w, e, nbytes in outputs[v]:
                    c = q[w]
                    if c != d:  # over the link d -> c, after what is already queued on it
                        start = links_free[d][c]
                        if t > start:
                            start = t
                        links_free[d][c] = arrival[e] = start + latency[d][c] + nbytes * per_byte[d][c]
                        if events is not None:
                            self._event(events, d, "xfer", f"{self._names[d]}->{self._names[c]}", start,
                                        arrival[e], groups=(self._unit_group[v], self._unit_group[w]))
        return free

    def _chunk_events(self, events: list, d: int, kind: str, cost: PassCosts, units: range, ready: float) -> None:
        """One event per unit of a chunk; the dispatch overhead shows as part of the first."""
        t = ready + self.calibration.chunk_overhead_ms
        for v in units:
            start, t = t, t + cost.per_unit[v][d]
            self._event(events, d, kind, self._names_of_units[v], ready if v == units[0] else start, t,
                        group=self._unit_group[v])

    def _event(self, events: list, device: int, kind: str, label: str, start: float, end: float, **extra) -> None:
        events.append({"device": self._names[device], "kind": kind, "label": label,
                       "start_ms": start, "end_ms": end, **extra})
