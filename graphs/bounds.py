"""Lower bounds on a training step's time for any placement (DESIGN.md).

No placement beats max(critical path, total work / devices), both from the profiled
fwd+bwd cost of each group on the fastest device kind of the cluster: the forward
and backward of a dependency chain cannot overlap, and n devices cannot do the work
faster than n-fold in parallel. Transfers and the optimizer step are left out, so
the bound stays valid for every cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx


@dataclass(frozen=True)
class LowerBound:
    critical_path_ms: float  # heaviest dependency chain of groups
    work_ms: float  # total compute / number of devices
    bound_ms: float  # max of the two


def group_compute_ms(groups: nx.DiGraph, device_kinds: Sequence[str]) -> dict[int, float]:
    """Per group its fwd+bwd ms on the fastest kind among `device_kinds` that it was profiled on."""
    kinds = set(device_kinds)
    cost = {}
    for g, data in groups.nodes(data=True):
        options = [data["fwd_ms"][k] + data["bwd_ms"][k] for k in data["fwd_ms"] if k in kinds]
        if not options:
            raise ValueError(f"group {data.get('name', g)} was profiled on {sorted(data['fwd_ms'])}, "
                             f"none of the cluster's kinds {sorted(kinds)}")
        cost[g] = min(options)
    return cost


def lower_bound(groups: nx.DiGraph, device_kinds: Sequence[str]) -> LowerBound:
    """The lower bound for placing `groups` on a cluster with one entry in
    `device_kinds` per device (e.g. ["cuda", "cuda", "cpu"])."""
    if not device_kinds:
        raise ValueError("a cluster needs at least one device")
    cost = group_compute_ms(groups, device_kinds)
    longest: dict[int, float] = {}  # heaviest chain ending at each group, the group included
    for g in nx.topological_sort(groups):
        longest[g] = cost[g] + max((longest[p] for p in groups.predecessors(g)), default=0.0)
    critical = max(longest.values(), default=0.0)
    work = sum(cost.values()) / len(device_kinds)
    return LowerBound(critical_path_ms=critical, work_ms=work, bound_ms=max(critical, work))
