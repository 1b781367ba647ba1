"""`local_search`: simulated annealing over single-group moves, from the warm start.

A move takes the current candidate and changes one thing: one group's device (a set
of groups that share parameters moves as one), or the micro-batch count, each equally
likely. The neighbour is scored; it replaces the current candidate if it is faster,
or, if it is slower by a relative amount x, with probability exp(-x / T). The
temperature T starts at `config.anneal` and falls linearly to 0 (hill climbing) as the
sample budget (or, without one, the time budget) runs out. Candidates are scored one
at a time and counted in rounds of `batch_size`, so that measurements happen at the
same points as in the other searches. Without a warm start it starts from a random
candidate (one sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from graphs.problem import Candidate, PlacementProblem
from placer.search.config import SearchConfig, microbatch_options
from placer.search.random_search import random_candidates
from placer.search.state import SearchResult, SearchState, accept, search_loop, temperature

__all__ = []


def neighbour(candidate: Candidate, sets: Sequence[np.ndarray], n_devices: int, options: Sequence[int],
              rng: np.random.Generator) -> Candidate:
    """`candidate` with one move: a colocation set (of `sets`, arrays of group ids) to
    another device, or (one more choice, when there are several options) another
    micro-batch count.

    >>> rng = np.random.default_rng(0)
    >>> moved = neighbour(Candidate((0, 0, 0)), [np.array([0]), np.array([1, 2])], 2, (1,), rng)
    >>> sum(moved.placement) in (1, 2) and moved.placement[1] == moved.placement[2]
    True
    """
    choices = len(sets) + (1 if len(options) > 1 else 0)
    pick = int(rng.integers(choices))
    if pick == len(sets):
        others = [m for m in options if m != candidate.microbatches]
        return Candidate(candidate.placement, int(rng.choice(others)))
    groups = sets[pick]
    placement = np.asarray(candidate.placement)
    current = int(placement[groups[0]])
    placement[groups] = (current + 1 + int(rng.integers(n_devices - 1))) % n_devices if n_devices > 1 else 0
    return Candidate(tuple(placement.tolist()), candidate.microbatches)


def local_search(problem: PlacementProblem, scorer, config: SearchConfig, warm_start: Candidate | None = None,
                 on_progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Simulated annealing at the budget and measurement cadence of `config` (placer.search.run)."""
    rng = np.random.default_rng(config.seed)
    options = config.microbatches or microbatch_options(problem)
    leader = np.asarray(problem.colocation_leader)
    sets = [np.flatnonzero(leader == g) for g in np.unique(leader)]
    current, current_ms = warm_start, math.inf

    def play(state: SearchState, n: int, clock: Callable[[], float]) -> list[float]:
        nonlocal current, current_ms
        times = []
        if state.rounds == 0 and current is None:  # no warm start: start from a random candidate, a sample of the round
            (current,) = random_candidates(problem, options, rng, 1)
            (current_ms,) = times = state.score(scorer, [current], config.keep_top)
        elif state.rounds == 0:
            current_ms = state.candidates[current]  # search_loop scored the warm start
        for _ in range(n - len(times)):
            # -- propose one move and score it
            proposal = neighbour(current, sets, problem.n_devices, options, rng)
            (ms,) = state.score(scorer, [proposal], config.keep_top)
            times.append(ms)
            # -- accept it if faster, or by the annealing rule
            if accept(ms, current_ms, temperature(state, config, clock()), float(rng.random())):
                current, current_ms = proposal, ms
        return times

    def refitted() -> None:  # the current point under the refitted simulator
        nonlocal current_ms
        (current_ms,) = scorer.score([current])

    state, interrupted = search_loop(play, scorer, config, warm_start, on_progress, refitted)
    return state.result("local_search", interrupted)
