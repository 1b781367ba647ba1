"""Make any group -> device assignment valid: colocation kept and memory within caps,
moving as little as it can. Every baseline that does not build validity in from the
start ends with `repair`.

Acyclicity of the device-level chunk graph is *not* repaired: the runtime runs any
assignment correctly, because its chunks are runs of groups in topological order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from placer.baselines.common import (Units, capacities, colocation_units, require_fit, step_ms,
                                     unit_traffic)
from graphs.devices import format_size
from graphs.errors import InfeasibleError
from graphs.problem import Placement, PlacementProblem


def repair(problem: PlacementProblem, placement: Sequence[int]) -> Placement:
    """Return `placement` made valid, or raise InfeasibleError when no placement fits.

    1. Colocation: each colocation unit moves to the device that already runs most of
       its compute, if the whole unit fits there (else the next such device, else the
       one with the most room).
    2. Memory: while a device is over its cap, move one unit off it: the one whose
       move adds the least cross-device traffic per byte freed, to the device that
       takes it with the least added traffic (ties: the most room left).
    3. If such moves cannot empty an over-full device, pack all units afresh, largest
       first, each on its current device if it fits, else where most room is left.
    """
    units = colocation_units(problem)
    require_fit(problem, units)
    caps = capacities(problem)
    unit_memory = units.total(problem.costs.memory_bytes)
    on = _keep_colocation(problem, units, np.asarray(placement, dtype=np.int64), caps, unit_memory)
    if np.any(_load(on, unit_memory, len(caps)) > caps):
        on = _relieve_memory(problem, units, on, caps, unit_memory)
    return problem.check(on[units.of_group])


def _load(on: np.ndarray, unit_memory: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(on, weights=unit_memory, minlength=k)


def _keep_colocation(problem: PlacementProblem, units: Units, placement: np.ndarray, caps: np.ndarray,
                     unit_memory: np.ndarray) -> np.ndarray:
    """Unit -> device, from a group -> device placement that may split units."""
    k = problem.n_devices
    memory = problem.costs.memory_bytes
    load = np.bincount(placement, weights=memory, minlength=k)
    on = placement[[m[0] for m in units.members]]
    compute = step_ms(problem)[np.arange(problem.n_groups), placement]
    for u, members in enumerate(units.members):
        if len(members) == 1:
            continue
        here = np.bincount(placement[members], weights=compute[members], minlength=k)
        load -= np.bincount(placement[members], weights=memory[members], minlength=k)
        room = caps - load
        preference = np.lexsort((-room, -here))  # most of the unit's compute, then most room
        fitting = [d for d in preference if unit_memory[u] <= room[d]]
        on[u] = fitting[0] if fitting else preference[0]
        load[on[u]] += unit_memory[u]
    return on


def _relieve_memory(problem: PlacementProblem, units: Units, on: np.ndarray, caps: np.ndarray,
                    unit_memory: np.ndarray) -> np.ndarray:
    k = problem.n_devices
    traffic = unit_traffic(problem, units)  # [units, units] bytes, symmetric
    to_device = traffic @ np.eye(k)[on]  # [units, devices] bytes between a unit and each device
    load = _load(on, unit_memory, k)
    while np.any(load > caps):
        d = int(np.flatnonzero(load > caps)[0])
        movable = np.flatnonzero((on == d) & (unit_memory > 0))
        room = caps - load
        fits = unit_memory[movable, None] <= room[None, :]
        fits[:, d] = False
        if not fits.any():
            return _pack(problem, units, on, caps, unit_memory)
        added = (to_device[movable, d][:, None] - to_device[movable, :]) / unit_memory[movable, None]
        added[~fits] = np.inf
        best = np.lexsort((-np.broadcast_to(room, added.shape).ravel(), added.ravel()))[0]
        u, target = int(movable[best // k]), int(best % k)
        on[u] = target
        load[d] -= unit_memory[u]
        load[target] += unit_memory[u]
        column = traffic[[u], :].toarray().ravel()  # symmetric: row u is column u
        to_device[:, d] -= column
        to_device[:, target] += column
    return on


def _pack(problem: PlacementProblem, units: Units, on: np.ndarray, caps: np.ndarray,
          unit_memory: np.ndarray) -> np.ndarray:
    """Largest units first, each staying put if it fits, else where most room is left."""
    load = np.zeros(len(caps))
    packed = on.copy()
    for u in np.argsort(-unit_memory, kind="stable"):
        room = caps - load
        if unit_memory[u] > room[on[u]]:
            packed[u] = int(np.argmax(room))
            if unit_memory[u] > room[packed[u]]:
                raise InfeasibleError(f"found no way to fit the model's {format_size(unit_memory.sum())} on devices "
                                      f"{problem.cluster.spec()} under their memory caps")
        load[packed[u]] += unit_memory[u]
    return packed
