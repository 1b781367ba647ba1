"""Measure a placement: time whole training steps of the placed model for real.

One step is what a user's loop does: zero_grad, forward, loss_fn(out, *inputs),
backward, optimizer step. Steps are timed after warm-up; the result is the median
and interquartile range, and each device's peak memory:

- CUDA devices: the caching allocator's peak (torch.cuda.max_memory_allocated);
- CPU devices: the runtime's own accounting, the model's way of counting too
  (PlacementProblem.memory_per_device): parameters and buffers, gradients and
  optimizer state on the device, plus the peak of activations saved for backward
  (counted per chunk with saved_tensors_hooks during the warm-up steps, so the timed
  steps run without hooks).

A device over its memory cap, a real out-of-memory error, or steps that run past the
timeout give `feasible=False` with the reason; the process keeps working.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from graphs.workload import Workload
from graphs.devices import Cluster, parse_cluster
from placer.plan import Plan, make_plan
from graphs.problem import PlacementProblem
from placer.runtime import PlacedModule, apply


@dataclass
class Measurement:
    feasible: bool
    median_ms: float | None = None
    iqr_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: dict[str, int] = field(default_factory=dict)  # device name -> bytes
    reason: str | None = None  # why it is infeasible

    def to_json(self) -> dict:
        return asdict(self)


class _TimedOut(Exception):
    pass


class _OverCap(Exception):
    pass


def measure_placement(workload: Workload, problem: PlacementProblem, placement: Sequence[int],
                      method: str = "candidate", iters: int = 10, warmup: int = 3,
                      timeout_s: float = 120.0) -> Measurement:
    """Measure a group placement of `problem`; one that is known to be infeasible
    (over a memory cap, colocation split) is reported so without running anything."""
    problems = problem.violations(placement)
    if problems:
        peaks = problem.memory_per_device(placement)
        return Measurement(feasible=False, peak_bytes={d: int(b) for d, b in zip(problem.cluster.names, peaks)},
                           reason="; ".join(problems))
    plan = make_plan(problem, placement, method)
    return measure(workload, plan, problem.cluster, iters=iters, warmup=warmup, timeout_s=timeout_s)


def measure(workload: Workload, plan: Plan, cluster: Cluster | None = None, iters: int = 10, warmup: int = 3,
            timeout_s: float = 120.0) -> Measurement:
    """Apply `plan` to a fresh copy of the workload's model and time `iters` training
    steps after `warmup` (at least one, which also measures memory)."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    cluster = cluster or parse_cluster(",".join(plan.devices))
    placed: PlacedModule | None = None
    peaks: dict[str, int] = {}
    try:
        placed = apply(workload.fresh_model(), plan, cluster)
        optimizer = workload.make_optimizer(placed.parameters())
        executor = placed.executor
        cuda = [d for d in cluster.devices if d.kind == "cuda"]
        for d in cuda:
            torch.cuda.reset_peak_memory_stats(d.torch_device)
        executor.excluded_storages = {t.untyped_storage().data_ptr()
                                      for t in list(placed.parameters()) + list(placed.buffers())}
        executor.count_activations = True

        def after_warmup() -> None:
            executor.count_activations = False
            peaks.update(_peak_bytes(placed, optimizer, cluster))
            for d in cluster.devices:
                if d.memory_bytes is not None and peaks.get(d.name, 0) > d.memory_bytes:
                    raise _OverCap(f"{d.name} needs {peaks[d.name]} bytes but has {d.memory_bytes}")

        times = _time_steps(_training_step(placed, optimizer, workload), iters, warmup, timeout_s, after_warmup,
                            sync=[d.torch_device for d in cuda])
        return _summary(times, peaks)
    except _TimedOut as exc:
        return Measurement(feasible=False, times_ms=exc.args[0], peak_bytes=peaks, reason=f"timed out after {timeout_s:g} s")
    except _OverCap as exc:
        return Measurement(feasible=False, peak_bytes=peaks, reason=str(exc))
    except MemoryError:
        return Measurement(feasible=False, peak_bytes=peaks, reason="out of memory on the host (MemoryError)")
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "out of memory" not in message.lower() and "can't allocate memory" not in message.lower():
            raise
        return Measurement(feasible=False, peak_bytes=peaks, reason=f"out of memory: {message}")
    finally:
        if placed is not None:
            placed.close()
        del placed
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_eager(workload: Workload, threads: int, iters: int = 10, warmup: int = 3,
                  timeout_s: float = 120.0) -> Measurement:
    """The same loop on the plain, unplaced model with `threads` intra-op threads:
    the baseline of the runtime's overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = workload.fresh_model()
        optimizer = workload.make_optimizer(model.parameters())
        times = _time_steps(_training_step(model, optimizer, workload), iters, warmup, timeout_s, lambda: None, sync=[])
        return _summary(times, {})
    except _TimedOut as exc:
        return Measurement(feasible=False, times_ms=exc.args[0], reason=f"timed out after {timeout_s:g} s")
    finally:
        torch.set_num_threads(before)


def _training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workload: Workload) -> Callable[[], None]:
    inputs = workload.inputs

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(*inputs)
        workload.loss_fn(out, *inputs).backward()
        optimizer.step()

    return step


def _time_steps(step: Callable[[], None], iters: int, warmup: int, timeout_s: float,
                after_warmup: Callable[[], None], sync: list[str]) -> list[float]:
    """Milliseconds of each of `iters` steps after `warmup` untimed ones. Raises
    _TimedOut (with the times so far) once the whole run passes `timeout_s`; a single
    step is not interrupted."""
    begin = time.perf_counter()
    times: list[float] = []
    for i in range(max(1, warmup) + iters):
        if i == max(1, warmup):
            after_warmup()
        start = time.perf_counter()
        step()
        for device in sync:
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        if i >= max(1, warmup):
            times.append((end - start) * 1e3)
        if end - begin > timeout_s:
            raise _TimedOut(times)
    return times


def _summary(times: list[float], peaks: dict[str, int]) -> Measurement:
    q1, median, q3 = np.percentile(times, [25, 50, 75]) if times else (np.nan,) * 3
    return Measurement(feasible=True, median_ms=float(median), iqr_ms=float(q3 - q1), times_ms=times, peak_bytes=peaks)


def _peak_bytes(placed: PlacedModule, optimizer: torch.optim.Optimizer, cluster: Cluster) -> dict[str, int]:
    """Each device's peak: the CUDA allocator's on GPUs; on CPU devices parameters,
    buffers, gradients and optimizer state placed there plus peak saved activations."""
    peaks = {d.name: 0 for d in cluster.devices}
    seen: set[int] = set()
    for name, device in placed.tensor_devices.items():
        path, _, attr = name.rpartition(".")
        tensor = getattr(placed.get_submodule(path), attr)
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        held = [tensor, getattr(tensor, "grad", None)] + [
            v for v in optimizer.state.get(tensor, {}).values() if isinstance(v, torch.Tensor)]
        peaks[device] += sum(t.numel() * t.element_size() for t in held if t is not None)
    for device, nbytes in placed.executor.peak_bytes.items():
        peaks[device] += nbytes
    for d in cluster.devices:
        if d.kind == "cuda":
            peaks[d.name] = int(torch.cuda.max_memory_allocated(d.torch_device))
    return peaks
