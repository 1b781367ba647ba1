"""Whether the host is too busy to time a model that runs torch's intra-op threads.

An OpenMP team waits for every thread at each parallel op, so while other processes
hold some of its cores a step can take 10-100x its idle time (trial 2: an unplaced
model at 806 ms beside a one-core plan's 11.5 ms), while a plan that runs one thread
per device barely notices. A measurement taken so is no reference (placer.choose
rule 7).

The host's 1-minute load average counts this process too (its worker threads, the
unplaced model's own team), so its own share, the cores it kept busy over about the
last minute (its CPU seconds over wall seconds), is taken off: what is left is the
other processes' load.
"""

from __future__ import annotations

import os
import time

from graphs.errors import PlacerError

__all__ = ["load_average", "own_load", "busy_host", "LOAD_WINDOW_S"]

LOAD_WINDOW_S = 60.0  # the load average's window: this process's share is measured over as long


def load_average() -> float | None:
    """The host's 1-minute load average (runnable threads), None where the OS cannot say;
    $PLACER_LOAD_AVERAGE, when set, instead (the test suite sets 0, so that no verdict of
    a placer it starts depends on other work on the host).

    Raises
    ------
    PlacerError
        $PLACER_LOAD_AVERAGE is not a number.
    """
    given = os.environ.get("PLACER_LOAD_AVERAGE")
    if given is not None:
        try:
            return float(given)
        except ValueError:
            raise PlacerError(f"PLACER_LOAD_AVERAGE={given!r} is not a number: unset it, or give one") from None
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


_samples: list[tuple[float, float]] = [(time.monotonic(), _cpu_s())]  # (monotonic s, this process's CPU s)


def own_load() -> float:
    """The cores this process kept busy on average over about the last LOAD_WINDOW_S
    seconds (since placer.runtime loaded, when that is more recent)."""
    now, cpu = time.monotonic(), _cpu_s()
    _samples.append((now, cpu))
    while len(_samples) > 2 and now - _samples[1][0] >= LOAD_WINDOW_S:
        _samples.pop(0)
    then, cpu_then = _samples[0]
    return max(0.0, (cpu - cpu_then) / max(now - then, 1e-3))


def busy_host(cores: int) -> dict | None:
    """{"load", "cores", "own"} when the other processes' load (the load average less
    this process's own share) holds more than half of `cores`, and at least one, of the
    cores a step runs intra-op threads on; else None (and None where the OS has no load
    average)."""
    load = load_average()
    if load is None:
        return None
    own = own_load()
    others = load - own
    return {"load": round(load, 2), "cores": cores, "own": round(own, 2)} if others > max(1.0, cores / 2) else None
