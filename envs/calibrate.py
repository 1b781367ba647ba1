"""Fitting the simulator to measured step times, and keeping the fit on disk.

The profiled costs are measured op by op, in isolation; a whole placed step adds
what profiling cannot see: how fast tensors really cross between devices, what a
chunk dispatch costs, how compute slows when devices share a host. A few measured
placements pin these down.

The parameters are the compute scale of each device kind, each link's latency and
time per byte, the chunk overhead and the pipelined slowdown (not the loss time: see
_pack): the simulated step is piecewise linear in all of them, so the fit works on them
directly, bounded below (no negative time, no infinite bandwidth). It is least squares
on log step time (relative errors, so a 5 ms and a 500 ms placement count alike) plus
a weak prior toward the initial values, so that a parameter the measurements cannot
see stays where it was and a handful of measurements is enough.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from graphs.devices import Link
from graphs.files import cache_dir, write_text_atomically
from graphs.problem import Candidate, PlacementProblem
from envs.sim import Calibration, Simulator

MEASUREMENT_SPREAD = 0.05  # relative noise of a measured median step time
PRIOR_SHARE = 0.1  # prior width of a time parameter: a tenth of a typical step (see _prior)
MIN_SCALE = 0.01  # compute is at least 100x cheaper than profiled, never free
SLOWDOWN_PRIOR = 0.5  # prior width of the pipelined slowdown (0.17 fits gpt-medium's pipelined plans here)
MIN_MS_PER_MB = 1e-6  # bandwidth at most 1 PB/s: finite, so that it converts back
MS_PER_MB = 1e9  # bandwidth_Bps = MS_PER_MB / (ms per megabyte)
MAX_NAME = 120  # characters of a calibration file's name before its tail is hashed


def _link_keys(problem: PlacementProblem) -> list[frozenset[str]]:
    """The kind pairs of the links this cluster's devices can use."""
    kinds = [d.kind for d in problem.cluster.devices]
    keys = {frozenset({a, b}) for i, a in enumerate(kinds) for j, b in enumerate(kinds) if i != j}
    return sorted(keys, key=sorted)


def _pack(calibration: Calibration, kinds: list[str], keys: list[frozenset[str]]) -> np.ndarray:
    """[scale per kind, (latency ms, ms per MB) per link, chunk overhead ms, pipelined slowdown]
    (the slowdown last: fit_calibration can hold it). The loss
    time is not fitted: a constant that every placement pays can explain any set of
    step times that the schedule fails to rank, and it then did, flattening every
    reward (seen on zoo:rnnlm:small: compute scale at its floor, loss = the step)."""
    values = [calibration.compute_scale.get(k, 1.0) for k in kinds]
    for key in keys:
        link = calibration.links[key]
        values += [link.latency_s * 1e3, MS_PER_MB / link.bandwidth_Bps]
    return np.array(values + [calibration.chunk_overhead_ms, calibration.pipelined_slowdown])


def _unpack(theta: np.ndarray, base: Calibration, kinds: list[str], keys: list[frozenset[str]]) -> Calibration:
    values = theta.tolist()
    scale = {**base.compute_scale, **dict(zip(kinds, values))}
    links = dict(base.links)
    for i, key in enumerate(keys):
        latency_ms, ms_per_mb = values[len(kinds) + 2 * i: len(kinds) + 2 * i + 2]
        links[key] = Link(latency_ms / 1e3, MS_PER_MB / ms_per_mb)
    return Calibration(compute_scale=scale, links=links, chunk_overhead_ms=values[-2], loss_ms=base.loss_ms,
                       pipelined_slowdown=values[-1])


def _prior(theta0: np.ndarray, n_kinds: int, n_links: int, step_ms: float,
           mean_mb: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower bounds and prior widths. A width is the parameter's own size or, when
    larger, the value at which one transfer, one chunk would take a tenth of a typical
    step (a compute scale may move by 1, the slowdown by SLOWDOWN_PRIOR): a few widths
    are still far more than any real effect, while a handful of noisy measurements
    cannot drag a parameter they hardly see to an absurd value."""
    lower = [MIN_SCALE] * n_kinds + [0.0, MIN_MS_PER_MB] * n_links + [0.0, 0.0]
    tenth = PRIOR_SHARE * step_ms
    typical = [1.0] * n_kinds + [tenth, tenth / max(mean_mb, 1e-6)] * n_links + [tenth, SLOWDOWN_PRIOR]
    return np.array(lower), np.maximum(np.abs(theta0), typical)


def fit_calibration(problem: PlacementProblem, candidates: Sequence[Candidate | Sequence[int]],
                    measured_ms: Sequence[float], initial: Calibration | None = None,
                    slowdown: bool = True) -> Calibration:
    """The calibration under which the simulator best reproduces `measured_ms` (the
    measured step time, ms, of each candidate: a Candidate, or a bare placement run as
    one micro-batch). Works from a single measurement (the prior then keeps all but the
    best-determined parameters near `initial`). Pipelined candidates belong in the fit:
    only they show the pipelined slowdown (fitted on one-micro-batch plans alone, the
    simulator put the pipelined plans that searches picked 13-14% too fast:
    docs/results.md). `slowdown=False` holds the slowdown at `initial`'s (an ablation of
    the term).

    Raises ValueError without one positive, finite time per candidate."""
    measured = np.asarray(measured_ms, dtype=np.float64)
    if len(candidates) != len(measured) or not len(measured):
        raise ValueError(f"need one measured time per candidate, got {len(candidates)} candidates "
                         f"and {len(measured)} times")
    if not np.all(np.isfinite(measured) & (measured > 0)):
        raise ValueError("measured step times must be positive and finite (leave infeasible placements out)")
    initial = initial or Calibration.default(problem.cluster)
    kinds, keys = problem.cluster.kinds, _link_keys(problem)
    theta0 = _pack(initial, kinds, keys)
    mean_mb = float(problem.costs.edge_bytes.mean()) / 1e6 if len(problem.costs.edge_bytes) else 1.0
    lower, width = _prior(theta0, len(kinds), len(keys), float(np.median(measured)), mean_mb)
    log_measured = np.log(measured)
    candidates = [c if isinstance(c, Candidate) else Candidate(tuple(int(d) for d in c)) for c in candidates]
    # a micro-batch count the profile lacks has no simulated time to fit: such a candidate tells nothing
    nominal = Simulator(problem, initial)
    timed = [i for i, c in enumerate(candidates)
             if math.isfinite(nominal.simulate(c.placement, c.microbatches).step_ms)]
    if not timed:
        raise ValueError("the simulator cannot time any of the candidates (micro-batch counts not profiled)")
    candidates, log_measured = [candidates[i] for i in timed], log_measured[timed]

    # The search runs on u = theta / width: every variable of order one, and the
    # prior is simply u - u0. (Not on theta - theta0: least_squares sizes its first
    # step by the norm of the start, which must not be zero.)
    def residuals(u: np.ndarray) -> np.ndarray:
        sim = Simulator(problem, _unpack(u * width, initial, kinds, keys))
        simulated = np.array([sim.simulate(c.placement, c.microbatches).step_ms for c in candidates])
        fit = (np.log(np.maximum(simulated, 1e-9)) - log_measured) / MEASUREMENT_SPREAD
        return np.concatenate([fit, u - u0])

    u0 = theta0 / width
    u_lower = lower / width
    start = np.maximum(u0, u_lower)
    if slowdown:
        u = least_squares(residuals, start, bounds=(u_lower, np.inf), diff_step=1e-3).x
    else:  # the slowdown (last) held at the initial's
        u = np.append(least_squares(lambda v: residuals(np.append(v, u0[-1])), start[:-1],
                                    bounds=(u_lower[:-1], np.inf), diff_step=1e-3).x, u0[-1])
    return _unpack(u * width, initial, kinds, keys)


def calibration_path(problem: PlacementProblem) -> Path:
    """Where the calibration for this model on this cluster lives: beside the profile
    cache ($PLACER_CACHE, default ~/.cache/placer), named by the model's fingerprint
    and the device list. A name longer than MAX_NAME characters (36 virtual CPU devices
    make one) keeps its head and replaces the rest by a hash of the whole, so that the
    file name stays well under the file system's limit (255 bytes)."""
    name = f"{problem.fingerprint or problem.groups.graph.get('name', 'model')}-{problem.cluster.spec()}"
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)
    if len(safe) > MAX_NAME:
        safe = f"{safe[:MAX_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return cache_dir() / "calibration" / f"{safe}.json"


def save_calibration(problem: PlacementProblem, calibration: Calibration) -> Path:
    """Write the calibration where load_calibration finds it (atomically); returns the path."""
    return write_text_atomically(calibration_path(problem), json.dumps(calibration.to_json(), indent=2))


def load_calibration(problem: PlacementProblem) -> Calibration | None:
    """The saved calibration, or None when there is none. The file is only a cache: one
    that cannot be read or holds unusable values (a directory, bad JSON, a missing
    field, a string or NaN or negative number, a zero bandwidth) is a miss, with a
    one-line warning naming the file, and the caller falls back to the uncalibrated
    simulator."""
    path = calibration_path(problem)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        problem_ = _invalid(data)
        if problem_:
            raise ValueError(problem_)
        return Calibration.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        warnings.warn(f"ignoring unreadable calibration {path}: {reason} (the simulator runs uncalibrated until one is "
                      f"fitted again)", stacklevel=2)
        return None


def _invalid(data: object) -> str:
    """Why `data` (parsed JSON) is no usable calibration; "" when it is one."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"

    def number(value: object, what: str, positive: bool = False) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{what} is {value!r}, not a number"
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            return f"{what} is {value!r}, not a {'positive' if positive else 'non-negative'} finite number"
        return ""

    for key in ("compute_scale", "links", "chunk_overhead_ms", "loss_ms"):
        if key not in data:
            return f"no {key!r} field"
    if not isinstance(data["compute_scale"], dict) or not isinstance(data["links"], dict):
        return "compute_scale and links must be objects"
    checks = [number(v, f"compute_scale[{k!r}]", positive=True) for k, v in data["compute_scale"].items()]
    for key, link in data["links"].items():
        if not isinstance(link, dict) or {"latency_s", "bandwidth_Bps"} - set(link):
            return f"link {key!r} needs latency_s and bandwidth_Bps"
        checks += [number(link["latency_s"], f"link {key!r} latency_s"),
                   number(link["bandwidth_Bps"], f"link {key!r} bandwidth_Bps", positive=True)]
    checks += [number(data["chunk_overhead_ms"], "chunk_overhead_ms"), number(data["loss_ms"], "loss_ms"),
               number(data.get("pipelined_slowdown", 0.0), "pipelined_slowdown")]
    return next((c for c in checks if c), "")
