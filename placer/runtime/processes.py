"""The processes placer starts (measurement pool workers, local ranks): forked from a
server that has imported torch and placer once (multiprocessing's forkserver), so a new
process is ready in a fraction of a second instead of the 5-7 s a spawned interpreter
spends importing them (a pool replacing a hung worker, the ranks of every launch).

A forkserver child is the server's child, not its starter's. `process` hands it the
starter's environment variables and CPU affinity as they are at its start, as a spawned
child would have them; what the server took when it started stays the server's: the
standard streams (a redirect made later does not reach the children), settings read at
import (libgomp's OMP_* variables, TORCH_LOGS), nice and resource limits. It dies with
the server (the kernel's parent-death signal on Linux, else a watchdog), and the server
ends when the process that started it ends (multiprocessing.forkserver; once each child
has closed the copy of the starter's "alive" pipe it is handed), so no child outlives
its starter. Targets and their arguments must be picklable, as with spawn.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """The forkserver context, its server to import `preload` (module names) besides what
    was asked before (a user's list kept, but its "__main__": placer's children need not
    run the main script's imports) when it starts: at the first child of the process."""
    ctx = multiprocessing.get_context("forkserver")
    before = getattr(multiprocessing.forkserver._forkserver, "_preload_modules", [])
    ctx.set_forkserver_preload(list(dict.fromkeys([*preload, *(m for m in before if m != "__main__")])))
    return ctx


def process(ctx: multiprocessing.context.BaseContext, target: Callable[..., None], args: tuple,
            name: str) -> multiprocessing.process.BaseProcess:
    """A daemon Process of `ctx` that runs `target(*args)` with this process's environment
    and CPU affinity as they are now, and dies with the server it is forked from."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return ctx.Process(target=_child, args=(dict(os.environ), cores, target, args), daemon=True, name=name)


def start(child: multiprocessing.process.BaseProcess) -> None:
    """Start `child` ignoring Ctrl-C from its birth where this is the main thread (signal
    handlers can only be set there): a terminal's Ctrl-C reaches the whole process group,
    and a process still starting would die of it with a traceback; its starter stops it.
    A server started now ignores Ctrl-C too, and so does every child it forks."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        child.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _child(environ: dict[str, str], cores: list[int] | None, target: Callable[..., None], args: tuple) -> None:
    # The server ends when every holder of its starter's "alive" pipe has closed it, and each child
    # is handed one: closed here, the server (and with it this child) ends with the starter.
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    die_with_parent(os.getppid())
    os.environ.clear()
    os.environ.update(environ)
    if cores is not None:
        os.sched_setaffinity(0, cores)
    target(*args)


def die_with_parent(parent: int) -> None:
    """End this process when `parent` ends: the kernel's parent-death signal on Linux
    (for a forkserver child, the server, whose one thread forked it), else a watchdog
    thread polling the parent's pid."""
    if sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG,
                                                                                     signal.SIGKILL) == 0:
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="placer-parent-watchdog", daemon=True).start()
