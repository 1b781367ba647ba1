"""The step-time simulator: what one training step of a placed model would cost.

It replays the runtime's schedule (placer.runtime) on profiled costs instead of
running the model, so a reward costs well under a millisecond instead of a whole
training step:

- one worker per device, working through its groups in a fixed order: forward in
  increasing group id (ids are a topological order), backward in decreasing id;
  a group starts when its device is free and all its inputs have arrived;
- a tensor that crosses devices occupies the directed link for
  latency + bytes / bandwidth, and transfers on one link go one after another;
- the whole forward pass completes, then the loss, then the backward pass, whose
  gradients flow along the reversed edges at the same transfer cost;
- each device runs the optimizer step for its groups after its last backward;
- every contiguous run of groups on one device (in group order) is one chunk of
  the runtime, and each chunk pays a dispatch overhead once per pass.

Because every device's order agrees with the global group order, one pass in group
order (and one in reverse) computes this schedule exactly; no event queue is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from placer.cluster import Cluster, Link
from placer.problem import PlacementProblem

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


class Simulator:
    """Simulates placements of one problem under one calibration.

    Everything that does not depend on the placement is turned into plain Python
    lists once, here, so that simulate() is a tight loop (>= 1,000 calls a second
    for 256 groups); results are memoised by placement.
    """

    def __init__(self, problem: PlacementProblem, calibration: Calibration | None = None):
        self.problem = problem
        self.calibration = calibration or Calibration.default(problem.cluster)
        cal = self.calibration
        devices = problem.cluster.devices
        costs = problem.costs
        scale = [cal.compute_scale.get(d.kind, 1.0) for d in devices]
        self._fwd = (costs.fwd_ms * scale).tolist()  # [group][device]
        self._bwd = (costs.bwd_ms * scale).tolist()
        self._opt = (costs.opt_ms * scale).tolist()
        n = problem.n_groups
        self._preds: list[list[tuple[int, int, float]]] = [[] for _ in range(n)]  # (src, edge, bytes)
        self._succs: list[list[tuple[int, int, float]]] = [[] for _ in range(n)]  # (dst, edge, bytes)
        for e, ((u, v), nbytes) in enumerate(zip(costs.edges.tolist(), costs.edge_bytes.tolist())):
            self._preds[v].append((u, e, nbytes))
            self._succs[u].append((v, e, nbytes))
        self._n_edges = len(costs.edges)
        n_dev = len(devices)
        links = [[cal.links.get(frozenset({a.kind, b.kind})) or problem.cluster.link(i, j) if i != j else None
                  for j, b in enumerate(devices)] for i, a in enumerate(devices)]
        self._latency_ms = [[l.latency_s * 1e3 if l else 0.0 for l in row] for row in links]
        self._ms_per_byte = [[1e3 / l.bandwidth_Bps if l else 0.0 for l in row] for row in links]
        self._n_dev = n_dev
        self._names = [d.name for d in devices]
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._evaluate)

    def simulate(self, placement: Sequence[int], timeline: bool = False) -> SimResult:
        """Step time, per-device busy time and peak memory, and feasibility of a placement
        (group id -> device index); with timeline=True also every event of the step."""
        p = tuple(int(d) for d in placement)
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
        """Forward in group order, the loss, backward in reverse order, then each
        device's optimizer step; returns the step time and each device's busy time."""
        n, n_dev = len(p), self._n_dev
        busy = [0.0] * n_dev
        links_free = [[0.0] * n_dev for _ in range(n_dev)]  # when each directed link is next idle
        arrival = [0.0] * self._n_edges  # when an edge's tensor (or gradient) reached its consumer's device
        done = [0.0] * n  # when each group's forward (later: backward) finished
        self._pass(p, range(n), self._preds, self._succs, self._fwd, "fwd", [0.0] * n_dev,
                   done, arrival, links_free, busy, events)
        loss_end = max(done, default=0.0) + self.calibration.loss_ms
        free = self._pass(p, range(n - 1, -1, -1), self._succs, self._preds, self._bwd, "bwd", [loss_end] * n_dev,
                          done, arrival, links_free, busy, events)
        opt_ms = [0.0] * n_dev
        for v, d in enumerate(p):
            opt_ms[d] += self._opt[v][d]
        step = 0.0
        for d in set(p):
            end = free[d] + opt_ms[d]
            busy[d] += opt_ms[d]
            if events is not None and opt_ms[d] > 0:
                self._event(events, d, "opt", "optimizer", free[d], end)
            step = max(step, end)
        return step, busy

    def _pass(self, p: tuple[int, ...], order: range, inputs: list, outputs: list, cost: list, kind: str,
              free: list[float], done: list[float], arrival: list[float], links_free: list[list[float]],
              busy: list[float], events: list | None) -> list[float]:
        """Run every group once in `order` (each device's worker in that order), taking
        its tensors from `inputs` and sending to `outputs` (the edges, or the reversed
        edges for gradients); updates done/arrival/links_free/busy, returns `free`."""
        latency, per_byte, overhead = self._latency_ms, self._ms_per_byte, self.calibration.chunk_overhead_ms
        previous_device = -1
        for v in order:
            d = p[v]
            ready = free[d]
            for u, e, _ in inputs[v]:
                t = done[u] if p[u] == d else arrival[e]
                if t > ready:
                    ready = t
            # a new chunk starts wherever the device changes along the order
            work = cost[v][d] + (overhead if d != previous_device else 0.0)
            previous_device = d
            end = done[v] = free[d] = ready + work
            busy[d] += work
            if events is not None:
                self._event(events, d, kind, self.problem.groups.nodes[v]["name"], ready, end, group=v)
            for w, e, nbytes in outputs[v]:
                b = p[w]
                if b != d:  # over the link d -> b, after what is already queued on it
                    start = links_free[d][b]
                    if end > start:
                        start = end
                    links_free[d][b] = arrival[e] = start + latency[d][b] + nbytes * per_byte[d][b]
                    if events is not None:
                        self._event(events, d, "xfer", f"{self._names[d]}->{self._names[b]}", start, arrival[e],
                                    groups=(v, w))
        return free

    def _event(self, events: list, device: int, kind: str, label: str, start: float, end: float, **extra) -> None:
        events.append({"device": self._names[device], "kind": kind, "label": label,
                       "start_ms": start, "end_ms": end, **extra})
