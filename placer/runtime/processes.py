"""The processes placer starts (measurement pool workers, local ranks): forked from a
server that has imported torch and placer once (multiprocessing's forkserver), so a new
process is ready in a fraction of a second instead of the 5-7 s a spawned interpreter
spends importing them (a pool replacing a hung worker, the ranks of every launch).

A forkserver child is the server's child, not its starter's: it would inherit the
environment and CPU affinity the starter had when the server started. `start` hands it
the starter's current ones, as a spawned child has them. It dies with the server (the
kernel's parent-death signal on Linux, else a watchdog), and the server ends when the
process that started it ends (multiprocessing.forkserver; once each child has closed
the copy of the starter's "alive" pipe it is handed), so no child outlives its starter. Targets and their arguments must be picklable, as with spawn.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    """The forkserver context; `preload` (module names) is imported by the server when it
    starts, which the first child of the process does (a later call's list is ignored)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def process(ctx: multiprocessing.context.BaseContext, target: Callable[..., None], args: tuple,
            name: str) -> multiprocessing.process.BaseProcess:
    """A daemon Process of `ctx` that runs `target(*args)` with this process's environment
    and CPU affinity as they are now, and dies with the server it is forked from."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return ctx.Process(target=_child, args=(dict(os.environ), cores, target, args), daemon=True, name=name)


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
    libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if libc is not None and ctypes.CDLL(libc, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="placer-parent-watchdog", daemon=True).start()

