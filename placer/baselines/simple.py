"""The placements people write by hand or get from today's tools: one device, round
robin, fill-in-order, contiguous balanced blocks, and the workload's expert rule."""

from __future__ import annotations

import itertools
from collections import Counter

import networkx as nx
import numpy as np

from graphs.devices import format_size
from graphs.workload import first_line
from placer.baselines.common import (capacities, colocation_units, contiguous_split, device_speed,
                                     fastest, step_ms)
from placer.baselines.repair import repair
from graphs.errors import InfeasibleError, WorkloadError
from graphs.problem import Placement, PlacementProblem


def single(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Everything on the fastest device (least total step time) whose memory holds
    the whole model."""
    need = problem.costs.memory_bytes.sum()
    caps = capacities(problem)
    for d in np.argsort(step_ms(problem).sum(axis=0), kind="stable"):
        if need <= caps[d]:
            return (int(d),) * problem.n_groups
    largest = int(np.argmax(caps))
    raise InfeasibleError(f"no single device holds the whole model ({format_size(need)}); the largest, "
                          f"{problem.cluster.devices[largest].name}, holds {format_size(caps[largest])}")


def round_robin(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Groups dealt over the devices in topological order, then repaired."""
    return repair(problem, np.arange(problem.n_groups) % problem.n_devices)


def sequential_fill(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Fill the devices in their listed order, each until the next group no longer
    fits (accelerate's sequential device_map, Baechi's m-TOPO): the placement most
    users get today. With no memory caps the first device never fills, so the whole
    model lands on it; that is faithful to what those tools do. What the last device
    cannot hold is moved by the repair pass to wherever room is left (accelerate
    would offload it to the CPU or disk)."""
    units = colocation_units(problem)
    caps = capacities(problem)
    need = units.total(problem.costs.memory_bytes)
    on = np.empty(len(units), dtype=np.int64)
    device, used = 0, 0.0
    for u in range(len(units)):  # units are in topological order of their first group
        while device < problem.n_devices - 1 and used + need[u] > caps[device]:
            device, used = device + 1, 0.0
        on[u] = device
        used += need[u]
    return repair(problem, on[units.of_group])


def balanced(problem: PlacementProblem, seed: int = 0) -> Placement:
    """Contiguous blocks of groups in topological order, one block per device, cut so
    that the slowest block is as fast as possible under the memory caps (GPipe /
    torchgpipe balance_by_time, with each device's own profiled times).

    On mixed devices the order in which blocks meet devices matters, so several
    orders are tried and the simulator picks the fastest. If no
    contiguous split fits the caps, the time-balanced split is repaired instead."""
    times = step_ms(problem)
    memory = problem.costs.memory_bytes
    caps = capacities(problem)
    candidates = []
    for order in _device_orders(problem):
        blocks = contiguous_split(times[:, order], memory, caps[order])
        if blocks is not None:
            candidates.append(repair(problem, np.array(order)[blocks]))  # colocation may cut across blocks
    if not candidates:
        order = _device_orders(problem)[0]
        blocks = contiguous_split(times[:, order], memory, np.full(len(order), np.inf))
        candidates.append(repair(problem, np.array(order)[blocks]))
    return fastest(problem, candidates)


def _device_orders(problem: PlacementProblem) -> list[list[int]]:
    """Orders in which contiguous blocks may meet the devices: just the listed order
    when all devices are alike; otherwise also fastest-first, and every order for up
    to three devices."""
    k = problem.n_devices
    alike = len({(d.kind, d.memory_bytes) for d in problem.cluster.devices}) == 1
    if alike:
        return [list(range(k))]
    orders = [list(range(k)), [int(d) for d in np.argsort(-device_speed(problem), kind="stable")]]
    if k <= 3:
        orders += [list(p) for p in itertools.permutations(range(k))]
    return [list(o) for o in dict.fromkeys(map(tuple, orders))]


def expert(problem: PlacementProblem, seed: int = 0) -> Placement:
    """The hand placement a practitioner would write.

    With the workload's expert rule (problem.expert: module path, n_devices -> device
    or None; the zoo's are the paper's: each LSTM layer on its own device, inception's
    towers side by side), each group goes where the rule puts most of its ops' owning
    modules (or its own name); groups the rule leaves out sit beside their first
    predecessor (device 0 for sources). Without a rule: the graph's depth levels are
    cut into contiguous bands of roughly equal compute, one band per device."""
    if problem.expert is None:
        return _split_by_depth(problem)
    asked: dict[str, int | None] = {}

    def ask(path: str) -> int | None:
        if path not in asked:
            asked[path] = _ask_expert(problem, path)
        return asked[path]

    placement = np.zeros(problem.n_groups, dtype=np.int64)
    for g in range(problem.n_groups):  # topological order: predecessors come first
        data = problem.groups.nodes[g]
        votes = Counter(d for d in map(ask, _owning_modules(problem, data["members"])) if d is not None)
        if votes:
            placement[g] = votes.most_common(1)[0][0]
        elif (d := ask(data["name"])) is not None:
            placement[g] = d
        else:
            preds = sorted(problem.groups.predecessors(g))
            placement[g] = placement[preds[0]] if preds else 0
    return repair(problem, placement)


def _ask_expert(problem: PlacementProblem, path: str) -> int | None:
    """The device the workload's rule gives `path`. The rule is user code: whatever
    goes wrong in it is a WorkloadError naming the workload, the rule and the path."""
    k = problem.n_devices
    call = f"{problem.workload or 'the workload'}: expert_placement({path!r}, {k})"
    try:
        d = problem.expert(path, k)
    except Exception as exc:
        raise WorkloadError(f"{call} raised {type(exc).__name__}: {first_line(exc)}") from exc
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise WorkloadError(f"{call} returned a {type(d).__name__}; it must return a device index (int) or None")
    if not 0 <= d < k:
        raise WorkloadError(f"{call} returned device {d}, but there are only {k} devices (0..{k - 1})")
    return int(d)


def _owning_modules(problem: PlacementProblem, members: list[str]) -> list[str]:
    if problem.ops is None:
        return []
    return [problem.ops.nodes[m]["module"] for m in members if m in problem.ops and problem.ops.nodes[m].get("module")]


def _split_by_depth(problem: PlacementProblem) -> Placement:
    level = np.zeros(problem.n_groups, dtype=np.int64)
    for depth, groups in enumerate(nx.topological_generations(problem.groups)):
        level[list(groups)] = depth
    levels = int(level.max(initial=-1)) + 1
    times = step_ms(problem)
    level_times = np.stack([np.bincount(level, weights=times[:, d], minlength=levels)
                            for d in range(problem.n_devices)], axis=1)
    bands = contiguous_split(level_times, np.zeros(levels), np.full(problem.n_devices, np.inf))
    return repair(problem, bands[level])

