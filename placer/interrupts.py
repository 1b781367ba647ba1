"""Ctrl-C and SIGTERM: both stop a run the same way, keeping what was done.

`handle_stop_signals()` makes SIGTERM (what `timeout`, `kill`, Slurm and
`docker stop` send) raise `Terminated`, a KeyboardInterrupt, in the main thread, so
every stage that saves its work on Ctrl-C does the same on SIGTERM; the CLI then
says "terminated" and exits 143 instead of "interrupted" and 130. A second Ctrl-C
(or SIGTERM) while the first is being handled means "stop now": the process says so
in one line and exits at once, without the tracebacks that an interrupt inside
cleanup code (finalizers, atexit) would print.

`deferred()` holds both signals back while a few files are swapped in together: a
signal arriving then takes effect right after, so the files of one run are never
left half old and half new.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "handle_stop_signals", "interruption", "deferred", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled wherever Ctrl-C is, reported as "terminated"."""


_received = {"SIGTERM": False, "count": 0}


def _stop(signum: int, frame: object) -> None:
    _received["count"] += 1
    terminated = signum == signal.SIGTERM
    _received["SIGTERM"] = _received["SIGTERM"] or terminated
    if _received["count"] > 1:  # the second: stop now, quietly
        os.write(2, b"\nterminated\n" if _received["SIGTERM"] else b"\ninterrupted\n")
        os._exit(EXIT_TERMINATED if _received["SIGTERM"] else EXIT_INTERRUPTED)
    raise Terminated() if terminated else KeyboardInterrupt()


def interruption() -> KeyboardInterrupt:
    """The exception that stands for how this run was stopped: Terminated once a
    SIGTERM came (also when a stage caught it as a KeyboardInterrupt), else a
    KeyboardInterrupt."""
    return Terminated() if _received["SIGTERM"] else KeyboardInterrupt()


def handle_stop_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated in the main thread (call
    from it); a second of either exits at once (130 or 143) with one line."""
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on the first one that came.

    Outside the main thread (where handlers cannot be set) it holds nothing back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in before:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if received:
            handler = before[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL and received[0] == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])
