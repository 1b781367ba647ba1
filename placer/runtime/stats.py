"""What timing a model's training steps found, and the statistics of step times.

A `Measurement` holds the median step time, its interquartile range, the confidence
interval of the median from order statistics (distribution-free: the k-th smallest
and k-th largest step, k from the binomial distribution) and the number of timed
steps, plus each device's peak memory; `summarize` makes one from step times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["CONFIDENCE", "Measurement", "busy_from_json", "median_ci", "summarize"]

CONFIDENCE = 0.95  # of every confidence interval placer reports


@dataclass
class Measurement:
    """What timing one model's training steps found.

    Attributes
    ----------
    feasible : False when the model could not run (memory, time limit, error): see reason.
    median_ms : median step time (ms); None when infeasible.
    iqr_ms : interquartile range of the step times (ms).
    ci_ms : (low, high) confidence interval of the median (ms), CONFIDENCE level.
    runs : timed steps behind the median.
    times_ms : every timed step (ms), in order.
    peak_bytes : device name -> peak bytes held.
    reason : why it is infeasible.
    notes : things the user should know (e.g. the loss is NaN).
    busy : when other processes held the cores its intra-op threads ran on while its
        timed steps ran (placer.runtime.host_load), what was found: {"others": cores
        they held on average over those steps, "cores": the cores the steps ran on,
        "steps": steps counted}, or where the steps could not tell, the load-average
        fallback's {"load": 1-minute load average, "cores", "own": this process's share
        of the load}; None when they did not (or nobody checked: one thread, a GPU).
    session : an id shared by the measurements of one interleaved session
        (placer.measurements.run_session), whose times_ms are then timed round by
        round side by side (placer.measurements.compare pairs them); None where not
        known (a measurement of its own, or one recorded before 2026-12-02).
    """

    feasible: bool
    median_ms: float | None = None
    iqr_ms: float | None = None
    ci_ms: tuple[float, float] | None = None
    runs: int = 0
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    busy: dict | None = None
    session: str | None = None

    def to_json(self) -> dict:
        """A dict of plain JSON values (ci_ms as a list)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["ci_ms"] = list(self.ci_ms) if self.ci_ms is not None else None
        data.update(times_ms=list(self.times_ms), peak_bytes=dict(self.peak_bytes), notes=list(self.notes),
                    busy=dict(self.busy) if self.busy is not None else None)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "Measurement":
        """Read `to_json`'s dict back; the CI and runs of an older entry are derived
        from its times.

        Raises
        ------
        ValueError
            The entry is damaged: not a dict, no `feasible`, or a feasible entry without
            a finite positive median_ms.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("feasible"), bool):
            raise ValueError("no 'feasible' flag")
        if not data["feasible"]:
            return cls(feasible=False, reason=str(data.get("reason") or "infeasible"),
                       peak_bytes={str(k): int(v) for k, v in (data.get("peak_bytes") or {}).items()})
        median = data.get("median_ms")
        if not isinstance(median, (int, float)) or isinstance(median, bool) or not math.isfinite(median) or median <= 0:
            raise ValueError(f"median_ms is {median!r}, not a positive number")
        times = [float(t) for t in data.get("times_ms") or []]
        if not all(math.isfinite(t) and t > 0 for t in times):
            raise ValueError("times_ms holds a value that is not a positive number")
        ci = data.get("ci_ms")
        if ci is not None and not (isinstance(ci, (list, tuple)) and len(ci) == 2):
            raise ValueError(f"ci_ms is {ci!r}, not [low, high]")
        return cls(feasible=True, median_ms=float(median), iqr_ms=_float_or_none(data.get("iqr_ms")),
                   ci_ms=(float(ci[0]), float(ci[1])) if ci is not None else (median_ci(times) if times else None),
                   runs=int(data.get("runs") or len(times)), times_ms=times,
                   peak_bytes={str(k): int(v) for k, v in (data.get("peak_bytes") or {}).items()},
                   notes=[str(n) for n in data.get("notes") or []], busy=busy_from_json(data.get("busy")),
                   session=str(data["session"]) if data.get("session") else None)

    @property
    def ci_halfwidth(self) -> float | None:
        """Half the CI's width relative to the median (0.03 is +-3%); None when unknown."""
        if not self.feasible or self.ci_ms is None or not self.median_ms:
            return None
        return (self.ci_ms[1] - self.ci_ms[0]) / 2 / self.median_ms


def busy_from_json(value: object) -> dict | None:
    """A saved `busy` field back: the direct reading ({"others", "cores", "steps"}) or the
    load average's ({"load", "cores", "own"}, also every file written before the direct
    reading); None for null or anything damaged."""
    if not isinstance(value, Mapping):
        return None
    cores = _int_or_none(value.get("cores")) or 1
    if (others := _float_or_none(value.get("others"))) is not None:
        steps = _int_or_none(value.get("steps"))
        return {"others": others, "cores": cores, **({"steps": steps} if steps is not None else {})}
    if (load := _float_or_none(value.get("load"))) is None:
        return None
    own = _float_or_none(value.get("own"))
    return {"load": load, "cores": cores, **({"own": own} if own is not None else {})}


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def median_ci(times: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of `times`.

    The interval [x_(k), x_(n+1-k)] of the sorted times covers the true median with
    probability 1 - 2 P(Binomial(n, 1/2) < k); k is the largest rank for which that is
    at least `confidence`. Below 6 samples no rank reaches 95%: the interval is then
    [min, max] (its coverage, 1 - 2^(1-n), is what the data allow).

    Parameters
    ----------
    times : step times (any unit; the interval is in the same unit), at least one.
    confidence : the interval's coverage, in (0, 1).

    Returns
    -------
    (low, high)

    Raises
    ------
    ValueError
        No times.

    Examples
    --------
    >>> median_ci([float(t) for t in range(1, 21)])
    (6.0, 15.0)
    """
    if not len(times):
        raise ValueError("no times to summarize")
    ordered = sorted(float(t) for t in times)
    n = len(ordered)
    tail, k = 0.0, 0
    while k < n // 2:  # P(X <= k) for X ~ Binomial(n, 1/2), while both tails stay within 1 - confidence
        tail += math.comb(n, k) / 2.0 ** n
        if 2 * tail > 1 - confidence:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def summarize(times_ms: Sequence[float], peak_bytes: Mapping[str, int] | None = None,
              notes: Sequence[str] = (), confidence: float = CONFIDENCE) -> Measurement:
    """A feasible Measurement of `times_ms` (at least one): median, IQR, CI, runs."""
    q1, median, q3 = np.percentile(times_ms, [25, 50, 75])
    return Measurement(feasible=True, median_ms=float(median), iqr_ms=float(q3 - q1),
                       ci_ms=median_ci(times_ms, confidence), runs=len(times_ms), times_ms=[float(t) for t in times_ms],
                       peak_bytes=dict(peak_bytes or {}), notes=list(notes))
