"""The exact simulated optimum of a problem small enough to enumerate.

Every candidate a search could propose is a device for each colocation set (a group
that shares parameters with others follows its set's first member, as every search
places it) and a micro-batch count: devices ** sets * counts of them. Where that is
at most `limit` (2**20 by default: 18 sets on 2 devices at 4 counts, about three
minutes of the simulator on one core), `optimum` scores every one and returns the
fastest, the yardstick that tells whether a search that ties the warm start left
anything to find.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from graphs.problem import Candidate, PlacementProblem
from placer.search.config import microbatch_options

if TYPE_CHECKING:  # placer.search imports this module
    from placer.search import Scorer

__all__ = ["LIMIT", "Optimum", "candidate_count", "optimum"]

LIMIT = 2 ** 20


class Optimum(NamedTuple):
    """The fastest candidate (None: nothing feasible), its simulated step time (ms; inf
    when nothing is feasible) and how many candidates were scored."""

    best: Candidate | None
    ms: float
    candidates: int


def candidate_count(problem: PlacementProblem, options: Sequence[int]) -> int:
    """How many distinct candidates the problem has: devices ** colocation sets * len(options)."""
    return problem.n_devices ** len(set(problem.colocation_leader)) * len(options)


def optimum(problem: PlacementProblem, scorer: Scorer, options: Sequence[int] | None = None, limit: int = LIMIT,
            chunk: int = 4096) -> Optimum | None:
    """Score every candidate of `problem` with `scorer` (placer.search.Scorer) and return the
    fastest (the first in enumeration order among equals); None when there are more than
    `limit` candidates.

    Parameters
    ----------
    options : the micro-batch counts to enumerate; None: every count the profile allows
        (microbatch_options).
    limit : the most candidates scored.
    chunk : placements scored per call of `scorer.score` (memory: chunk * groups ints).
    """
    options = tuple(options or microbatch_options(problem))
    if candidate_count(problem, options) > limit:
        return None
    leader = np.asarray(problem.colocation_leader)
    sets = np.unique(leader)
    column = np.searchsorted(sets, leader)  # group -> the column of its set's device
    d, n_sets = problem.n_devices, len(sets)
    powers = d ** np.arange(n_sets, dtype=np.int64)
    total = d ** n_sets
    best, best_ms = None, math.inf
    for start in range(0, total, chunk):
        codes = np.arange(start, min(start + chunk, total), dtype=np.int64)
        placements = ((codes[:, None] // powers) % d)[:, column].tolist()  # [chunk, groups]
        for m in options:
            batch = [Candidate(tuple(p), m) for p in placements]
            times = scorer.score(batch)
            i = int(np.argmin(times))
            if times[i] < best_ms:
                best, best_ms = batch[i], float(times[i])
    return Optimum(best, best_ms, total * len(options))
