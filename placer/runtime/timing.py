"""Timing training steps: the one timing loop, and what a measurement records.

One step is what a user's loop does: zero_grad, forward, loss_fn(out, *inputs),
backward, optimizer step. A `Trial` is one model made ready to be timed: placed
(`PlacedTrial`, through placer's runtime) or run as the user runs it without placer
(`EagerTrial`, the `unplaced` row), opened once (placed, warmed up, memory measured),
then stepped as often as a protocol asks (placer.measurements interleaves several).
`measure(workload, plan)` is the simple form: open, time `iters` steps, close.

A `Measurement` (placer.runtime.stats: median, IQR, the CI of the median, runs) holds
each device's peak memory too:

- CUDA devices: the caching allocator's peak (torch.cuda.max_memory_allocated);
- CPU devices of a placed model: the runtime's own accounting, the model's way of
  counting too (PlacementProblem.memory_per_device): parameters and buffers,
  gradients and optimizer state on the device, plus the peak of activations saved for
  backward (counted per chunk during the warm-up steps; timed steps run without hooks).

Each step runs with the thread state its trial was made with (`_ThreadState`): the
caller's intra-op thread count, and for the unplaced model every core of the process;
both are restored after the step, also where the runtime left the caller pinned to a
device's cores (a forward whose backward never ran). An unplaced model whose steps run
intra-op threads records whether other processes held its cores while its timed steps
ran (`Measurement.busy`, placer.runtime.host_load.ContentionMeter over exactly its own
steps): placer.choose takes no verdict from it.

A device over its memory cap, a real out-of-memory error, a plan the runtime refuses
(placer.runtime.refusals.Refused: micro-batches that would change the model), or a
step that runs past the time limit gives `feasible=False` with the reason; the process keeps working.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch

from graphs.devices import Cluster, format_size
from graphs.errors import exit_error
from graphs.problem import PlacementProblem
from graphs.workload import Workload
from placer.plan import Plan, make_plan, plan_cluster, with_workload_options
from placer.runtime.host_load import ContentionMeter, busy_host, busy_note
from placer.runtime.placed import PlacedModule, apply
from placer.runtime.refusals import Refused
from placer.runtime.stats import CONFIDENCE, Measurement, median_ci, summarize
from placer.runtime.worker import caller_threads

__all__ = ["Measurement", "median_ci", "summarize", "time_steps", "StepTimeout", "Trial", "PlacedTrial",
           "EagerTrial", "run_trial", "measure", "measure_placement", "measure_eager", "CONFIDENCE", "Clock"]


Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter; a fake one in tests)


class StepTimeout(Exception):
    """A training step ran past its time limit (seconds in args)."""

    def __init__(self, limit_s: float, took_s: float):
        super().__init__(f"a training step took {took_s:.1f} s, over the {limit_s:g} s limit (raise it with "
                         f"--step-timeout)")
        self.limit_s, self.took_s = limit_s, took_s


def time_steps(step: Callable[[], object], n: int, sync: Sequence[str] = (), clock: Clock = time.perf_counter,
               limit_s: float | None = None) -> list[float]:
    """The one timing loop: run `step` n times, return each one's milliseconds.

    A step lasts until every device in `sync` (CUDA device names) has finished it.

    Raises
    ------
    StepTimeout
        A step took longer than `limit_s` seconds (a running step is not interrupted:
        it is judged when it returns).
    """
    times = []
    for _ in range(n):
        start = clock()
        step()
        for device in sync:
            torch.cuda.synchronize(device)
        took = clock() - start
        if limit_s is not None and took > limit_s:
            raise StepTimeout(limit_s, took)
        times.append(took * 1e3)
    return times


def _training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workload: Workload,
                   inputs: tuple) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model(*inputs), *inputs)
        loss.backward()
        optimizer.step()
        return loss

    return step


class Trial:
    """A model set up to be timed step by step; subclasses say how it runs.

    `open()` builds it and runs the warm-up (which also measures memory) and returns
    None when it is ready, or an infeasible Measurement saying why it cannot run;
    `step()` times one more training step (ms); `result()` summarizes the steps so far;
    `close()` frees it. A step that fails later (out of memory, time limit) makes the
    trial infeasible: `failed` then holds the Measurement.

    Parameters
    ----------
    label : its name in reports ("unplaced", a method name, a placement key).
    warmup : untimed steps before the first timed one (at least 1).
    step_timeout_s : a step longer than this makes the trial infeasible.
    clock : seconds, monotonic.
    """

    def __init__(self, label: str, warmup: int = 3, step_timeout_s: float | None = 120.0,
                 clock: Clock = time.perf_counter):
        self.label, self.warmup, self.step_timeout_s, self.clock = label, max(1, warmup), step_timeout_s, clock
        self.times_ms: list[float] = []
        self.peak_bytes: dict[str, int] = {}
        self.notes: list[str] = []
        self.failed: Measurement | None = None
        self.meter: ContentionMeter | None = None  # for a trial whose threads other processes stall
        self._step: Callable[[], torch.Tensor] | None = None
        self._sync: list[str] = []

    def _build(self) -> tuple[Callable[[], torch.Tensor], list[str]]:  # the step and the CUDA devices to sync
        raise NotImplementedError

    def _after_warmup(self) -> None:
        """Measure memory; raise _OverCap when a device holds more than its cap."""

    def _around_step(self) -> AbstractContextManager:  # entered around each step (thread counts)
        return nullcontext()

    def open(self) -> Measurement | None:
        """Build and warm up; None when ready, else the infeasible Measurement."""
        def warm() -> None:
            self._step, self._sync = self._build()
            loss = None
            with self._around_step():
                for _ in range(self.warmup):
                    start = self.clock()
                    loss = self._step()
                    took = self.clock() - start
                    if self.step_timeout_s is not None and took > self.step_timeout_s:
                        raise StepTimeout(self.step_timeout_s, took)
            if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
                self.notes.append(f"{self.label}: the loss is {float(loss.detach().float().mean())} after warm-up "
                                  f"(the model's output is not finite): its step times are real, but training "
                                  f"would diverge")
            self._after_warmup()

        self.failed = self._guard(warm)
        return self.failed

    def step(self) -> float | None:
        """Time one more step (ms); None once the trial has failed."""
        if self.failed is not None or self._step is None:
            return None
        out: list[float] = []

        def timed() -> None:
            with self._around_step(), self.meter.window() if self.meter is not None else nullcontext():
                out.extend(time_steps(self._step, 1, self._sync, self.clock, self.step_timeout_s))

        self.failed = self._guard(timed)
        if self.failed is not None:
            return None
        self.times_ms.extend(out)
        return out[0]

    def result(self, confidence: float = CONFIDENCE) -> Measurement:
        """The Measurement of the steps so far (infeasible if it failed or ran none)."""
        if self.failed is not None:
            return self.failed
        if not self.times_ms:
            return Measurement(feasible=False, peak_bytes=dict(self.peak_bytes), reason="no step was timed")
        busy = self.meter.busy(busy_host) if self.meter is not None else None
        notes = [*self.notes, busy_note(self.label, busy)] if busy is not None else self.notes
        return replace(summarize(self.times_ms, self.peak_bytes, notes, confidence), busy=busy)

    def close(self) -> None:
        """Free the model (and its device workers); the Measurement stays available."""
        self._step = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _guard(self, fn: Callable[[], None]) -> Measurement | None:
        """Run fn; the infeasible Measurement for what makes a placement unrunnable."""
        try:
            fn()
            return None
        except SystemExit as exc:  # the workload's code (forward, loss_fn, optimizer) ended the process
            raise exit_error(f"{self.label}: the training step", exc.code) from None
        except StepTimeout as exc:
            return self._infeasible(f"timed out: {exc}")
        except _OverCap as exc:
            return self._infeasible(str(exc))
        except Refused as exc:
            return self._infeasible(f"refused: {exc}")
        except MemoryError:
            return self._infeasible("out of memory on the host (MemoryError)")
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "out of memory" not in message.lower() and "can't allocate memory" not in message.lower():
                raise
            return self._infeasible(f"out of memory: {message}")

    def _infeasible(self, reason: str) -> Measurement:
        return Measurement(feasible=False, times_ms=list(self.times_ms), peak_bytes=dict(self.peak_bytes),
                           reason=reason, notes=list(self.notes))


class _OverCap(Exception):
    pass


class _ThreadState:
    """Run the caller's torch ops with `n` intra-op threads (None: as they are) and the
    caller's thread on `cores` (empty: as it is), restoring both after: whatever a step
    does to the calling thread (the runtime pins it while it serves a device), the next
    trial's step starts from the state it was made with."""

    def __init__(self, n: int | None, cores: Sequence[int] = ()):
        self.n, self.cores = n, tuple(cores)
        self.threads_before, self.cores_before = 0, None

    def __enter__(self) -> None:
        self.threads_before = torch.get_num_threads()
        self.cores_before = _affinity()
        if self.n is not None:
            torch.set_num_threads(self.n)
        if self.cores and self.cores_before is not None and self.cores_before != set(self.cores):
            os.sched_setaffinity(threading.get_native_id(), self.cores)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads_before)
        if self.cores_before is not None and _affinity() != self.cores_before:
            os.sched_setaffinity(threading.get_native_id(), self.cores_before)


def _affinity() -> set[int] | None:
    """The calling thread's allowed cores (None where the OS cannot say)."""
    return os.sched_getaffinity(threading.get_native_id()) if hasattr(os, "sched_getaffinity") else None


class PlacedTrial(Trial):
    """`plan` applied to a fresh copy of the workload's model, on `cluster` (default:
    the plan's own devices), run by placer's runtime with the workload's micro-batch
    options (placer.plan.with_workload_options)."""

    def __init__(self, workload: Workload, plan: Plan, cluster: Cluster | None = None, label: str | None = None,
                 **kwargs):
        super().__init__(label or plan.method, **kwargs)
        self.workload, self.plan = workload, plan
        self.cluster = cluster or plan_cluster(plan)
        self.placed: PlacedModule | None = None
        # Each step runs with the thread count placer.apply gives the user's caller (one rule:
        # worker.caller_threads); apply sets it, and the trial gives the process its own back after.
        self.threads = caller_threads(self.cluster.devices)

    def _build(self) -> tuple[Callable[[], torch.Tensor], list[str]]:
        with _ThreadState(None):
            self.placed = apply(self.workload.fresh_model(), with_workload_options(self.plan, self.workload),
                                self.cluster)
        self.optimizer = self.workload.make_optimizer(self.placed.parameters())
        cuda = [d for d in self.cluster.devices if d.kind == "cuda"]
        for d in cuda:
            torch.cuda.reset_peak_memory_stats(d.torch_device)
        executor = self.placed.executor
        executor.excluded_storages = {t.untyped_storage().data_ptr()
                                      for t in list(self.placed.parameters()) + list(self.placed.buffers())}
        executor.count_activations = True
        return _training_step(self.placed, self.optimizer, self.workload, self.workload.inputs), \
            [d.torch_device for d in cuda]

    def _after_warmup(self) -> None:
        self.placed.executor.count_activations = False
        self.peak_bytes.update(_peak_bytes(self.placed, self.optimizer, self.cluster))
        for d in self.cluster.devices:
            if d.memory_bytes is not None and self.peak_bytes.get(d.name, 0) > d.memory_bytes:
                raise _OverCap(f"{d.name} needs {format_size(self.peak_bytes[d.name])} but has "
                              f"{format_size(d.memory_bytes)}")

    def _around_step(self) -> AbstractContextManager:
        return _ThreadState(self.threads)

    def close(self) -> None:
        if self.placed is not None:
            self.placed.close()
        self.placed = self.optimizer = None
        super().close()


class EagerTrial(Trial):
    """The workload's model as the user runs it without placer: on `device` ("cpu" is
    the whole host with `threads` intra-op threads, default torch's own; "cuda:N" one GPU)."""

    def __init__(self, workload: Workload, device: str = "cpu", threads: int | None = None, label: str = "unplaced",
                 **kwargs):
        super().__init__(label, **kwargs)
        self.workload, self.device, self.threads = workload, torch.device(device), threads
        # the whole host's cores (the main thread's, which placer never pins): each step runs on them
        self.cores = tuple(sorted(os.sched_getaffinity(os.getpid()))) \
            if self.device.type == "cpu" and hasattr(os, "sched_getaffinity") else ()

    def _build(self) -> tuple[Callable[[], torch.Tensor], list[str]]:
        model = self.workload.fresh_model().to(self.device)
        self.optimizer = self.workload.make_optimizer(model.parameters())
        inputs = tuple(x.to(self.device) for x in self.workload.inputs)
        sync = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            sync = [str(self.device)]
        return _training_step(model, self.optimizer, self.workload, inputs), sync

    def _after_warmup(self) -> None:
        if self.device.type == "cuda":
            self.peak_bytes[str(self.device)] = int(torch.cuda.max_memory_allocated(self.device))
        elif (self.threads or torch.get_num_threads()) > 1:
            self.meter = ContentionMeter(self.cores)

    def _around_step(self) -> AbstractContextManager:
        return _ThreadState(self.threads if self.device.type == "cpu" else None, self.cores)

    def close(self) -> None:
        self.optimizer = None
        super().close()


def run_trial(trial: Trial, iters: int, timeout_s: float | None = None) -> Measurement:
    """Open `trial`, time `iters` steps (stopping early, infeasible, once the timed steps
    pass `timeout_s` in all), close it, and return the Measurement."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    try:
        failed = trial.open()
        if failed is not None:
            return failed
        begin = trial.clock()
        for _ in range(iters):
            if trial.step() is None:
                break
            if timeout_s is not None and trial.clock() - begin > timeout_s:
                return trial._infeasible(f"timed out: {len(trial.times_ms)} steps took more than the "
                                         f"{timeout_s:g} s limit (raise it with --step-timeout)")
        return trial.result()
    finally:
        trial.close()


def measure(workload: Workload, plan: Plan, cluster: Cluster | None = None, iters: int = 10, warmup: int = 3,
            timeout_s: float = 120.0) -> Measurement:
    """Apply `plan` to a fresh copy of the workload's model and time `iters` training
    steps after `warmup` (at least one, which also measures memory).

    Parameters
    ----------
    workload : the model, its batch, loss and optimizer.
    plan : the placement; `cluster` gives its devices' caps and threads (default: the plan's devices).
    iters : timed steps, at least 1.
    timeout_s : a single step, or all the timed steps together, longer than this (seconds)
        make the measurement infeasible ("timed out").

    Returns
    -------
    Measurement (infeasible, with the reason, when it does not fit or times out).

    Raises
    ------
    ValueError
        iters < 1.
    PlanError
        The plan does not fit the model or the cluster.
    """
    return run_trial(PlacedTrial(workload, plan, cluster, warmup=warmup, step_timeout_s=timeout_s), iters, timeout_s)


def measure_placement(workload: Workload, problem: PlacementProblem, placement: Sequence[int],
                      method: str = "candidate", iters: int = 10, warmup: int = 3,
                      timeout_s: float = 120.0) -> Measurement:
    """Measure a group placement of `problem` (see `measure`); one that is known to be
    infeasible (over a memory cap, colocation split) is reported so without running."""
    problems = problem.violations(placement)
    if problems:
        peaks = problem.memory_per_device(placement)
        return Measurement(feasible=False, peak_bytes={d: int(b) for d, b in zip(problem.cluster.names, peaks)},
                           reason="; ".join(problems))
    return measure(workload, make_plan(problem, placement, method), problem.cluster, iters, warmup, timeout_s)


def measure_eager(workload: Workload, threads: int, iters: int = 10, warmup: int = 3,
                  timeout_s: float = 120.0) -> Measurement:
    """The same loop on the plain, unplaced model on the CPU with `threads` intra-op
    threads: the baseline of the runtime's overhead."""
    return run_trial(EagerTrial(workload, "cpu", threads, warmup=warmup, step_timeout_s=timeout_s), iters, timeout_s)


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
