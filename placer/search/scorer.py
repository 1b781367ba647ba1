"""`SimulatedScorer`: a Scorer on the simulator, for tests, experiments and simulator-only searches.

placer.optimize has its own Scorer over the measurement protocol; this one scores with
envs.sim.Simulator and, when given a `measure` function, measures through it and refits
the simulator's calibration (envs.calibrate) to every feasible measurement so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from envs.calibrate import fit_calibration
from envs.sim import Calibration, Simulator
from graphs.problem import Candidate, PlacementProblem

__all__ = ["SimulatedScorer"]

MeasureFn = Callable[[Candidate], "float | None"]


class SimulatedScorer:
    """Scorer (placer.search.Scorer) over a simulator.

    Parameters
    ----------
    problem : the placement problem.
    calibration : the simulator's; None: the nominal one.
    measure : a candidate's measured step time (ms; None when infeasible); None: this
        scorer cannot measure (then give the search measure_top_k=0).
    """

    def __init__(self, problem: PlacementProblem, calibration: Calibration | None = None,
                 measure: MeasureFn | None = None):
        self.problem = problem
        self.simulator = Simulator(problem, calibration)
        self._measure = measure
        self.measured: dict[Candidate, float] = {}  # feasible measurements, what refit fits
        self.refits = 0

    def score(self, candidates: Sequence[Candidate]) -> list[float]:
        """Simulated step time of each candidate, ms; inf where infeasible."""
        times = []
        for c in candidates:
            result = (self.simulator.simulate(c.placement) if c.microbatches == 1
                      else self.simulator.simulate(c.placement, microbatches=c.microbatches))
            times.append(result.step_ms if result.feasible else math.inf)
        return times

    def measure(self, candidates: Sequence[Candidate], limit_s: float | None = None,
                afresh: bool = False) -> list[float | None]:
        """Each candidate's measured step time through `measure`, ms; None where infeasible.
        `limit_s` is not needed: a measure function is one call per candidate, not a
        session that could be cut short; nor is `afresh`: every call measures afresh.

        Raises RuntimeError when this scorer was made without a measure function."""
        if self._measure is None:
            raise RuntimeError("this SimulatedScorer cannot measure: give it measure=..., or search with "
                               "measure_top_k=0")
        times = []
        for c in candidates:
            ms = self._measure(c)
            times.append(None if ms is None or not math.isfinite(ms) else float(ms))
            if times[-1] is not None:
                self.measured[c] = times[-1]
        return times

    def refit(self) -> None:
        """Fit the simulator to every feasible measurement so far, pipelined ones included
        (kept as it is with fewer than two)."""
        pairs = list(self.measured.items())
        if len(pairs) < 2:
            return
        candidates, times = zip(*pairs)
        calibration = fit_calibration(self.problem, candidates, times, initial=self.simulator.calibration)
        self.simulator = Simulator(self.problem, calibration)
        self.refits += 1
