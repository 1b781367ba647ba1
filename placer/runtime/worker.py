"""A device's worker: a daemon thread with a queue, pinned to the device's cores.

CPU workers set their own intra-op thread count (per thread in torch), so virtual
CPU devices each get their share of the host's cores, and on Linux they pin
themselves to that share (os.sched_setaffinity on the thread's native id; the
OpenMP team a thread starts later inherits it). CUDA workers run on their own
stream. A worker is started once it has done so (`Worker` returns then).

Thread counts: ATen keeps one process-wide intra-op count, which
torch.set_num_threads sets along with the calling thread's own, and which a thread
copies as its own when it first needs one (its first parallel op, or
torch.get_num_threads()). So a thread that never ran torch takes whatever count the
last torch.set_num_threads of any thread left, and a thread that set its own before
copying takes the process-wide count at its first op: `own_threads` copies first.
The caller runs a placed model with `caller_threads(devices)`, the executor sets it
once its workers have started, and measurement (placer.runtime.timing) runs each
step with the same count.

A worker waits for (key, owner, task) items to arrive in its `ReadyQueue`, takes
the device's `busy` lock, pops the lowest key of those that have arrived, and calls
`owner.run(worker, task)`, which releases the lock: a pass of the executor hands it
tasks that way (placer.runtime.dataflow), and the caller's thread serves a device
the same way from the pass's own queue.

Grad mode and autocast are thread-local too: `grad_mode` and `Autocast.enter`
set the caller's on a worker around a chunk's forward (autograd records the
casts, so backward needs no autocast, as in eager). Contexts that have nothing to
do are one shared `NOTHING`, so that a chunk, run inside several, allocates none.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from heapq import heappop, heappush
from itertools import count
from typing import ContextManager

import torch

from graphs.devices import Device
from graphs.errors import ExecutionError

__all__ = ["Worker", "ReadyQueue", "CallerPin", "Autocast", "grad_mode", "core_shares", "caller_threads", "own_threads",
           "NOTHING", "CLOSE_WAIT_S"]

CLOSE_WAIT_S = 60.0  # how long close() waits for a worker still running a chunk
NOTHING = nullcontext()  # stateless, so one serves every thread


def grad_mode(enabled: bool) -> ContextManager:
    """torch.set_grad_enabled(enabled), or NOTHING where the thread is in that mode
    already (a worker in a training step, typically)."""
    return NOTHING if torch.is_grad_enabled() == enabled else torch.set_grad_enabled(enabled)


def core_shares(devices: Sequence[Device]) -> dict[str, tuple[int, ...]]:
    """The cores each virtual CPU device may use: consecutive slices of this
    process's allowed cores, `threads` each, in the devices' order. Empty where the
    OS cannot pin threads or the devices need more cores than the host has (then
    nobody is pinned: sharing is the OS's job)."""
    virtual = [d for d in devices if d.is_virtual_cpu and d.rank is None]
    if not virtual or not hasattr(os, "sched_setaffinity"):
        return {}
    cores = sorted(os.sched_getaffinity(0))
    if sum(d.threads for d in virtual) > len(cores):
        return {}
    shares, start = {}, 0
    for d in virtual:
        shares[d.name] = tuple(cores[start:start + d.threads])
        start += d.threads
    return shares


def caller_threads(devices: Iterable[Device]) -> int | None:
    """The intra-op thread count the calling thread runs a placed model with: that of
    its CPU devices (the first one's; `cpu:k` each have their share of the cores), so
    that the caller, which runs the loss and the optimizer step and serves one CPU
    device itself (executor._caller_device), is one more thread of that size rather
    than a team of the host's size spinning against the workers. None (keep the
    caller's own) for the model unplaced, whose one device is the whole host `cpu`,
    and where no CPU device is local (GPUs, other ranks' devices)."""
    local = [d for d in devices if d.rank is None]
    if len(local) == 1 and local[0].kind == "cpu" and not local[0].is_virtual_cpu:
        return None
    return next((d.threads for d in local if d.kind == "cpu"), None)


def own_threads(n: int) -> None:
    """Give the calling thread `n` intra-op threads for good (torch.set_num_threads
    after its own count is made: see the module doc). Sets the process-wide count to
    `n` too, which threads that have not run torch yet will copy."""
    torch.get_num_threads()  # makes the thread's own count, from the process-wide one, before setting it
    torch.set_num_threads(n)


@dataclass(frozen=True)
class Autocast:
    """The autocast state of a thread: (device type, dtype) for every device type where
    it is on, and whether casts are cached."""

    dtypes: tuple[tuple[str, torch.dtype], ...]
    cache: bool

    @classmethod
    def of_caller(cls, device_types: Iterable[str]) -> Autocast | None:
        """The calling thread's autocast for `device_types` (those of the devices that
        run chunks); None where it is off for all of them (nothing to enter)."""
        dtypes = tuple((t, torch.get_autocast_dtype(t)) for t in device_types if torch.is_autocast_enabled(t))
        return cls(dtypes, torch.is_autocast_cache_enabled()) if dtypes else None

    @staticmethod
    def enter(state: Autocast | None) -> ContextManager:
        """A context that sets `state` on the current thread (None: nothing to set)."""
        if state is None:
            return NOTHING
        if len(state.dtypes) == 1:
            (device_type, dtype), = state.dtypes
            return torch.autocast(device_type, dtype=dtype, cache_enabled=state.cache)
        return _nested(state)


@contextmanager
def _nested(state: Autocast) -> Iterator[None]:
    with ExitStack() as stack:
        for device_type, dtype in state.dtypes:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=state.cache))
        yield


class CallerPin:
    """Pins a calling thread to a device's cores while it serves that device, from the
    forward pass of a training step to the end of its backward (one pin and one
    restore a step); `release` restores the thread's own affinity."""

    def __init__(self):
        self._before: dict[int, set[int]] = {}  # native thread id -> its affinity before

    def hold(self, cores: Sequence[int]) -> None:
        tid = threading.get_native_id()
        if not cores or tid in self._before:
            return
        before = os.sched_getaffinity(tid)
        if before != set(cores):
            os.sched_setaffinity(tid, cores)
            self._before[tid] = before

    def release(self) -> None:
        before = self._before.pop(threading.get_native_id(), None)
        if before is not None:
            os.sched_setaffinity(threading.get_native_id(), before)


class ReadyQueue:
    """A device's ready tasks: any thread puts (key, owner, task) items; the device's
    one thread waits for them (`wait`) and takes the item of lowest key among those
    that have arrived (`pop`: a priority queue of what is ready, not first come first
    served: placer.runtime.dataflow). Items travel through a SimpleQueue, the
    cheapest way here for one thread to wake another, and wait in a heap of the
    taker's own; `None` (close) ends the waiting at once. Nothing waits when both
    `ready` (the heap) and `arrived` are empty: exact for the taking thread, a snapshot
    for others (dataflow reads the two itself, a crossing's hot path)."""

    def __init__(self):
        self.arrived: queue.SimpleQueue = queue.SimpleQueue()
        self.ready: list = []
        self._order = count()  # equal keys (none within a pass) in arrival order
        self.put = self.arrived.put  # put(item): the SimpleQueue's own, no Python frame in between

    def wait(self, timeout: float | None = None) -> bool:
        """Wait at most `timeout` seconds for an item (queue.Empty after that) and move
        what has arrived into the heap; False once closed. The taking thread only."""
        arrived, ready = self.arrived, self.ready
        if not ready:
            item = arrived.get(timeout=timeout)
            if item is None:
                return False
            heappush(ready, (item[0], next(self._order), item))
        while not arrived.empty():  # one consumer: what is there stays there
            item = arrived.get()
            if item is None:
                return False
            heappush(ready, (item[0], next(self._order), item))
        return True

    def pop(self):
        """The waiting item of lowest key (after `wait` returned True)."""
        return heappop(self.ready)[2]


class Worker:
    """A daemon thread that runs one device's ready work, best key first (ReadyQueue).
    Returns once the thread has pinned itself and set its thread count (or CUDA device),
    so that nothing it does to the process-wide thread count comes after.

    `busy` is held by whichever thread runs one of the device's tasks: a device runs one
    task at a time, and an unpinned virtual CPU device's task may run on another thread
    of its thread count (`shared_threads`; placer.runtime.dataflow says when)."""

    def __init__(self, device: Device, cores: Sequence[int] = ()):
        self.device = device
        self.cores = tuple(cores)
        self.torch_device = torch.device(device.torch_device)
        self.stream = torch.cuda.Stream(self.torch_device) if device.kind == "cuda" else None
        self.queue = ReadyQueue()
        self.busy = threading.Lock()
        # The thread count under which any thread may run this device's tasks; None: only its own
        # thread may (a CUDA device's stream and current device, a pinned device's cores).
        self.shared_threads = device.threads if device.kind == "cpu" and not self.cores else None
        self._start_error: BaseException | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(started,), name=f"placer-{device.name}", daemon=True)
        self._thread.start()
        started.wait()
        if self._start_error is not None:
            raise ExecutionError(f"the worker of {device.name} could not start: {self._start_error}; check the "
                                 f"device (and its cores, {list(self.cores)})") from self._start_error

    def _loop(self, started: threading.Event) -> None:
        try:
            if self.cores:
                os.sched_setaffinity(threading.get_native_id(), self.cores)
            if self.device.kind == "cpu":
                own_threads(self.device.threads)
            else:
                torch.cuda.set_device(self.torch_device)
        except BaseException as exc:  # raised in the constructing thread, where the caller sees it
            self._start_error = exc
            return
        finally:
            started.set()
        ready, busy = self.queue, self.busy
        while ready.wait():
            busy.acquire()  # another thread may be running one of this device's tasks (dataflow)
            if not ready.wait():  # what arrived meanwhile competes too (the heap is not empty: no waiting)
                busy.release()
                break
            _, owner, task = ready.pop()
            owner.run(self, task)  # releases busy

    def context(self):
        """The worker's CUDA stream, where it has one."""
        return torch.cuda.stream(self.stream) if self.stream is not None else NOTHING

    def record_event(self) -> torch.cuda.Event | None:
        """A CUDA event after the work queued so far on this worker's stream."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Stop the thread and wait for it (a thread still exiting while the interpreter
        shuts down can abort the process from torch's thread-local destructors), at
        most `timeout_s`: a worker stuck in a chunk is left behind (a daemon) rather
        than waited for without end."""
        self.queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
