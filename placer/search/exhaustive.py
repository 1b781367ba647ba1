"""Every candidate of a problem small enough to enumerate: the exact simulated optimum,
and the search every method runs where the space is no larger than its sample budget.

Every candidate a search could propose is a device for each colocation set (a group
that shares parameters with others follows its set's first member, as every search
places it) and a micro-batch count: devices ** sets * counts of them.

- `optimum` scores every one, where that is at most `limit` (2**20 by default: 18 sets
  on 2 devices at 4 counts, about three minutes of the simulator on one core), and
  returns the fastest: the yardstick that tells whether a search that ties the warm
  start left anything to find.
- `exhaustive_search` is what `placer.search.run` runs, for any method, when the space
  has no more candidates than the search may sample (`enumerates`): sampling it would
  draw the same few candidates again and again (rnnlm-medium on 2 devices has 64;
  random search's 1,500 samples drew each about 20 times, while RL's policy settled on
  a few of them), and scoring each once costs less than the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from graphs.problem import Candidate, PlacementProblem
from placer.search.config import SearchConfig, microbatch_options
from placer.search.state import SearchResult, search_loop

if TYPE_CHECKING:  # placer.search imports this module
    from placer.search import Scorer

__all__ = ["LIMIT", "SMALL", "Optimum", "candidate_count", "candidates", "enumerates", "optimum",
           "exhaustive_search"]

LIMIT = 2 ** 20
SMALL = 4096
"""Without a sample budget (a time budget alone), a space of at most this many candidates is
enumerated: a few seconds of the simulator, inside any budget worth searching with."""


class Optimum(NamedTuple):
    """The fastest candidate (None: nothing feasible), its simulated step time (ms; inf
    when nothing is feasible) and how many candidates were scored."""

    best: Candidate | None
    ms: float
    candidates: int


def candidate_count(problem: PlacementProblem, options: Sequence[int]) -> int:
    """How many distinct candidates the problem has: devices ** colocation sets * len(options)."""
    return problem.n_devices ** len(set(problem.colocation_leader)) * len(options)


def candidates(problem: PlacementProblem, options: Sequence[int], chunk: int = 4096) -> Iterator[list[Candidate]]:
    """Every candidate of `problem` at the micro-batch counts `options`, in lists of at most
    `chunk` (memory: chunk * groups ints): the placements in the order of their devices read
    as a number in base n_devices (the first colocation set's the lowest digit), each
    placement's chunk at every count in turn.

    >>> import networkx as nx
    >>> from graphs.devices import parse_cluster
    >>> g = nx.DiGraph(colocate=[[0, 2]]); g.add_nodes_from(range(3))
    >>> [c.placement for c in next(candidates(PlacementProblem(g, parse_cluster("cpu:0,cpu:1")), (1,)))]
    [(0, 0, 0), (1, 0, 1), (0, 1, 0), (1, 1, 1)]
    """
    leader = np.asarray(problem.colocation_leader)
    sets = np.unique(leader)
    column = np.searchsorted(sets, leader)  # group -> the column of its set's device
    d = problem.n_devices
    powers = d ** np.arange(len(sets), dtype=np.int64)
    total = d ** len(sets)
    for start in range(0, total, chunk):
        codes = np.arange(start, min(start + chunk, total), dtype=np.int64)
        placements = ((codes[:, None] // powers) % d)[:, column].tolist()  # [chunk, groups]
        for m in options:
            yield [Candidate(tuple(p), int(m)) for p in placements]


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
    count = candidate_count(problem, options)
    if count > limit:
        return None
    best, best_ms = None, math.inf
    for batch in candidates(problem, options, chunk):
        times = scorer.score(batch)
        i = int(np.argmin(times))
        if times[i] < best_ms:
            best, best_ms = batch[i], float(times[i])
    return Optimum(best, best_ms, count)


def enumerates(problem: PlacementProblem, config: SearchConfig) -> bool:
    """Whether a search of `config` scores every candidate instead of sampling: the space
    has at most config.max_samples candidates (without a sample budget, at most SMALL)."""
    options = config.microbatches or microbatch_options(problem)
    budget = config.max_samples if config.max_samples is not None else SMALL
    return candidate_count(problem, options) <= budget


def exhaustive_search(method: str, problem: PlacementProblem, scorer: Scorer, config: SearchConfig,
                      warm_start: Candidate | None = None,
                      on_progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Score every candidate, at the budget and measurement cadence of `config`, as `method`
    (placer.search.run: its result names the method it stood in for).

    Rounds of `batch_size` take the candidates in enumeration order (`candidates`). With a
    sample budget they begin again from the first once every one is scored, so that the
    search samples as many candidates and measures at the same points as a sampling search
    of that budget (the ablation compares at equal samples); a candidate scored again is
    scored under the simulator as the measurements since have refitted it. Without one (a
    time budget alone, as `placer optimize` searches) the search ends once every candidate
    is scored, with its closing round: scoring the same candidates again for the rest of the
    time would only fill the learning curve. The result's `enumerated` is the number of
    candidates when every one was scored (None when the budget ended first). No checkpoint
    is kept: resumed, the enumeration runs again (seconds; its measurements come from the
    caller's book where it has them).
    """
    every = [c for batch in candidates(problem, config.microbatches or microbatch_options(problem)) for c in batch]
    if config.max_samples is None:
        config = replace(config, max_samples=len(every))

    def play(state, n: int, _) -> list[float]:
        return state.score(scorer, [every[(state.samples + i) % len(every)] for i in range(n)], config.keep_top)

    state, interrupted = search_loop(play, scorer, config, warm_start, on_progress)
    return state.result(method, interrupted, enumerated=len(every) if state.samples >= len(every) else None)
