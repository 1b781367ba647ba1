"""List scheduling: place groups as a simulated schedule unfolds (Baechi's m-ETF and
m-SCT). Both run one scheduler; SCT adds "favourite children" chosen by an LP.

The schedule's model of a step: a group's cost is its whole step time on a device
(forward, backward, optimizer), and an edge between devices costs two transfers
over the cluster's link, the activation forward and its gradient back.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from placer.baselines.common import capacities, colocation_units, step_ms
from placer.baselines.repair import repair
from graphs.errors import PlacerError
from graphs.problem import Placement, PlacementProblem


def etf(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Earliest-time-first list scheduling with communication and memory (m-ETF).

    Repeatedly take, among the groups whose predecessors are all scheduled and the
    devices with room for them, the (group, device) pair that can start earliest: a
    group starts when the device is free and all its inputs have arrived. Ties go
    first to the group with fewer devices open to it (a colocated group bound to its
    unit's device should not lose that device to one that could go elsewhere), then
    to the earlier finish. Deterministic: the seed is unused."""
    return repair(problem, _list_schedule(problem, favourite_child=np.full(problem.n_groups, -1)))


def sct(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Small-communication-time list scheduling (Hanen-Munier's SCT, Baechi's m-SCT).

    An LP relaxation picks each group's favourite child: the one successor that
    should run right after it on the same device to save a transfer. The schedule
    is ETF's, except that when a group's favourite child becomes ready while the
    group is still the last one on its device, the child goes there at once (if it
    fits). Deterministic: the seed is unused."""
    return repair(problem, _list_schedule(problem, favourite_child=_favourite_children(problem)))


def _list_schedule(problem: PlacementProblem, favourite_child: np.ndarray) -> np.ndarray:
    """Group -> device, scheduling as described in etf/sct.

    Memory: a colocation unit's memory is reserved on the device its first scheduled
    group takes, and its other groups follow it there. A group that fits nowhere goes
    where most room is left, and the caller's repair moves it (or reports that
    nothing fits)."""
    n, k = problem.n_groups, problem.n_devices
    times = step_ms(problem)
    units = colocation_units(problem)
    unit_memory = units.total(problem.costs.memory_bytes)
    caps = capacities(problem)
    latency_ms, ms_per_byte = _link_costs(problem)

    inputs: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for (src, dst), nbytes in zip(problem.costs.edges, problem.costs.edge_bytes):
        inputs[dst].append((int(src), float(nbytes)))
    waiting_on = np.array([len(i) for i in inputs])
    successors = [list(problem.groups.successors(g)) for g in range(n)]

    device = np.full(n, -1, dtype=np.int64)
    unit_device = np.full(len(units), -1, dtype=np.int64)
    finish = np.zeros(n)
    free_at = np.zeros(k)  # when each device finishes its last scheduled group
    last_on = np.full(k, -1)  # the last group scheduled on each device
    load = np.zeros(k)
    arrival = np.zeros((n, k))  # when all of a ready group's inputs can be on each device
    ready = [g for g in range(n) if waiting_on[g] == 0]
    while ready:
        candidates = np.array(ready)
        start = np.maximum(arrival[candidates], free_at[None, :])
        done = start + times[candidates]
        allowed = _allowed_devices(candidates, units.of_group, unit_device, unit_memory, load, caps)
        urgent = np.zeros_like(allowed)
        followed = last_on >= 0
        urgent[:, followed] = favourite_child[last_on[followed]][None, :] == candidates[:, None]
        urgent &= allowed
        start[~(urgent if urgent.any() else allowed)] = np.inf
        choices = np.broadcast_to(allowed.sum(axis=1, keepdims=True), start.shape)
        best = np.lexsort((done.ravel(), choices.ravel(), start.ravel()))[0]
        g, d = int(candidates[best // k]), int(best % k)

        u = units.of_group[g]
        if unit_device[u] < 0:
            unit_device[u] = d
            load[d] += unit_memory[u]
        device[g], finish[g], last_on[d] = d, done[best // k, d], g
        free_at[d] = finish[g]
        ready.remove(g)
        for s in successors[g]:
            waiting_on[s] -= 1
            if waiting_on[s] == 0:
                arrival[s] = _arrival(inputs[s], device, finish, latency_ms, ms_per_byte)
                ready.append(s)
    return device


def _favourite_children(problem: PlacementProblem) -> np.ndarray:
    """[groups] each group's favourite child, or -1: Hanen and Munier's LP relaxation.

    Variables: start times s, one x per edge in [0, 1] (1: the edge pays its transfer),
    and the makespan w. Minimize w subject to s_j >= s_i + p_i + c_ij x_ij per edge,
    w >= s_i + p_i, and at most one edge out of (and into) each group left free:
    sum of x over a group's out-edges >= out-degree - 1 (likewise in-edges). An edge
    with x < 1/2 makes its head the favourite child of its tail; the constraints allow
    at most one per group either way. Costs: a group's fastest step time and an
    edge's mean transfer time over the cluster's links."""
    n = problem.n_groups
    edges, nbytes = problem.costs.edges, problem.costs.edge_bytes
    m = len(edges)
    favourite = np.full(n, -1)
    if m == 0 or problem.n_devices == 1:
        return favourite
    p = step_ms(problem).min(axis=1)
    latency_ms, ms_per_byte = _link_costs(problem)
    apart = ~np.eye(problem.n_devices, dtype=bool)
    transfer = latency_ms[apart].mean() + nbytes * ms_per_byte[apart].mean()

    s, x, w = np.arange(n), n + np.arange(m), n + m  # column of each variable
    e = np.arange(m)
    tail, head = edges[:, 0], edges[:, 1]
    rows = [  # each block: (row ids, column ids, coefficients), rows of A_ub x <= b_ub
        (e, tail, np.ones(m)), (e, head, -np.ones(m)), (e, x, transfer),  # s_i - s_j + c x <= -p_i
        (m + s, s, np.ones(n)), (m + s, np.full(n, w), -np.ones(n)),  # s_i - w <= -p_i
        (m + n + tail, x, -np.ones(m)),  # -sum x over out-edges <= 1 - out-degree
        (m + 2 * n + head, x, -np.ones(m)),  # -sum x over in-edges <= 1 - in-degree
    ]
    r, c, v = (np.concatenate(parts) for parts in zip(*rows))
    a_ub = sp.csr_array((v, (r, c)), shape=(m + 3 * n, n + m + 1))
    out_degree = np.bincount(tail, minlength=n)
    in_degree = np.bincount(head, minlength=n)
    b_ub = np.concatenate([-p[tail], -p, 1.0 - np.maximum(out_degree, 1), 1.0 - np.maximum(in_degree, 1)])
    cost = np.zeros(n + m + 1)
    cost[w] = 1.0
    bounds = [(0, None)] * n + [(0, 1)] * m + [(0, None)]
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if not result.success:  # the LP is always feasible and bounded; failing is a bug, not a user error
        raise PlacerError(f"the SCT linear program failed: {result.message}")
    free = result.x[x] < 0.5
    favourite[tail[free]] = head[free]
    return favourite


def _link_costs(problem: PlacementProblem) -> tuple[np.ndarray, np.ndarray]:
    """[devices, devices] latency (ms) and ms per byte of each link, both ways (an
    activation forward, its gradient back); zero on the diagonal."""
    k = problem.n_devices
    latency, per_byte = np.zeros((k, k)), np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            if a != b:
                link = problem.cluster.link(a, b)
                latency[a, b], per_byte[a, b] = 2 * link.latency_s * 1e3, 2 * 1e3 / link.bandwidth_Bps
    return latency, per_byte


def _arrival(inputs: list[tuple[int, float]], device: np.ndarray, finish: np.ndarray,
             latency_ms: np.ndarray, ms_per_byte: np.ndarray) -> np.ndarray:
    arrival = np.zeros(latency_ms.shape[0])
    for src, nbytes in inputs:
        d = device[src]
        arrival = np.maximum(arrival, finish[src] + latency_ms[d] + nbytes * ms_per_byte[d])
    return arrival


def _allowed_devices(candidates: np.ndarray, of_group: np.ndarray, unit_device: np.ndarray, unit_memory: np.ndarray,
                     load: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """[candidates, devices] where each ready group may go: its unit's device if the
    unit is already placed, else any device with room for the whole unit, else (none
    has room) the device with the most room."""
    units = of_group[candidates]
    placed = unit_device[units]
    allowed = unit_memory[units, None] <= (caps - load)[None, :]
    allowed[~allowed.any(axis=1), int(np.argmax(caps - load))] = True
    allowed[placed >= 0] = False
    allowed[np.flatnonzero(placed >= 0), placed[placed >= 0]] = True
    return allowed
