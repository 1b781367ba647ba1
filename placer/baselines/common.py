"""What every baseline shares: a group's step cost, device speed and capacity,
colocation units, contiguous balanced splitting, and ranking candidates.

Costs here are whole training-step costs (forward + backward + optimizer step) on
each device, because that is what a device spends on a group per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from envs.sim import Simulator
from graphs.devices import format_size
from graphs.errors import InfeasibleError
from graphs.problem import Placement, PlacementProblem


def step_ms(problem: PlacementProblem) -> np.ndarray:
    """[groups, devices] ms a device spends on a group per training step."""
    c = problem.costs
    return c.fwd_ms + c.bwd_ms + c.opt_ms


def device_speed(problem: PlacementProblem) -> np.ndarray:
    """[devices] relative speed, summing to 1: the inverse of the whole model's step
    time on each device (so a GPU that runs the model 10x faster gets 10x the share)."""
    inverse = 1.0 / np.maximum(step_ms(problem).sum(axis=0), 1e-12)
    return inverse / inverse.sum()


def capacities(problem: PlacementProblem) -> np.ndarray:
    """[devices] memory caps in bytes; inf where the user set none."""
    return np.array([np.inf if d.memory_bytes is None else float(d.memory_bytes) for d in problem.cluster.devices])


def bottleneck_ms(problem: PlacementProblem, placement: Sequence[int]) -> float:
    """The busiest device's compute per step: what balancing methods minimize."""
    p = np.asarray(placement)
    busy = np.bincount(p, weights=step_ms(problem)[np.arange(problem.n_groups), p], minlength=problem.n_devices)
    return float(busy.max(initial=0.0))


@dataclass(frozen=True)
class Units:
    """Groups that must share a device, as a partition of all groups: overlapping
    colocation sets merge into one unit, every other group is a unit of its own.
    Units are numbered in the topological order of their first group."""

    of_group: np.ndarray  # [groups] unit id of each group
    members: list[list[int]]  # unit id -> its groups, ascending

    def __len__(self) -> int:
        return len(self.members)

    def total(self, per_group: np.ndarray) -> np.ndarray:
        """Sum a per-group quantity over each unit."""
        return np.bincount(self.of_group, weights=per_group, minlength=len(self))


def colocation_units(problem: PlacementProblem) -> Units:
    by_leader: dict[int, list[int]] = {}
    for g, leader in enumerate(problem.colocation_leader):
        by_leader.setdefault(leader, []).append(g)
    members = sorted(by_leader.values(), key=lambda m: m[0])
    of_group = np.empty(problem.n_groups, dtype=np.int64)
    for u, groups in enumerate(members):
        of_group[groups] = u
    return Units(of_group=of_group, members=members)


def unit_traffic(problem: PlacementProblem, units: Units) -> sp.csr_array:
    """[units, units] bytes exchanged per step between units: symmetric (both
    directions summed), nothing on the diagonal."""
    c = problem.costs
    a, b = units.of_group[c.edges[:, 0]], units.of_group[c.edges[:, 1]]
    apart = a != b
    rows = np.concatenate([a[apart], b[apart]])
    cols = np.concatenate([b[apart], a[apart]])
    data = np.concatenate([c.edge_bytes[apart], c.edge_bytes[apart]])
    return sp.csr_array((data, (rows, cols)), shape=(len(units), len(units)))  # duplicates add up


def require_fit(problem: PlacementProblem, units: Units) -> None:
    """Raise InfeasibleError when no placement at all can fit the caps: a unit larger
    than the largest device, or more memory in all than the devices hold together."""
    caps = capacities(problem)
    need = units.total(problem.costs.memory_bytes)
    largest = int(np.argmax(caps))
    if need.size and need.max() > caps[largest]:
        u = int(np.argmax(need))
        names = ", ".join(problem.groups.nodes[g]["name"] for g in units.members[u])
        raise InfeasibleError(f"group(s) {names} need {format_size(need[u])} but the largest device, "
                              f"{problem.cluster.devices[largest].name}, holds {format_size(caps[largest])}")
    if need.sum() > caps.sum():
        raise InfeasibleError(f"the model needs {format_size(need.sum())} but the devices "
                              f"({problem.cluster.spec()}) hold {format_size(caps.sum())} in all")


def contiguous_split(times: np.ndarray, memory: np.ndarray, caps: np.ndarray) -> np.ndarray | None:
    """Cut a sequence of items into consecutive blocks, block j on device j, so that
    the slowest block is as fast as it can be (torchgpipe's balance_by_time, with
    per-device times and memory caps).

    times: [items, devices] ms of each item on each device, in block order;
    memory: [items] bytes; caps: [devices] bytes. Returns each item's block index, or
    None when no contiguous split fits the caps. Bisects on the bottleneck time; for a
    given bottleneck, greedily giving each device the longest prefix that fits is
    optimal, because a longer prefix never leaves the later devices more to do.
    """
    n, k = times.shape
    cum_t = np.vstack([np.zeros(k), np.cumsum(times, axis=0)])
    cum_m = np.concatenate([[0.0], np.cumsum(memory)])

    def cuts(limit: float) -> list[int] | None:
        ends, start = [], 0
        for j in range(k):
            by_time = np.searchsorted(cum_t[:, j], cum_t[start, j] + limit, side="right") - 1
            by_memory = np.searchsorted(cum_m, cum_m[start] + caps[j], side="right") - 1
            start = max(start, int(min(by_time, by_memory)))
            ends.append(start)
        return ends if start == n else None

    if cuts(np.inf) is None:
        return None
    lo, hi = 0.0, float(times.max(axis=1).sum()) + 1e-9
    for _ in range(60):  # relative precision far below any profiling noise
        mid = (lo + hi) / 2
        if cuts(mid) is None:
            lo = mid
        else:
            hi = mid
    return np.searchsorted(np.array(cuts(hi)), np.arange(n), side="right")


def fastest(problem: PlacementProblem, candidates: Sequence[Placement]) -> Placement:
    """The candidate with the least simulated step time (envs.sim, nominal calibration)."""
    if len(candidates) == 1:
        return candidates[0]
    simulator = Simulator(problem)
    return min(candidates, key=lambda p: simulator.simulate(p).step_ms)
