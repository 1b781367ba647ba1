"""One pass of a training step (forward or backward, every micro-batch) run as
dataflow over the devices' workers.

A pass is a set of tasks (micro-batch i, chunk c). A task is *ready* once the tasks
it waits for are done: forward, the chunks whose values (or ordering) it needs;
backward, the chunks that read its values, whose gradients it needs. A ready task
goes to its device's ReadyQueue, and a device that finishes a task takes, of those
ready by then, the one of highest priority: the earliest micro-batch (backward: the
latest, GPipe's backward order), then the chunk's rank in graphs.schedule.pass_order
(chunks that hand work to another device first, then fx order; backward, its
reverse). Micro-batch first is what makes a pipeline: a stage cut into several
chunks hands micro-batch 0 on before it starts micro-batch 1 (first come first
served ran micro-batch 1's first chunk, ready from the start, before micro-batch 0's
second, and the next stage waited for the whole of it). On two devices the rule is
work-conserving (a device idles only when nothing of its own is ready); the
simulator (envs.sim) follows it.

Each task's completion is booked under one lock (counters of the tasks waiting on
it); a cross-device hand-off is one put on the other device's queue, which wakes
its worker. The caller's thread serves one device itself (the "inline" device) from
the pass's own queue, and learns there that the pass is done or failed.

A device is a slot, not a thread: whoever runs one of its tasks holds its `busy`
lock, so it runs one task at a time. When a task makes exactly one task ready, and
the thread that ran it has nothing of its own device waiting, the thread runs that
task itself if its device is idle and may be run from this thread (an unpinned
virtual CPU device of the same thread count, not the inline one, whose tasks are the
caller's: worker.Worker.shared_threads). A chain across devices then runs on one
thread with no wake-up per crossing (two thread wake-ups, forward and backward, were
most of a crossing's cost: docs/results.md), while devices with work of their own
still run in parallel. With three or more devices, work that reaches a device
while its thread runs another's waits for that task to end. Per-thread state of the
caller beyond grad mode and autocast (saved-tensor hooks, dispatch modes, profiler
ranges) reaches the chunks it runs: its own device's, and those it runs for others.
A pass with a time limit keeps the caller to its own device, so that it can watch.

No wait is unbounded: the caller polls its queue, checks that every worker is still
alive, and honours an optional time limit; a task that raises fails the pass, and
the caller waits for the workers to finish what they are running (a barrier behind
it in every queue) before it raises, so that a failed step leaves nothing running.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

from graphs.errors import ExecutionError
from placer.runtime.worker import ReadyQueue, Worker

__all__ = ["Pass", "task_keys", "POLL_S"]

POLL_S = 0.5  # how often a waiting caller checks on the workers
_DONE, _FAILED, _BARRIER = -1, -2, -3


class Pass:
    """Tasks (i, c), numbered i * C + c, over C chunks and `micro` micro-batches.

    `waits_for[c]`: the chunks chunk c waits for in this pass; `wakes[c]`: the chunks
    that wait for c, in the order they enter a queue when made ready at once;
    `initial`: the chunks that wait for nothing, in that order too. `key[k]`: task
    k's priority (lower first: `task_keys`). `chunk_workers[c]`:
    the worker of chunk c's device; the `inline` one's tasks come to the pass's own
    queue, served by the caller. `body(worker, i, c)` runs one task. `previous[c]`
    (forward passes): the chunks of micro-batch i - 1 that chunk c of micro-batch i
    waits for too (those touching a buffer the forward updates, so that micro-batches
    update it in turn, as eager runs them one after another)."""

    def __init__(self, waits_for: Sequence[Sequence[int]], wakes: Sequence[Sequence[int]], initial: Sequence[int],
                 key: Sequence[int], micro: int, reverse: bool, chunk_workers: Sequence[Worker],
                 inline: Worker | None, body: Callable[[Worker, int, int], None],
                 previous: Sequence[Sequence[int]] | None = None):
        self.c = len(waits_for)
        self.micro = micro
        previous = previous if previous and not reverse and micro > 1 else [()] * self.c
        self.pending = [len(w) + (len(previous[c]) if i else 0) for i in range(micro) for c, w in enumerate(waits_for)]
        self.next_wakes = [[c for c in range(self.c) if p in previous[c]] for p in range(self.c)]
        self.wakes = wakes
        self.remaining = self.c * micro
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.own = ReadyQueue()
        self.queues = [self.own if w is inline else w.queue for w in chunk_workers]
        self.chunk_workers = chunk_workers
        self.queues_of = {w: self.own if w is inline else w.queue for w in chunk_workers}
        # per chunk: the workers whose threads may run its task (module doc)
        takers = {w: {w, *(h for h in self.queues_of if w is not inline and w.shared_threads is not None
                           and h.shared_threads == w.shared_threads)} for w in self.queues_of}
        self.takers = [takers[w] for w in chunk_workers]
        self.inline = inline
        self.body = body
        self.key = key
        order = range(micro - 1, -1, -1) if reverse else range(micro)
        self._initial = [i * self.c + c for i in order for c in initial if not (i and previous[c])]

    def run(self, home: Worker, task: int, locked: bool = True) -> None:
        """Run one task of `home`'s device on its thread, then hand on what it made
        ready, running the one task it made ready itself where it may (module doc).
        Called holding home.busy (`locked`; else it is taken here); returns having
        released every device lock it took, also when interrupted (Ctrl-C)."""
        worker, own = home, self.queues_of.get(home)
        held = home.busy if locked or home.busy.acquire() else None
        try:
            while self.error is None:
                i, c = divmod(task, self.c)
                try:
                    self.body(worker, i, c)
                except BaseException as exc:  # raised in the caller as itself
                    self._fail(exc)
                    return
                ready = []
                base = i * self.c
                with self.lock:
                    pending = self.pending
                    for s in self.wakes[c]:
                        pending[base + s] -= 1
                        if pending[base + s] == 0:
                            ready.append(base + s)
                    if i + 1 < self.micro:
                        for s in self.next_wakes[c]:  # the next micro-batch's turn at a buffer
                            pending[base + self.c + s] -= 1
                            if pending[base + self.c + s] == 0:
                                ready.append(base + self.c + s)
                    self.remaining -= 1
                    done = self.remaining == 0
                held.release()
                held = None
                if len(ready) == 1 and not done and home in self.takers[ready[0] % self.c] \
                        and not own.ready and own.arrived.empty():  # nothing of its own waits
                    k = ready[0]
                    target = self.chunk_workers[k % self.c]
                    if target.busy.acquire(blocking=False):
                        held = target.busy
                        # its own thread moves what arrives into `ready` before it takes the lock (a snapshot:
                        # an item in between is taken after this task, which costs order, never correctness)
                        theirs = self.queues_of[target]
                        if not theirs.ready and theirs.arrived.empty():
                            task, worker = k, target
                            continue
                        held.release()
                        held = None
                key = self.key
                for k in ready:
                    self.queues[k % self.c].put((key[k], self, k))
                if done:
                    self.own.put((-1, self, _DONE))
                return
        finally:
            if held is not None:
                held.release()

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            first = self.error is None
            if first:
                self.error = exc
        if first:
            self.own.put((-1, self, _FAILED))

    def execute(self, workers: Sequence[Worker], timeout_s: float | None = None) -> None:
        """Start the pass, serve the inline device on this thread until every task is
        done, and return; raise the first task's exception if one failed, or
        ExecutionError if a worker died or the pass ran past `timeout_s`."""
        if not self._initial:
            return
        if timeout_s is not None:  # the caller runs its own device's tasks only, between which it watches the limit
            self.takers = [t - {self.inline} for t in self.takers]
        for k in self._initial:
            self.queues[k % self.c].put((self.key[k], self, k))
        begin = time.monotonic()
        try:
            while True:
                try:
                    self.own.wait(timeout=POLL_S)
                except queue.Empty:
                    _check(workers, begin, timeout_s)
                    continue
                _, owner, task = self.own.pop()
                if task >= 0:
                    owner.run(self.inline, task, locked=False)
                elif task == _DONE:
                    return
                elif task == _FAILED:
                    raise self.error
        except BaseException as exc:
            self._fail(exc)  # a Ctrl-C or a dead worker stops the pass too
            _quiesce(workers, timeout_s)
            raise


def task_keys(rank: Sequence[int], micro: int, reverse: bool) -> list[int]:
    """Each task's priority key (task k = micro-batch k // C, chunk k % C over C
    chunks): the micro-batch's place in the pass (backward: the latest first), then the
    chunk's `rank` (graphs.schedule.pass_order)."""
    c = len(rank)
    key = [0] * (c * micro)
    for place, i in enumerate(range(micro - 1, -1, -1) if reverse else range(micro)):
        for j, r in enumerate(rank):
            key[i * c + j] = place * c + r
    return key


def _check(workers: Sequence[Worker], begin: float, timeout_s: float | None) -> None:
    dead = [w.device.name for w in workers if not w.alive]
    if dead:
        raise ExecutionError(f"the worker of {dead[0]} died during a step; rebuild the placed model "
                             f"(placer.apply) to start new workers")
    if timeout_s is not None and time.monotonic() - begin > timeout_s:
        raise ExecutionError(f"a step ran past its limit of {timeout_s:g} s (Executor.timeout_s); "
                             f"raise the limit, or check the devices for a hang")


class _Barrier:
    def __init__(self):
        self.replies: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, worker: Worker, task: int) -> None:
        worker.busy.release()
        self.replies.put(task)


def _quiesce(workers: Sequence[Worker], timeout_s: float | None) -> None:
    """Wait until every live worker has finished what it was running."""
    barrier = _Barrier()
    live = [w for w in workers if w.alive]
    for w in live:
        w.queue.put((-1, barrier, _BARRIER))
    begin = time.monotonic()
    for _ in live:
        while True:
            try:
                barrier.replies.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not all(w.alive for w in live) or (timeout_s is not None and time.monotonic() - begin > timeout_s):
                    return
