"""The step-time simulator: what one training step of a placed model would cost.

It replays the runtime's schedule (placer.runtime) on profiled costs instead of running the model, so a
reward costs well under a millisecond instead of a whole training step:

- the work comes in *atoms*: the groups (only those with ops that compute: inputs, parameters and buffers
  cost nothing and are never handed between devices);
- the atoms are cut into chunks by graphs.schedule.partition, the very function the runtime cuts its chunks
  with (the runtime uses the plan's groups as its atoms), so both run the same chunks; a chunk runs when the
  chunks it needs are done and its inputs from other devices have arrived, pays a dispatch overhead, runs
  its atoms back to back and hands its outputs on when it ends;
- one worker per device runs, of its chunks ready when it is free, the one of highest priority (micro-batch,
  then graphs.schedule.pass_order: chunks that hand work to another device first, then fx order; backward:
  the reverse of both orders), the runtime's rule (placer.runtime.dataflow);
- a chunk's outputs to another chunk on another device occupy the directed link for latency + bytes /
  bandwidth, one transfer after another on one link;
- with m micro-batches (GPipe) every micro-batch runs every chunk, each at the profiled cost of a
  micro-batch (`microbatch_step_ms`, below), all forwards first;
- the whole forward pass completes, then the loss, then the backward pass, whose gradients flow along the
  reversed edges at the same transfer cost;
- once the whole backward pass is done, the optimizer steps every device's parameters: the CPU devices' one
  after another on the host, each GPU's on the GPU, concurrently.

A device that is free takes, of its tasks ready by then, the one of highest priority: the runtime's rule.
The simulation starts tasks in time order over all devices (each device keeps a heap of tasks that will
arrive and a heap of those that have), so every task's inputs are booked before its device chooses. Tasks
are numbered in each pass's priority order and read whom they hand on to from flat lists, so the loop
allocates little more than its heap entries; simulate() makes over 1,000 calls a second at 256 groups (1,190
on 2 devices here).

Micro-batch costs: the profile records, per device kind, m -> ms of a whole training step at batch/m, times
m (OpGraph graph attributes `microbatch_step_ms_by_kind`, and `microbatch_step_ms`, the first kind's, which
stands for kinds without a table of their own), read through graphs.bounds.microbatch_table: every step
less its optimizer step, which a pipelined step runs once, and held so that no step at a smaller batch costs
more than one at a larger batch (a disturbed profile step would otherwise stand for every plan with that
count). A micro-batch's op costs on a device of kind k are the batch's scaled by table_k[m] / (m * table_k[1]),
times (1 + pipelined_slowdown) for every m > 1 (`Calibration.pipelined_slowdown`,
fitted, 0 by default: the profile times whole steps of the eager model at batch/m alone, where a small
batch's activations stay in cache, gpt-medium's two half-batch steps taking 0.90 of one full step; placed, two
devices share the caches, and pipelined plans measured 9-22% above the simulator without it). One factor for
every count: measured on the same stages at m = 1, 2, 4 and 8, the extra cost did not grow with m (a factor
growing as 1 - 1/m priced m = 2 4-7% too cheap against m = 4: docs/results.md, "Interleaved stages"). A kind whose
table lacks m (profiling times 1, 2, 4 and 8 where the batch divides and the model runs): a placement using
such a device is infeasible with that reason. Without any table, costs scale linearly (1/m), which overrates
small micro-batches; `Simulator.notes` says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple
from heapq import heappop, heappush

import numpy as np

from graphs.bounds import microbatch_table
from graphs.devices import Cluster, Link
from graphs.problem import PlacementProblem
from graphs.schedule import partition, pass_order

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
    pipelined_slowdown: float = 0.0  # a micro-batch's compute with m > 1: the profile's x (1 + this)

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
        return {"compute_scale": dict(self.compute_scale),
                "links": {"+".join(sorted(k)): {"latency_s": v.latency_s, "bandwidth_Bps": v.bandwidth_Bps}
                          for k, v in self.links.items()},
                "chunk_overhead_ms": self.chunk_overhead_ms, "loss_ms": self.loss_ms,
                "pipelined_slowdown": self.pipelined_slowdown}

    @classmethod
    def from_json(cls, data: Mapping | str) -> Calibration:
        """From to_json's dict, or its text."""
        if isinstance(data, str):
            data = json.loads(data)
        return cls(compute_scale=dict(data["compute_scale"]),
                   links={k: Link(float(v["latency_s"]), float(v["bandwidth_Bps"])) for k, v in data["links"].items()},
                   chunk_overhead_ms=float(data["chunk_overhead_ms"]), loss_ms=float(data["loss_ms"]),
                   pipelined_slowdown=float(data.get("pipelined_slowdown", 0.0)))  # older files: none


@dataclass(frozen=True)
class SimResult:
    step_ms: float  # inf when the placement is malformed
    busy_ms: tuple[float, ...]  # per device: compute, chunk dispatch and optimizer time
    peak_bytes: tuple[int, ...]  # per device (PlacementProblem.memory_per_device)
    feasible: bool
    reason: str = ""  # why it is infeasible; "" when feasible
    # With simulate(..., timeline=True): one dict per event, {"device", "kind" (fwd, bwd, opt, xfer), "label"
    # (group name, or "src->dst" devices for a transfer), "start_ms", "end_ms"}, plus for fwd/bwd "group", "chunk"
    # and "microbatch", for xfer "groups" (a group of the sending and one of the receiving chunk), "phase" and
    # "microbatch".
    timeline: list[dict] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Atoms:
    """The simulator's atoms (see the module doc): groups in id order (a topological
    order) and the edges between them."""

    group: list[int]  # atom -> its group
    edges: list[tuple[int, int]]  # (atom, atom), sorted and unique, lower to higher
    edge_bytes: list[float]  # bytes each edge carries per step


def execution_atoms(problem: PlacementProblem) -> Atoms:
    """The groups that compute, and what crosses between them. With the OpGraph: a
    value crosses once to each group that reads it, however many of its ops do;
    edges from inputs, parameters and buffers carry nothing (the runtime's chunks
    read parameters themselves); ordering edges (bytes 0) count as edges."""
    n, ops = problem.n_groups, problem.ops
    if ops is None:
        pairs = {(int(u), int(v)): float(b) for (u, v), b in zip(problem.costs.edges.tolist(), problem.costs.edge_bytes)}
        edges = sorted(pairs)
        return Atoms(list(range(n)), edges, [pairs[e] for e in edges])
    group_of = {m: g for g in range(n) for m in problem.groups.nodes[g]["members"]}
    body = {m for m in group_of if ops.nodes[m]["op"] not in ("placeholder", "output", "get_attr")}
    groups = sorted({group_of[m] for m in body})
    atom = {g: i for i, g in enumerate(groups)}
    pairs: dict[tuple[int, int], float] = {}
    crossed: set[tuple[str, int]] = set()
    for a, b, nbytes in ops.edges(data="bytes"):
        if a in body and b in body and group_of[a] != group_of[b] and (a, group_of[b]) not in crossed:
            crossed.add((a, group_of[b]))
            key = (atom[group_of[a]], atom[group_of[b]])
            pairs[key] = pairs.get(key, 0.0) + float(nbytes or 0)
    edges = sorted(pairs)
    return Atoms(groups, edges, [pairs[e] for e in edges])


def microbatch_tables(problem: PlacementProblem) -> dict[str, dict[int, float] | None]:
    """Per device kind of the cluster: {m: m x ms of a micro-batch's forward and backward
    at batch/m} on that kind (graphs.bounds.microbatch_table: the profile's whole steps
    less their optimizer step; its own table, else the flat one), from the grouped graph
    or else the OpGraph; None where the profile has no table."""
    graphs = [g for g in (problem.groups, problem.ops) if g is not None]
    return {kind: next((t for t in (microbatch_table(g, kind) for g in graphs) if t), None)
            for kind in problem.cluster.kinds}


def microbatch_factor(table: dict[int, float] | None, m: int) -> float | None:
    """A micro-batch's compute relative to the whole batch's, from one kind's table
    (`microbatch_tables`): table[m] / (m * table[1]); 1/m (linear) without a table;
    None where the table lacks m (the model could not run at batch/m)."""
    if m == 1:
        return 1.0
    if table is None:
        return 1.0 / m
    return table[m] / (m * table[1]) if m in table and table.get(1) else None


class Simulator:
    """Simulates placements of one problem under one calibration.

    Everything that does not depend on the placement (the atoms, their costs under
    the calibration, their edges, the links) is turned into plain Python lists and
    numpy arrays once, here, so that simulate() is a tight loop; results are
    memoised by (placement, micro-batches).
    """

    def __init__(self, problem: PlacementProblem, calibration: Calibration | None = None):
        self.problem = problem
        self.calibration = calibration or Calibration.default(problem.cluster)
        cal = self.calibration
        devices = problem.cluster.devices
        costs = problem.costs
        scale = np.array([cal.compute_scale.get(d.kind, 1.0) for d in devices])
        atoms = execution_atoms(problem)
        self._atom_group = atoms.group
        self._atom_rows = np.array(atoms.group, dtype=np.intp)
        self._groups = np.arange(problem.n_groups)
        self._identity = atoms.group == list(range(problem.n_groups))
        self._fwd = costs.fwd_ms[atoms.group] * scale  # [atom, device]
        self._bwd = costs.bwd_ms[atoms.group] * scale
        self._rows = np.arange(len(atoms.group))
        self._edges = atoms.edges
        self._src = np.array([u for u, _ in atoms.edges], dtype=np.int64)
        self._dst = np.array([v for _, v in atoms.edges], dtype=np.int64)
        self._edge_bytes = np.array(atoms.edge_bytes, dtype=np.float64)
        self._opt = costs.opt_ms * scale  # [group, device], summed per device with numpy
        self._tables = microbatch_tables(problem)
        self._kinds = [d.kind for d in devices]
        self._factors: dict[int, np.ndarray] = {}  # m -> compute_factors(m)
        self.notes: list[str] = []
        self._names_of_groups = [problem.groups.nodes[g]["name"] for g in range(problem.n_groups)]
        n_dev = len(devices)
        links = [[cal.links.get(frozenset({a.kind, b.kind})) or problem.cluster.link(i, j) if i != j else None
                  for j, b in enumerate(devices)] for i, a in enumerate(devices)]
        self._latency_ms = [[l.latency_s * 1e3 if l else 0.0 for l in row] for row in links]
        self._ms_per_byte = [[1e3 / l.bandwidth_Bps if l else 0.0 for l in row] for row in links]
        self._n_dev = n_dev
        self._names = [d.name for d in devices]
        self._on_host = [d.kind == "cpu" for d in devices]
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._evaluate)

    def simulate(self, placement: Sequence[int], microbatches: int = 1, timeline: bool = False) -> SimResult:
        """Step time, per-device busy time and peak memory, and feasibility of a placement
        (group id -> device index) run with `microbatches` micro-batches (GPipe); with
        timeline=True also every event of the step."""
        p = tuple(placement.tolist()) if isinstance(placement, np.ndarray) else tuple(map(int, placement))
        m = int(microbatches)
        if timeline:
            return self._evaluate(p, m, record=True)
        return self._cached(p, m)

    def compute_factors(self, microbatches: int) -> np.ndarray:
        """Per device: a micro-batch's compute relative to the whole batch's on its
        kind (see the module doc); NaN where its kind's profile lacks `microbatches`."""
        m = microbatches
        if m not in self._factors:
            factors = [microbatch_factor(self._tables[kind], m) for kind in self._kinds]
            linear = sorted({k for k in self._kinds if self._tables[k] is None})
            if m > 1 and linear:
                note = (f"no profiled micro-batch steps on {', '.join(linear)}: micro-batch costs scale linearly "
                        f"(1/m), which overrates small micro-batches")
                if note not in self.notes:
                    self.notes.append(note)
            slowdown = 1.0 + (self.calibration.pipelined_slowdown if m > 1 else 0.0)
            self._factors[m] = np.array([math.nan if f is None else f * slowdown for f in factors])
        return self._factors[m]

    def _evaluate(self, p: tuple[int, ...], m: int = 1, record: bool = False) -> SimResult:
        problem = self.problem
        if len(p) != problem.n_groups or (p and (min(p) < 0 or max(p) >= self._n_dev)) or m < 1:
            return SimResult(math.inf, (0.0,) * self._n_dev, (0,) * self._n_dev, False, problem.violations(p, m)[0])
        devices = np.array(p, dtype=np.intp)
        used = problem.memory_per_device(devices, m)
        problems = problem.violations(devices, m, used=used)
        unprofiled = sorted({self._kinds[d] for d in set(p) if math.isnan(self.compute_factors(m)[d])})
        if unprofiled:
            has = sorted(self._tables[unprofiled[0]] or {})  # profiling times 1, 2, 4, 8 where the batch divides
            reason = f"{m} micro-batches were not profiled on {unprofiled[0]}, which has {has}: choose one of those"
            return SimResult(math.inf, (0.0,) * self._n_dev, tuple(int(b) for b in used), False,
                             "; ".join([reason, *problems]))
        events = [] if record else None
        step_ms, busy = self._schedule(p, devices, m, events)
        peak = tuple(int(b) for b in used)
        return SimResult(step_ms, tuple(busy), peak, not problems, "; ".join(problems), events)

    def _schedule(self, p: tuple[int, ...], devices: np.ndarray, m: int,
                  events: list | None) -> tuple[float, list[float]]:
        """Chunks, then forward of every micro-batch, the loss, backward in reverse,
        then the optimizer step; returns the step time and each device's busy time.
        `devices`: the placement `p` as an array."""
        n_dev = self._n_dev
        if self._identity:
            dev, devs = p, devices
        else:  # each atom's device
            devs = devices[self._atom_rows]
            dev = devs.tolist()
        part = partition(len(dev), self._edges, dev, presorted=True)
        chunk_of = part.chunk_of
        chunks = np.array(chunk_of, dtype=np.intp)
        n_chunks = len(chunk_of) and int(chunks.max()) + 1
        cdev_array = np.zeros(n_chunks, dtype=np.intp)
        cdev_array[chunks] = devs
        fwd = np.bincount(chunks, weights=self._fwd[self._rows, devs], minlength=n_chunks)
        bwd = np.bincount(chunks, weights=self._bwd[self._rows, devs], minlength=n_chunks)
        if m > 1:  # a chunk's atoms share its device: scale each chunk by its device's factor
            factor = self.compute_factors(m)[cdev_array]
            fwd, bwd = fwd * factor, bwd * factor
        # The chunk graph: unique (a, b) pairs sorted, their bytes per micro-batch summed.
        cu, cv = chunks[self._src], chunks[self._dst]
        apart = cu != cv
        keys, where = np.unique(cu[apart] * n_chunks + cv[apart], return_inverse=True)
        pair_bytes = np.bincount(where, weights=self._edge_bytes[apart], minlength=len(keys)) / m
        heads, tails = keys // n_chunks, keys % n_chunks
        busy = [0.0] * n_dev
        links_free = [[0.0] * n_dev for _ in range(n_dev)]
        members = _members(chunk_of, n_chunks) if events is not None else None
        overhead = self.calibration.chunk_overhead_ms
        work = _work(pass_order(part, False), cdev_array, fwd + overhead, heads, tails, pair_bytes)
        free = self._pass(work, m, False, [0.0] * n_dev, links_free, busy, events, members)
        loss_end = max(free) + self.calibration.loss_ms
        work = _work(pass_order(part, True), cdev_array, bwd + overhead, tails, heads, pair_bytes)
        free = self._pass(work, m, True, [loss_end] * n_dev, links_free, busy, events, members)
        # optimizer.step() is one call on the caller's thread once backward is done: the
        # host runs the CPU devices' updates one after another, while each GPU runs its
        # own (launched asynchronously) alongside.
        opt_ms = np.bincount(devices, weights=self._opt[self._groups, devices], minlength=n_dev).tolist()
        used = sorted(set(p))
        backward_end = max(free[d] for d in used) if p else loss_end
        host = step = backward_end
        for d in used:
            start = backward_end
            if self._on_host[d]:
                start, host = host, host + opt_ms[d]
            end = start + opt_ms[d]
            busy[d] += opt_ms[d]
            if events is not None and opt_ms[d] > 0:
                self._event(events, d, "opt", "optimizer", start, end)
            step = max(step, end)
        return step, busy

    def _pass(self, work: _Work, m: int, backward: bool, free: list[float], links_free: list[list[float]],
              busy: list[float], events: list | None, members: list[list[int]] | None) -> list[float]:
        """Run every task (micro-batch i, chunk c): a device that is free takes, of its
        tasks ready by then, the one of highest priority (module doc). Tasks are numbered
        in priority order (`_Work`: micro-batch, then position), so that is the lowest
        number. Tasks start in time order over all devices, so a task's inputs are
        known when its device chooses. Updates links_free and busy; returns when each
        device is idle again."""
        latency, per_byte = self._latency_ms, self._ms_per_byte
        cdev, run, first, targets, sizes = work.device, work.run, work.first, work.targets, work.sizes
        chunk_at = work.chunk
        n, n_dev = len(cdev), len(free)
        start = max(free)
        pending = work.waiting * m
        ready = [start] * (n * m)
        arrivals: list[list] = [[] for _ in range(n_dev)]  # per device: (ready time, task), not yet taken in
        queued: list[list[int]] = [[] for _ in range(n_dev)]  # per device: tasks ready by the time it is free
        for task in range(n * m):  # in number order, so each list is a heap
            if not pending[task % n]:
                arrivals[cdev[task % n]].append((start, task))
        record = events is not None
        push, pop = heappush, heappop
        for _ in range(n * m):
            d, s = -1, math.inf
            for e in range(n_dev):  # the device that starts a task next, and when
                if queued[e]:
                    at = free[e]
                elif arrivals[e]:
                    at = arrivals[e][0][0]
                    if free[e] > at:
                        at = free[e]
                else:
                    continue
                if at < s:
                    d, s = e, at
            arrived, waiting = arrivals[d], queued[d]
            while arrived and arrived[0][0] <= s:
                push(waiting, pop(arrived)[1])
            task = pop(waiting)
            c = task % n
            t = free[d] = s + run[c]
            busy[d] += t - s
            if record:
                chunk, i = chunk_at[c], (m - 1 - task // n if backward else task // n)
                self._task_events(events, d, "bwd" if backward else "fwd", chunk, i, members[chunk], s, backward, m)
            base = task - c
            for j in range(first[c], first[c + 1]):
                w = targets[j]
                e = cdev[w]
                if e == d:
                    arrival = t
                else:  # over the link d -> e, after what is already queued on it
                    link_free = links_free[d]
                    at = link_free[e]
                    if t > at:
                        at = t
                    arrival = link_free[e] = at + latency[d][e] + sizes[j] * per_byte[d][e]
                    if record:
                        other = chunk_at[w]
                        self._event(events, d, "xfer", f"{self._names[d]}->{self._names[e]}", at, arrival,
                                    groups=(self._group(members[chunk][0]), self._group(members[other][0])),
                                    phase="bwd" if backward else "fwd", microbatch=i)
                k = base + w
                if arrival > ready[k]:
                    ready[k] = arrival
                left = pending[k] = pending[k] - 1
                if not left:
                    push(arrivals[e], (ready[k], k))
        return free

    def _group(self, atom: int) -> int:
        return self._atom_group[atom]

    def _task_events(self, events: list, d: int, kind: str, c: int, i: int, atoms: list[int], start: float,
                     backward: bool, m: int) -> None:
        """One event per group of a chunk; the dispatch overhead shows as part of the first."""
        cost = self._bwd if backward else self._fwd
        factor = float(self.compute_factors(m)[d]) if m > 1 else 1.0
        t = start + self.calibration.chunk_overhead_ms
        for k, a in enumerate(reversed(atoms) if backward else atoms):
            begin, t = t, t + float(cost[a, d]) * factor
            g = self._atom_group[a]
            self._event(events, d, kind, self._names_of_groups[g], start if k == 0 else begin, t, group=g, chunk=c,
                        microbatch=i)

    def _event(self, events: list, device: int, kind: str, label: str, start: float, end: float, **extra) -> None:
        events.append({"device": self._names[device], "kind": kind, "label": label,
                       "start_ms": start, "end_ms": end, **extra})


class _Work(NamedTuple):
    """One pass's chunks in priority order (position c: the chunk run c-th of those
    ready at once, `chunk[c]`): `device[c]`, `run[c]` (ms, dispatch included), and whom
    it hands on to, as flat lists (no list per chunk): positions targets[j] with
    sizes[j] bytes for j in range(first[c], first[c + 1]), in priority order;
    `waiting[c]`: how many chunks hand on to c."""

    chunk: list[int]
    device: list[int]
    run: list[float]
    first: list[int]
    targets: list[int]
    sizes: list[float]
    waiting: list[int]


def _work(order: list[int], device: np.ndarray, run: np.ndarray, sources: np.ndarray, targets: np.ndarray,
          sizes: np.ndarray) -> _Work:
    """One pass's _Work: chunks in `order` (graphs.schedule.pass_order), chunk
    sources[j] handing on to targets[j] (the chunk graph's pairs, reversed for the
    backward pass) with sizes[j] bytes."""
    n = len(order)
    position = np.empty(n, dtype=np.intp)
    position[order] = np.arange(n)
    src, dst = position[sources], position[targets]
    by = np.lexsort((dst, src))
    return _Work(order, device[order].tolist(), run[order].tolist(),
                 [0, *np.cumsum(np.bincount(src, minlength=n)).tolist()], dst[by].tolist(), sizes[by].tolist(),
                 np.bincount(dst, minlength=n).tolist())


def _members(chunk_of: list[int], n_chunks: int) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(n_chunks)]
    for a, c in enumerate(chunk_of):
        members[c].append(a)
    return members
