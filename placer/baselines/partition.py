"""Graph partitioners: k-way METIS (pymetis) and recursive Kernighan-Lin bisection
(networkx), both cutting as few bytes as they can while balancing compute by
device speed.

Both partition the *unit* graph: each colocation unit is contracted to one vertex,
so no partition ever splits groups that share parameters. Vertex weight is a unit's
step time on its fastest device; edge weight is the bytes exchanged either way.
The partition is not made acyclic: the runtime runs any assignment correctly,
because its chunks are runs of groups in topological order. Only memory caps are
repaired afterwards (placer.baselines.repair).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pymetis
from networkx.algorithms.community import kernighan_lin_bisection

from placer.baselines.common import Units, colocation_units, device_speed, step_ms, unit_traffic
from placer.baselines.repair import repair
from graphs.problem import Placement, PlacementProblem

# METIS takes integer weights; these ranges keep ratios to ~1e-6 without overflowing
# its 32-bit sums on graphs of many thousands of vertices.
_VERTEX_SCALE = 10**6  # total vertex weight
_EDGE_SCALE = 10**5  # heaviest edge


def metis(problem: PlacementProblem, seed: int = 0) -> Placement:
    """k-way METIS partition, part i's target share of compute proportional to device
    i's speed (tpwgts), default (non-contiguous) partitioning, then memory repair."""
    units = colocation_units(problem)
    if problem.n_devices == 1:
        return repair(problem, np.zeros(problem.n_groups, dtype=np.int64))
    weight = _unit_weight(problem, units)
    traffic = unit_traffic(problem, units)
    vweights = np.maximum(1, np.rint(weight / max(weight.sum(), 1e-12) * _VERTEX_SCALE)).astype(np.int64)
    eweights = np.maximum(1, np.rint(traffic.data / max(traffic.data.max(initial=0), 1e-12) * _EDGE_SCALE))
    share = device_speed(problem)
    result = pymetis.part_graph(
        problem.n_devices,
        adjacency=pymetis.CSRAdjacency(traffic.indptr.tolist(), traffic.indices.tolist()),
        vweights=vweights.tolist(),
        eweights=eweights.astype(np.int64).tolist() if traffic.nnz else None,
        tpwgts=(share / share.sum()).tolist(),
        options=pymetis.Options(seed=seed),
    )
    on = np.asarray(result.vertex_part, dtype=np.int64)
    return repair(problem, on[units.of_group])


def kernighan_lin(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Recursive Kernighan-Lin bisection into one part per device.

    A set of parts for devices D is cut in two for the first and second halves of D,
    starting from the topological-order cut that gives each half its speed's share
    of compute; networkx's Kernighan-Lin then swaps vertex pairs to lower the bytes
    cut (keeping the two sides' sizes, so the starting cut sets the balance). Any
    number of devices works, not only powers of two."""
    units = colocation_units(problem)
    weight = _unit_weight(problem, units)
    graph = nx.from_scipy_sparse_array(unit_traffic(problem, units))
    speed = device_speed(problem)
    on = np.zeros(len(units), dtype=np.int64)
    pending = [(list(range(len(units))), list(range(problem.n_devices)))]
    while pending:
        part, devices = pending.pop()
        if len(devices) == 1 or len(part) < 2:
            on[part] = devices[0]
            continue
        first, second = devices[: len(devices) // 2], devices[len(devices) // 2:]
        a, b = _bisect(graph.subgraph(part), part, weight, speed[first].sum() / speed[devices].sum(), seed)
        pending += [(a, first), (b, second)]
    return repair(problem, on[units.of_group])


def _bisect(graph: nx.Graph, part: list[int], weight: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split `part` (ascending unit ids: topological order) so that the first side
    holds about `fraction` of its weight, then refine the cut with Kernighan-Lin."""
    cumulative = np.cumsum(weight[part])
    cut = int(np.argmin(np.abs(cumulative[:-1] - fraction * cumulative[-1]))) + 1  # both sides non-empty
    start = set(part[:cut])
    a, b = kernighan_lin_bisection(graph, partition=(start, set(part[cut:])), weight="weight", seed=seed)
    # Swaps keep both sides' sizes, but networkx may return the sides in either order.
    if len(a) != len(start) or (len(b) == len(start) and len(b & start) > len(a & start)):
        a, b = b, a
    return sorted(a), sorted(b)


def _unit_weight(problem: PlacementProblem, units: Units) -> np.ndarray:
    return units.total(step_ms(problem).min(axis=1))
