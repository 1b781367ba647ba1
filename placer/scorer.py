"""The Scorer a search is given (seam 5): simulated scores, real measurements, refits.

A search proposes candidates; it never touches the simulator, the runtime or the
measurement book itself. It asks the Scorer:

- `score(candidates)`: simulated step times (ms, inf when infeasible) under the
  current calibration; with reward "measure", measured medians instead (the paper's
  setting, every reward a real measurement), in a session that ends by the search's
  budget (`begin`) once each candidate has min_runs steps;
- `measure(candidates, limit_s)`: measured medians (ms, None when infeasible), through the
  measurement protocol and the book (placer.measurements.Measurer), in a session that
  ends by `limit_s` seconds (the search's budget left) once each has min_runs steps;
- `refit()`: recalibrate the simulator from every feasible measurement so far.

It also keeps what makes the learning curve truthful: each refit, and each time the
best measurement improved, stamped with the search's progress (`on_round` is given
every curve row as the search reports it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from envs.calibrate import fit_calibration, save_calibration
from envs.sim import Calibration, SimResult, Simulator
from graphs.problem import Candidate, PlacementProblem
from placer.book import candidate_key
from placer.measurements import Measurer
from placer.results import warn_stderr
from placer.runtime.timing import Measurement

__all__ = ["Scorer", "as_candidate"]


def as_candidate(candidate: Candidate | Sequence[int]) -> Candidate:
    """A Candidate from a Candidate or a bare placement (one micro-batch)."""
    return candidate if isinstance(candidate, Candidate) else Candidate(tuple(int(d) for d in candidate))


class Scorer:
    """Scores candidates of `problem` for a search (module docstring).

    Parameters
    ----------
    problem : the placement problem searched.
    measurer : measures candidates under the protocol, keeping them in its book.
    calibration : the simulator's starting calibration (None: the default).
    reward : "sim" (score by the simulator) or "measure" (score by measurement).
    warn : told one line when something is only a warning (a calibration not saved).

    Raises
    ------
    ValueError
        An unknown reward.
    """

    def __init__(self, problem: PlacementProblem, measurer: Measurer, calibration: Calibration | None = None,
                 reward: str = "sim", warn: Callable[[str], None] = warn_stderr):
        if reward not in ("sim", "measure"):
            raise ValueError(f"unknown reward {reward!r}: use 'sim' or 'measure'")
        self.problem, self.measurer, self.reward, self.warn = problem, measurer, reward, warn
        self.simulator = Simulator(problem, calibration)
        self.refits: list[dict] = []  # one mark per refit: the curve row it happened in
        self.best_measured: list[dict] = []  # one mark per improvement of the best measurement
        self._last_row: dict = {}
        self._unstamped: list[dict] = []  # marks made since the last curve row
        self._best: Measurement | None = None
        self._deadline: float | None = None  # time.monotonic() at which the search's budget ends

    # -- the three calls a search makes ----------------------------------------------

    def simulate(self, candidate: Candidate | Sequence[int], timeline: bool = False) -> SimResult:
        """The simulator's result for one candidate under the current calibration."""
        c = as_candidate(candidate)
        return self.simulator.simulate(c.placement, microbatches=c.microbatches, timeline=timeline)

    def score(self, candidates: Sequence[Candidate | Sequence[int]]) -> list[float]:
        """Step time of each candidate in ms (inf when infeasible): simulated, or measured
        with reward "measure"."""
        if self.reward == "measure":
            left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            return [math.inf if ms is None else ms for ms in self.measure(candidates, left)]
        results = [self.simulate(c) for c in candidates]
        return [r.step_ms if r.feasible else math.inf for r in results]

    def measure(self, candidates: Sequence[Candidate | Sequence[int]], limit_s: float | None = None,
                afresh: bool = False) -> list[float | None]:
        """Measured median step time of each candidate in ms (None when infeasible),
        measuring together those the book lacks (Ctrl-C propagates, what was timed kept),
        or with `afresh` every one, side by side in a new session that the book does not
        keep (Measurer.session: the book keeps each candidate's first measurement, which
        the refits fit), in a session of at most `limit_s` seconds past its min_runs steps
        (Measurer.limited; None: the protocol's cap)."""
        batch = [as_candidate(c) for c in candidates]
        with self.measurer.limited(limit_s):
            if afresh:
                session = self.measurer.session([(candidate_key(c), c) for c in batch], "search: closing session")
                results = [session[candidate_key(c)] for c in batch]
            else:
                results = self.measurer.measure(batch, stage="search: measuring")
        for result in results:
            if result.feasible and (self._best is None or result.median_ms < self._best.median_ms):
                self._best = result
                self._mark(self.best_measured, {"median_ms": result.median_ms,
                                                "ci_ms": list(result.ci_ms) if result.ci_ms else None})
        return [r.median_ms if r.feasible else None for r in results]

    def refit(self) -> None:
        """Recalibrate the simulator from every feasible measurement in the book, pipelined
        ones included (envs.calibrate.fit_calibration); kept as is with fewer than two."""
        pairs = [(c, m.median_ms) for c, m in self.measurer.book.feasible()]
        if len(pairs) < 2:
            return
        calibration = fit_calibration(self.problem, [c for c, _ in pairs], [ms for _, ms in pairs],
                                      initial=self.simulator.calibration)
        try:
            save_calibration(self.problem, calibration)
        except OSError as exc:
            self.warn(f"calibration not cached ({exc.strerror or exc}: {exc.filename or ''}); it is used in this run")
        self.simulator = Simulator(self.problem, calibration)
        self._mark(self.refits, {"measurements": len(pairs)})

    # -- the learning curve ------------------------------------------------------------

    def begin(self, budget_s: float | None = None) -> None:
        """A new search of `budget_s` seconds (None: no limit on measured rewards)
        starts: its best measurement and its rows start afresh (the calibration and the
        book carry over)."""
        self._best, self._last_row, self._unstamped = None, {}, []
        self._deadline = None if budget_s is None else time.monotonic() + budget_s

    def on_round(self, row: dict) -> dict:
        """Note a search's curve row: the refits and best measurements made during its
        round are stamped with its round, samples and seconds. Returns the row with
        `calibration` (refits so far: the calibration its simulated times are under)
        and the best measurement's CI `best_measured_ci_ms`."""
        self._last_row = dict(row)
        self.finish()
        best = self._best
        return {**row, "calibration": len(self.refits),
                "best_measured_ci_ms": list(best.ci_ms) if best is not None and best.ci_ms else None}

    def finish(self) -> None:
        """Stamp the marks made since the last row with it (the search's final
        measurements come after its last row)."""
        stamp = {key: self._last_row.get(key) for key in ("method", "update", "samples", "elapsed_s")
                 if key in self._last_row}
        for mark in self._unstamped:
            mark.update(stamp)
        self._unstamped = []

    def _mark(self, marks: list[dict], mark: dict) -> None:
        marks.append(mark)
        self._unstamped.append(mark)
