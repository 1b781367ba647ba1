"""Whether other processes held the cores while a model that runs torch's intra-op threads was timed.

An OpenMP team waits for every thread at each parallel op, so while other processes
hold some of its cores a step can take 10-100x its idle time (trial 2: an unplaced
model at 806 ms beside a one-core plan's 11.5 ms), while a plan that runs one thread
per device barely notices. A measurement taken so is no reference (placer.choose
rule 7).

The direct reading (`ContentionMeter`): around each timed step of such a trial, the
CPU time the host's cores that the step runs on spent on any process (psutil's
per-CPU times, /proc/stat on Linux) less this process's own CPU time, summed over
exactly that trial's steps (an interleaved session times other trials between them:
those windows are not counted) and divided by the steps' wall time: the cores other
processes held while it ran. Held is more than `OTHERS_LIMIT` (half a core) on
average: a team of one thread per core stalls at a barrier whenever any of its
threads is off its core, so what matters is how much other work ran on the team's
cores, whatever their number; at half a core a thread of the team is descheduled
about half the time, a slowdown (typically 1.5x and more) that a one-core-per-device
plan, which waits for nobody, does not share. A burst during the steps counts in
full; a burst between them, none.

The host's CPU counters advance in clock ticks (10 ms), so over steps of a few ms
the reading is noisy: it decides only when it is above or below the limit by more
than twice its counting error. Where it cannot (too few, too short steps) or the
host has no per-CPU times, the fallback is the 1-minute load average less this
process's own share (`busy_host`), as before: it lags short bursts.

Tests: $PLACER_LOAD_AVERAGE replaces the whole check by the load-average rule on
that number (the suite sets 0: an idle host); $PLACER_OTHER_CORES makes the direct
reading see other processes holding that many cores in every step, exactly.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

from graphs.errors import PlacerError

__all__ = ["load_average", "own_load", "busy_host", "LOAD_WINDOW_S", "OTHERS_LIMIT", "Counters", "read_counters",
           "ContentionMeter", "busy_cause", "busy_note"]

LOAD_WINDOW_S = 60.0  # the load average's window: this process's share is measured over as long
OTHERS_LIMIT = 0.5  # cores other processes may hold on average over the timed steps (module docstring)
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and "SC_CLK_TCK" in os.sysconf_names else 0.01
_NOT_BUSY = ("idle", "iowait", "steal", "guest", "guest_nice")  # psutil fields that are no process's time here


def _env_number(name: str) -> float | None:
    """$name as a number, None when unset.

    Raises
    ------
    PlacerError
        It is set but not a finite number.
    """
    given = os.environ.get(name)
    if given is None:
        return None
    try:
        value = float(given)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PlacerError(f"{name}={given!r} is not a number: unset it, or give one")
    return value


def load_average() -> float | None:
    """The host's 1-minute load average (runnable threads), None where the OS cannot say;
    $PLACER_LOAD_AVERAGE, when set, instead (the test suite sets 0, so that no verdict of
    a placer it starts depends on other work on the host).

    Raises
    ------
    PlacerError
        $PLACER_LOAD_AVERAGE is not a number.
    """
    given = _env_number("PLACER_LOAD_AVERAGE")
    if given is not None:
        return given
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
    """The fallback rule: {"load", "cores", "own"} when the other processes' load (the
    load average less this process's own share) holds more than half of `cores`, and at
    least one, of the cores a step runs intra-op threads on; else None (and None where
    the OS has no load average)."""
    load = load_average()
    if load is None:
        return None
    own = own_load()
    others = load - own
    return {"load": round(load, 2), "cores": cores, "own": round(own, 2)} if others > max(1.0, cores / 2) else None


@dataclass(frozen=True)
class Counters:
    """One reading of the clocks a window is measured with (seconds).

    Attributes
    ----------
    wall_s : a monotonic clock.
    host_s : CPU time the cores spent on any process since boot.
    own_s : this process's CPU time (every thread).
    tick_s : the resolution of host_s's counters per core (0: exact).
    """

    wall_s: float
    host_s: float
    own_s: float
    tick_s: float


def read_counters(cores: Sequence[int]) -> Counters | None:
    """The counters over `cores` (CPU indices; empty: every core), None where the host
    has no per-CPU times."""
    try:
        per_cpu = psutil.cpu_times(percpu=True)
    except (OSError, RuntimeError, NotImplementedError):
        return None
    if not per_cpu or any(c >= len(per_cpu) for c in cores):  # CPUs offline: indices are no CPU numbers then
        return None
    chosen = [per_cpu[c] for c in cores] if cores else per_cpu
    busy = sum(sum(times) - sum(getattr(times, name, 0.0) for name in _NOT_BUSY) for times in chosen)
    return Counters(time.monotonic(), busy, time.process_time(), _TICK_S)


def _injected(others: float) -> Callable[[Sequence[int]], Counters]:
    """Counters in which other processes hold `others` cores all the time ($PLACER_OTHER_CORES)."""
    def read(cores: Sequence[int]) -> Counters:
        wall, own = time.monotonic(), time.process_time()
        return Counters(wall, own + others * wall, own, 0.0)

    return read


class ContentionMeter:
    """The cores other processes held while a trial's timed steps ran (module docstring).

    Each step runs inside `window()`; `busy(fallback)` judges the windows so far.

    Parameters
    ----------
    cores : the CPU indices the steps run on (empty: every core of the host).
    read : the counters (fake ones in tests); default: the host's, read_counters, or
        under $PLACER_OTHER_CORES an exact injection, or under $PLACER_LOAD_AVERAGE none
        (the fallback decides alone).

    Raises
    ------
    PlacerError
        $PLACER_OTHER_CORES or $PLACER_LOAD_AVERAGE is not a number.
    """

    def __init__(self, cores: Sequence[int], read: Callable[[Sequence[int]], Counters | None] | None = None):
        self.cores = tuple(cores)
        self.n_cores = len(self.cores) or psutil.cpu_count() or 1
        if read is None and (injected := _env_number("PLACER_OTHER_CORES")) is not None:
            read = _injected(injected)
        elif read is None and _env_number("PLACER_LOAD_AVERAGE") is None:  # set, it replaces the whole check
            read = read_counters
        self.read = read
        self.steps, self.wall_s, self.others_s, self.variance_s2 = 0, 0.0, 0.0, 0.0
        self.unreadable = read is None

    @contextmanager
    def window(self) -> Iterator[None]:
        """Count what runs while the block runs (one timed step)."""
        start = self.read(self.cores) if self.read is not None else None
        try:
            yield
        finally:
            end = self.read(self.cores) if start is not None else None
            if end is None:
                self.unreadable = True
            else:
                self._count(end.wall_s - start.wall_s, (end.host_s - start.host_s) - (end.own_s - start.own_s),
                            end.tick_s)

    def _count(self, wall_s: float, others_s: float, tick_s: float) -> None:
        self.steps += 1
        self.wall_s += wall_s
        self.others_s += others_s
        if tick_s > 0:  # each core's count is off by up to a tick at the ends, and samples what runs between
            self.variance_s2 += self.n_cores / 4 * max(1.0, wall_s / tick_s) * tick_s ** 2

    @property
    def others(self) -> float | None:
        """Cores other processes held on average over the windows (None: none counted)."""
        return max(0.0, self.others_s / self.wall_s) if self.steps and not self.unreadable and self.wall_s > 0 \
            else None

    def decided(self) -> bool:
        """Whether the windows tell held from not held: the average is off the limit by
        more than twice its counting error."""
        if self.others is None:
            return False
        return abs(self.others_s / self.wall_s - OTHERS_LIMIT) > 2 * math.sqrt(self.variance_s2) / self.wall_s

    def busy(self, fallback: Callable[[int], dict | None]) -> dict | None:
        """{"others": cores held on average, "cores": the cores the steps ran on, "steps":
        windows counted} when other processes held more than OTHERS_LIMIT; None when they
        held less; where the windows cannot tell, `fallback(cores)` (busy_host)."""
        if not self.decided():
            return fallback(self.n_cores)
        others = self.others
        return {"others": round(others, 2), "cores": self.n_cores, "steps": self.steps} if others > OTHERS_LIMIT \
            else None


def busy_cause(busy: Mapping) -> str:
    """What a `busy` reading found, as a clause: "other processes held 1.6 of the 2
    cores" (the direct reading) or "the host was busy (load 3.8 on 2 cores, ...)" (the
    load average)."""
    if "others" in busy:
        return f"other processes held {busy['others']:.1f} of the {busy['cores']} cores"
    own = f", {busy['own']:.1f} of it placer's own" if "own" in busy else ""
    return f"the host was busy (load {busy['load']:.1f} on {busy['cores']} cores{own})"


def busy_note(label: str, busy: Mapping) -> str:
    """The note of a trial timed while `busy`: no number but the cores, so that the
    sessions of one run that found it say it once (the headline gives the reading;
    placer.choose drops the note when the row is measured afresh)."""
    return (f"{label}: the host was busy while it was timed (other processes held some of its {busy['cores']} "
            f"cores): torch's intra-op threads wait for each other at every parallel op, so with other processes "
            f"on their cores a step can take 10-100x longer than on an idle host; measure on an idle host")
