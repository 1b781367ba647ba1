"""Lower bounds on a training step's time: for any placement, and for one candidate.

A bound is only as true as the costs it adds up, so the costs here are the least a
group's forward and backward can take on the cluster (`floor_ms`): its profiled time
on the fastest device kind of the cluster, times the smallest factor any evidence
gives for that kind (`cost_floor`):

- the profile times each op alone and then scales all of them by one factor per kind
  so that they add up to a measured whole step (graph attribute "profile_scale"). A
  factor above 1 (the whole step is slower than its ops alone, hot in cache) is undone:
  a placement whose devices each keep their own ops hot in their own caches can get
  that back. A factor below 1 (timing an op alone paid dispatch that the step does not)
  is kept;
- a calibration's compute scale below 1 (measured placements ran faster than the
  profile says) lowers the costs again;
- the whole step the factor comes from is a median, and the host ran some of its
  samples faster (graph attribute "whole_step_spread": the least sample over the
  median). Every cost is lowered by that ratio too: a step of zoo:transformer:small
  ran 5.96-8.94 ms within one profile, and a bound from the median of three then lay
  20% above steps measured seconds later.

With those costs, for m micro-batches (m = 1: no pipelining), where f(m) is the cost of
a micro-batch's forward and backward at batch/m, times m, over the full batch's
(`microbatch_table`: the profile's whole steps less their optimizer step; 1 for m = 1):

- critical path: one micro-batch's forward and backward along the heaviest chain of
  groups cannot overlap: cp * f(m) / m;
- work: n devices cannot do the work faster than n-fold in parallel, and virtual CPU
  devices no faster than the host has cores: sum * f(m) / min(n, cores);
- per candidate (`candidate_bound`): each device must run its own groups' work for all
  m micro-batches: max over devices of its work * f(m).

Transfers, dispatch and the optimizer step are left out, so every bound stays below
the step any real schedule achieves on the machine as it was profiled. A profile taken
under load holds slow costs, and its bound can exceed a step measured in a quieter
moment (tests/test_bounds.py holds measurements to the least bound of profiles taken
between them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

__all__ = ["LowerBound", "lower_bound", "candidate_bound", "group_compute_ms", "cost_floor", "microbatch_factor",
           "microbatch_table"]


@dataclass(frozen=True)
class LowerBound:
    critical_path_ms: float  # heaviest dependency chain of groups (one micro-batch's, with pipelining)
    work_ms: float  # total compute / parallel devices
    bound_ms: float  # max of the two
    microbatches: int = 1  # the micro-batch count at which the bound is least


def cost_floor(groups: nx.DiGraph, compute_scale: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per device kind, the factor (<= 1) by which its profiled costs may shrink at most
    (module docstring): min(1, 1 / profile scale, calibration compute scale, both
    combined), times the whole step's spread.

    >>> g = nx.DiGraph(profile_scale={"cpu": 2.0}, whole_step_spread={"cpu": 0.5})
    >>> cost_floor(g, {"cpu": 0.9})
    {'cpu': 0.225}
    """
    profiled = dict(groups.graph.get("profile_scale") or {})
    spreads = dict(groups.graph.get("whole_step_spread") or {})
    kinds = set(profiled) | set(spreads) | set(compute_scale or {})
    floor = {}
    for kind in kinds:
        scale = float(profiled.get(kind, 1.0))
        fitted = float((compute_scale or {}).get(kind, 1.0))
        floor[kind] = min(1.0, 1.0 / scale, fitted, fitted / scale) * min(1.0, float(spreads.get(kind, 1.0)))
    return floor


def microbatch_factor(groups: nx.DiGraph, kind: str, m: int) -> float | None:
    """f(m) on `kind`: `microbatch_table`'s m over its 1 (the profile's whole steps less
    their optimizer step: graph attributes "microbatch_step_ms_by_kind", {kind: {m: ms}},
    else "microbatch_step_ms", {m: ms}, for every kind); 1 for m = 1, and 1 (costs linear in
    the batch, as the simulator assumes) when the profile has no such table; None when
    the table lacks m (it could not run at batch/m).

    >>> microbatch_factor(nx.DiGraph(microbatch_step_ms={1: 10.0, 2: 12.0}), "cpu", 2)
    1.2
    >>> microbatch_factor(nx.DiGraph(microbatch_step_ms={1: 10.0, 2: 12.0}), "cpu", 4) is None
    True
    """
    if m == 1:
        return 1.0
    table = microbatch_table(groups, kind)
    if table is None:
        return 1.0
    return table[m] / table[1] if m in table and table.get(1) else None


def microbatch_table(graph: nx.DiGraph, kind: str) -> dict[int, float] | None:
    """{m: m x ms of one micro-batch's forward and backward at batch/m} on `kind`, from the
    profile's whole steps (keys read as ints: JSON makes them strings), or None when the
    graph has none.

    The profile times whole training steps at batch/m, each with its own optimizer step;
    a pipelined step runs the optimizer once, whatever m. So the optimizer step (the sum
    of the nodes' `opt_ms` on the kind that was timed) comes off every step first, never
    below a tenth of it (graphs.profile scales node times likewise): left in, m = 8
    priced zoo:mlp:medium's micro-batches 2.5x the whole batch's compute, where 1.9x ran
    (docs/results.md, "The optimizer step in the micro-batch table").

    A training step at a smaller batch costs no more than one at a larger batch, so a
    step at batch/m is held to at most the cheapest step measured at a larger batch:
    table[m] / m <= table[k] / k for every k < m. A disturbed measurement otherwise
    stands for every plan with that count: nmt-medium's profile once recorded 2,583 ms
    for m = 8 (a step at batch/8 dearer than one at batch/4, 770 / 4 ms), and the
    simulator put its m = 8 plans at 2,400 ms against 1,115-1,305 measured. Lowering a
    cost keeps every bound built on the table a true bound.

    >>> microbatch_table(nx.DiGraph(microbatch_step_ms={"1": 400.0, "4": 800.0, "8": 2600.0}), "cpu")
    {1: 400.0, 4: 800.0, 8: 1600.0}
    >>> g = nx.DiGraph(microbatch_step_ms={1: 120.0, 2: 160.0})
    >>> g.add_node(0, opt_ms={"cpu": 20.0})
    >>> microbatch_table(g, "cpu")
    {1: 100.0, 2: 120.0}
    """
    own = (graph.graph.get("microbatch_step_ms_by_kind") or {}).get(kind)
    table = own or graph.graph.get("microbatch_step_ms")
    if not table:
        return None
    timed_on = kind if own else (graph.graph.get("device_kinds") or [kind])[0]  # the flat table is the first kind's
    optimizer = sum((opt or {}).get(timed_on, 0.0) for _, opt in graph.nodes(data="opt_ms"))
    held: dict[int, float] = {}
    per_step = float("inf")  # the cheapest step so far, at a larger batch
    for m, ms in sorted((int(k), float(v)) for k, v in table.items()):
        ms = max(ms - m * optimizer, 0.1 * ms)
        held[m] = min(ms, m * per_step)
        per_step = min(per_step, ms / m)
    return held


def group_compute_ms(groups: nx.DiGraph, device_kinds: Sequence[str],
                     floor: Mapping[str, float] | None = None) -> dict[int, float]:
    """Per group its least fwd+bwd ms: on the fastest kind among `device_kinds` that it was
    profiled on, each kind's time times floor[kind] (default 1).

    Raises ValueError when a group was profiled on none of the kinds."""
    kinds = set(device_kinds)
    floor = floor or {}
    cost = {}
    for g, data in groups.nodes(data=True):
        options = [(data["fwd_ms"][k] + data["bwd_ms"][k]) * floor.get(k, 1.0) for k in data["fwd_ms"] if k in kinds]
        if not options:
            raise ValueError(f"group {data.get('name', g)} was profiled on {sorted(data['fwd_ms'])}, "
                             f"none of the cluster's kinds {sorted(kinds)}")
        cost[g] = min(options)
    return cost


def lower_bound(groups: nx.DiGraph, device_kinds: Sequence[str], *, floor: Mapping[str, float] | None = None,
                cores: int | None = None, microbatches: Sequence[int] = (1,)) -> LowerBound:
    """The least step time of any placement of `groups` on a cluster with one entry in
    `device_kinds` per device, at any of the `microbatches` counts.

    Parameters
    ----------
    groups : GroupedGraph; nodes carry fwd_ms/bwd_ms {kind: ms}; ids are a topological order.
    device_kinds : one kind per device, e.g. ["cuda", "cuda", "cpu"].
    floor : per kind, the factor its costs may shrink by (cost_floor); default 1.
    cores : the host's cores, when every device is a virtual CPU device sharing them.
    microbatches : the counts a plan may use; counts not profiled on every kind are skipped.

    Returns
    -------
    LowerBound, in ms, at the count whose bound is least.

    Raises
    ------
    ValueError : no device, or a group profiled on none of the kinds.

    Examples
    --------
    >>> g = nx.DiGraph()
    >>> for i, ms in enumerate([2.0, 6.0, 4.0]):
    ...     g.add_node(i, fwd_ms={"cpu": ms / 2}, bwd_ms={"cpu": ms / 2})
    >>> g.add_edges_from([(0, 1), (0, 2)])
    >>> lower_bound(g, ["cpu", "cpu"])
    LowerBound(critical_path_ms=8.0, work_ms=6.0, bound_ms=8.0, microbatches=1)
    """
    if not device_kinds:
        raise ValueError("a cluster needs at least one device")
    cost = group_compute_ms(groups, device_kinds, floor)
    longest: dict[int, float] = {}  # heaviest chain ending at each group, the group included
    for g in nx.topological_sort(groups):
        longest[g] = cost[g] + max((longest[p] for p in groups.predecessors(g)), default=0.0)
    critical = max(longest.values(), default=0.0)
    parallel = len(device_kinds) if cores is None else max(1, min(len(device_kinds), cores))
    work = sum(cost.values()) / parallel
    bounds = []
    for m in dict.fromkeys(microbatches):
        factors = [microbatch_factor(groups, k, m) for k in set(device_kinds)]
        if any(f is None for f in factors):
            continue
        f = min(factors)
        bounds.append(LowerBound(critical * f / m, work * f, max(critical * f / m, work * f), m))
    if not bounds:
        return LowerBound(critical, work, max(critical, work))
    return min(bounds, key=lambda b: (b.bound_ms, b.microbatches))


def candidate_bound(groups: nx.DiGraph, device_kinds: Sequence[str], placement: Sequence[int],
                    microbatches: int = 1, *, floor: Mapping[str, float] | None = None) -> float:
    """The least step time of one candidate (ms): the larger of one micro-batch's
    critical path (lower_bound's) and the busiest device's work for all micro-batches.

    Raises ValueError when `microbatches` was not profiled on a kind the placement uses.

    >>> g = nx.DiGraph()
    >>> for i, ms in enumerate([2.0, 6.0, 4.0]):
    ...     g.add_node(i, fwd_ms={"cpu": ms / 2}, bwd_ms={"cpu": ms / 2})
    >>> g.add_edges_from([(0, 1), (0, 2)])
    >>> candidate_bound(g, ["cpu", "cpu"], [0, 0, 1])
    8.0
    """
    used = sorted({int(d) for d in placement})
    factors = {device_kinds[d]: microbatch_factor(groups, device_kinds[d], microbatches) for d in used}
    missing = [k for k, f in factors.items() if f is None]
    if missing:
        raise ValueError(f"{microbatches} micro-batches were not profiled on {missing[0]}")
    floor = floor or {}
    busy = [0.0] * len(device_kinds)
    for g, data in groups.nodes(data=True):
        kind = device_kinds[placement[g]]
        busy[placement[g]] += (data["fwd_ms"][kind] + data["bwd_ms"][kind]) * floor.get(kind, 1.0) * factors[kind]
    path = lower_bound(groups, [device_kinds[d] for d in used], floor=floor, microbatches=(microbatches,))
    return max(max(busy), path.critical_path_ms)
