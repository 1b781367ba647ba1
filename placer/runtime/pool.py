"""Measure many candidate placements at once: a pool of worker processes, each with
its own disjoint devices, as the controller/worker design of Mirhoseini et al. did.

Each worker is a process (forked from a server with torch imported once:
placer.runtime.processes) that loads the workload once and then measures the plans it
is sent with placer.runtime.timing.measure on its own device set: with GPUs,
its own block of them; device i of a plan is device i of the worker's set, and peak
memory comes back under the plan's names. Each worker is pinned (sched_setaffinity) to
its own share of the host's cores.

More than one worker is for GPU devices only (check_workers): the search's CPU devices
share the host's cores out among them (graphs.devices.parse_cluster), so a worker's
1/n of the cores would run them on fewer than the plan does and time something else. A
pool of one worker may hold CPU devices: it has every core, and a hung or crashed
measurement costs a worker, not the caller (`placer optimize --workers 1` measures in
its own process instead).

A worker that dies (killed, crashed) or passes the hard time limit is replaced by a
fresh process, and its candidate is retried once: on another worker where there is
one, else on that fresh one. A second failure marks the candidate infeasible with both
reasons. The search never loses a candidate.

Workers never outlive the process that started them (placer.runtime.processes). They
ignore Ctrl-C (the parent stops them: no tracebacks from every worker on a terminal's
Ctrl-C), and whatever the workload prints goes to stderr, so that a `--json` on stdout
stays JSON.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch

from graphs.workload import load_workload
from graphs.devices import Cluster, host_cores, parse_cluster, parse_memory
from graphs.errors import DeviceSpecError, PlacerError
from placer.plan import Plan, accelerate_name, plan_cluster
from placer.runtime import processes
from placer.runtime.timing import Measurement, measure


class WorkerStartError(PlacerError):
    """A measurement worker could not load the workload or its devices."""


@dataclass
class _Worker:
    slot: int
    devices: list[str]  # its device set, device i standing in for the plan's device i
    cores: list[int]  # the host cores it is pinned to (CPU devices)
    process: BaseProcess
    conn: Connection
    ready: bool = False
    task: int | None = None  # index of the candidate it is measuring
    plan_devices: list[str] = field(default_factory=list)  # that candidate's own device names
    since: float = 0.0  # when it got that candidate (or, until ready, when it started)

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class _Task:
    index: int
    failures: list[str] = field(default_factory=list)
    avoid: int | None = None  # the worker slot it failed on


def max_workers() -> int:
    """The most measurement workers this host can run: one core each."""
    return host_cores()


def check_workers(n_workers: int, cluster: Cluster) -> None:
    """Refuse a pool this host cannot run, or one whose measurements would not be the plan's.

    Parameters
    ----------
    n_workers : the pool's worker processes (1: no refusal for the CPU's sake).
    cluster : the search's devices (graphs.devices.parse_cluster of `--devices`, `--memory`).

    Raises
    ------
    DeviceSpecError
        `n_workers` is more than `max_workers()` (one core each), or more than one while
        the cluster has CPU devices: a worker's share of the cores is fewer than the
        threads the plan runs them with. Either names the values and the fix.
    """
    limit = max_workers()
    if n_workers > limit:
        raise DeviceSpecError(f"--workers {n_workers}: this host has {limit} core(s) and every measurement worker "
                              f"needs one of its own; use --workers {limit} or fewer")
    cpus = [d for d in cluster.devices if d.kind == "cpu"]
    share, needed = limit // n_workers, sum(d.threads for d in cpus)
    if n_workers > 1 and share < needed:
        threads = {d.threads for d in cpus}  # parse_cluster gives a host's virtual devices one count
        each = ""
        if len(cpus) > 1 and len(threads) == 1:
            each = " (one thread each)" if threads == {1} else f" ({min(threads)} threads each)"
        raise DeviceSpecError(f"--workers {n_workers}: each worker would run {','.join(d.name for d in cpus)} on "
                              f"{share} of this host's {limit} cores, where the plan runs "
                              f"{'them' if len(cpus) > 1 else 'it'} on {needed}{each}, so its measurements would "
                              f"not be the plan's; use --workers 1 (a pool pays where every device is a GPU, each "
                              f"worker with its own)")


def worker_device_sets(devices: list[str], n_workers: int) -> list[tuple[list[str], list[int]]]:
    """Each worker's (device names, host cores): disjoint shares of the cores (every core
    for one worker, the only pool check_workers allows CPU devices); for GPUs, worker w
    takes cuda:(w*k + i) for the k devices of the search."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(host_cores()))
    share = max(1, len(cores) // n_workers)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sets = []
    for w in range(n_workers):
        mine = cores[(w * share) % len(cores):][:share]
        names = []
        for i, name in enumerate(devices):
            if name.startswith("cuda"):
                index = w * len(devices) + i
                if index >= gpus:
                    raise DeviceSpecError(f"{n_workers} workers of {len(devices)} devices need "
                                          f"{n_workers * len(devices)} "
                                          f"GPUs; this host has {gpus}")
                name = f"cuda:{index}"
            names.append(name)
        sets.append((names, mine))
    return sets


class MeasurementPool:
    """`measure_many(plans)` measures plans on `n_workers` processes at once.
    `memory` caps devices by the search's names (`--memory`), on every worker alike.

    `timeout_s` is each measurement's limit: measure() stops a placement whose steps
    run past it (infeasible, "timed out"); a worker silent for 1.25 x timeout_s + 2 s
    is taken as hung, killed and replaced."""

    def __init__(self, workload_spec: str, devices_per_worker: list[str], n_workers: int, iters: int = 10,
                 timeout_s: float = 120.0, warmup: int = 3, memory: str | None = None):
        check_workers(n_workers, parse_cluster(",".join(devices_per_worker), memory))
        self.workload_spec = workload_spec
        self.search_devices = list(devices_per_worker)
        self.caps = parse_memory(memory, self.search_devices)  # the search's device names -> bytes
        self.iters, self.warmup, self.timeout_s = iters, warmup, timeout_s
        self.hang_s = 1.25 * timeout_s + 2.0
        self.start_s = max(120.0, self.hang_s)  # importing torch and loading the workload
        self.device_sets = worker_device_sets(list(devices_per_worker), n_workers)
        self.events: list[str] = []  # one line per worker failure, for the search's log
        self._ctx = processes.context(["torch", "placer.runtime.pool", "graphs.zoo"])
        self.workers = [self._start(slot) for slot in range(n_workers)]

    def _start(self, slot: int) -> _Worker:
        devices, cores = self.device_sets[slot]
        caps = ",".join(f"{devices[i]}={self.caps[name]}" for i, name in enumerate(self.search_devices)
                        if name in self.caps)
        parent, child = self._ctx.Pipe()
        process = processes.process(self._ctx, _worker_main, (self.workload_spec, devices, caps or None, cores,
                                                             self.iters, self.warmup, self.timeout_s, child),
                                    name=f"placer-measure{slot}")
        processes.start(process)
        child.close()
        return _Worker(slot, devices, cores, process, parent, since=time.monotonic())

    def _replace(self, worker: _Worker, why: str) -> None:
        self.events.append(f"worker {worker.slot} (pid {worker.pid}) {why}; replaced")
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self.workers[worker.slot] = self._start(worker.slot)

    def measure_many(self, plans: list[Plan]) -> list[Measurement]:
        """One Measurement per plan, in order; never raises for a failed worker.

        Raises
        ------
        PlanError
            A plan's devices cannot be stood for by the workers' (placer.plan.plan_cluster):
            refused before any plan is sent.
        """
        workers = parse_cluster(",".join(self.device_sets[0][0]))
        for plan in plans:
            plan_cluster(plan, devices=workers)
        results: list[Measurement | None] = [None] * len(plans)
        queue = deque(_Task(i) for i in range(len(plans)))
        running: dict[int, _Task] = {}  # worker slot -> its task
        while queue or running:
            self._dispatch(plans, queue, running)
            busy = [w for w in self.workers if w.task is not None]
            deadline = min((w.since + self.hang_s for w in busy), default=time.monotonic() + 1.0)
            handles = {}
            for w in self.workers:
                handles[w.conn] = w
                handles[w.process.sentinel] = w
            for handle in wait(list(handles), timeout=max(0.0, deadline - time.monotonic())):
                worker = handles[handle]
                if worker is not self.workers[worker.slot]:
                    continue  # replaced earlier in this round
                if handle is worker.conn and worker.conn.poll():
                    self._receive(worker, results, running)
                elif not worker.process.is_alive():
                    self._fail(worker, f"died (exit code {worker.process.exitcode})", queue, running, results)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.task is not None and now - worker.since > self.hang_s:
                    self._fail(worker, f"hung for more than {self.hang_s:g} s", queue, running, results)
                elif not worker.ready and now - worker.since > self.start_s:
                    raise WorkerStartError(f"measurement worker {worker.slot} did not start in {self.start_s:g} s")
        return results

    def _dispatch(self, plans: list[Plan], queue: deque, running: dict[int, _Task]) -> None:
        """Hand queued candidates to idle ready workers; a retried candidate goes to
        another worker than the one it failed on, where there is one."""
        for worker in self.workers:
            if not worker.ready or worker.task is not None or not queue:
                continue
            task = next((t for t in queue if t.avoid != worker.slot or len(self.workers) == 1), None)
            if task is None:
                continue
            queue.remove(task)
            worker.task, worker.since = task.index, time.monotonic()
            worker.plan_devices = list(plans[task.index].devices)
            running[worker.slot] = task
            worker.conn.send(_on_devices(plans[task.index], worker.devices))

    def _receive(self, worker: _Worker, results: list, running: dict[int, _Task]) -> None:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            return  # it died: its sentinel says so next round
        if kind == "ready":
            worker.ready = True
        elif kind == "error":
            raise WorkerStartError(f"measurement worker {worker.slot} could not start: {payload}")
        else:
            task = running.pop(worker.slot)
            rename = dict(zip(worker.devices, worker.plan_devices))
            peaks = {rename.get(d, d): b for d, b in payload.peak_bytes.items()}
            results[task.index] = replace(payload, peak_bytes=peaks)
            worker.task = None

    def _fail(self, worker: _Worker, why: str, queue: deque, running: dict[int, _Task], results: list) -> None:
        task = running.pop(worker.slot, None)
        if task is None and not worker.ready:
            raise WorkerStartError(f"measurement worker {worker.slot} {why} while starting")
        self._replace(worker, why + (f" measuring candidate {task.index}" if task else ""))
        if task is None:
            return
        task.failures.append(f"worker {why}")
        if len(task.failures) < 2:
            task.avoid = worker.slot
            queue.appendleft(task)
        else:
            results[task.index] = Measurement(feasible=False, reason="; ".join(task.failures))

    def close(self) -> None:
        """Stop the workers (each finishes nothing more)."""
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def __enter__(self) -> "MeasurementPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _on_devices(plan: Plan, devices: list[str]) -> Plan:
    """The plan with device i renamed to the worker's device i."""
    rename = dict(zip(plan.devices, devices))
    accelerate = {accelerate_name(old): accelerate_name(new) for old, new in rename.items()}  # device_map's names
    return replace(plan, devices=list(devices), assignment={n: rename[d] for n, d in plan.assignment.items()},
                   device_map={m: accelerate.get(d, d) for m, d in plan.device_map.items()})


def _worker_main(workload_spec: str, devices: list[str], memory: str | None, cores: list[int], iters: int,
                 warmup: int, timeout_s: float, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool on Ctrl-C
    os.dup2(2, 1)  # the workload's prints go to stderr: never onto the parent's stdout
    try:
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(max(1, len(cores)))
        workload = load_workload(workload_spec)
        # Parsed on the worker's cores, its CPU devices get the threads the search's have:
        # check_workers lets CPU devices into one worker only, which has every core. The
        # parent parsed the same devices and gave their warnings; one from here would be a
        # second copy (and its advice would count this worker's cores, not the host's).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cluster = parse_cluster(",".join(devices), memory)
    except Exception as exc:
        conn.send(("error", traceback.format_exception_only(type(exc), exc)[-1].strip()))
        return
    conn.send(("ready", None))
    while True:
        try:
            plan = conn.recv()
        except EOFError:
            return
        if plan is None:
            return
        try:
            result = measure(workload, plan, cluster, iters=iters, warmup=warmup, timeout_s=timeout_s)
        except Exception as exc:  # a placement that cannot run is an infeasible candidate, not a dead worker
            result = Measurement(feasible=False, reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                                 if str(exc).strip() else type(exc).__name__)
        conn.send(("result", result))
