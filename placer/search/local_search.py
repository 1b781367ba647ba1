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

from collections.abc import Callable, Sequence

import numpy as np

from graphs.problem import Candidate, PlacementProblem
from placer.search.config import SearchConfig, microbatch_options
from placer.search.random_search import random_candidates
from placer.search.state import (Clock, SearchResult, SearchState, accept, budget_left, final_round,
                                 measure_round, round_size, temperature)

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
    state = SearchState()
    clock = Clock()
    interrupted = False
    try:
        if warm_start is not None:
            current = warm_start
            (current_ms,) = scorer.score([current])
        else:
            (current,) = random_candidates(problem, options, rng, 1)
            (current_ms,) = scorer.score([current])
            state.samples += 1
        state.remember([current], [current_ms], config.keep_top)
        while budget_left(state, config, clock()):
            times = []
            for _ in range(round_size(state, config)):
                # -- propose one move and score it
                proposal = neighbour(current, sets, problem.n_devices, options, rng)
                (ms,) = scorer.score([proposal])
                times.append(ms)
                state.samples += 1
                state.remember([proposal], [ms], config.keep_top)
                # -- accept it if faster, or by the annealing rule
                if accept(ms, current_ms, temperature(state, config, clock()), float(rng.random())):
                    current, current_ms = proposal, ms
            state.rounds += 1
            # -- measurement bookkeeping (placer.search.state)
            if measure_round(state, scorer, config, clock):
                (current_ms,) = scorer.score([current])  # the current point under the refitted simulator
            row = state.record(times, clock())
            if on_progress is not None:
                on_progress(dict(row))
        final_round(state, scorer, config, warm_start, clock)
    except KeyboardInterrupt:
        interrupted = True
    state.elapsed_s = clock()
    return state.result("local_search", interrupted)
