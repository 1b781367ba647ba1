"""The RL search's starts: the candidates its first round scores (placer.rl.trainer, step 2).

The search samples around its incumbents and stays near its start, so the start decides
much of a seed: the warm start at every micro-batch count, interleaved stages (a structure
that single-group moves from a contiguous pipeline do not reach), random stage-like
candidates and uniformly random ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphs.problem import Candidate, PlacementProblem
from placer.baselines.pipeline import interleaved_stages
from placer.search.random_search import block_candidates, random_candidates

__all__ = ["seed_candidates", "interleaved_candidates"]

INTERLEAVED_CHUNKS = (2, 3, 4, 6)
"""Stages a device of the interleaved plans RL's first round scores. Simulated on 4 devices, the best plan had
4 (mlp@4, 30% faster than the pipeline heuristic, a plan RL found from random starts on 1 seed of 3), 6 (gpt@4)
or 3 and 4 (transformer@4, gpt@8); docs/results.md, "Larger clusters (simulated), RL starting from interleaved
stages too"."""


def seed_candidates(problem: PlacementProblem, warm_start: Candidate | None, options: Sequence[int], n: int,
                    seed: int, start: int = 0) -> list[Candidate]:
    """The first round's n candidates: the warm start's placement at each other micro-batch
    count of `options`; on the first start, interleaved stages (`interleaved_candidates`); then
    half random stage-like candidates (placer.search.random_search.block_candidates), half
    uniformly random ones, so that a count whose good placements lie far from the warm start's
    (a pipelined plan over every device) starts from one of them. `start` numbers the search's
    starts (0: the first): each draws other random candidates."""
    others = [Candidate(warm_start.placement, m) for m in options if m != warm_start.microbatches] if warm_start else []
    if start == 0:
        others += interleaved_candidates(problem, options)
    rng = np.random.default_rng(seed if start == 0 else [seed, start])  # start 0 as before restarts existed
    rest = max(0, n - len(others))
    blocks = block_candidates(problem, options, rng, rest // 2)
    return (others + blocks + random_candidates(problem, options, rng, rest - len(blocks)))[:n]


def interleaved_candidates(problem: PlacementProblem, options: Sequence[int],
                           chunks: Sequence[int] = INTERLEAVED_CHUNKS) -> list[Candidate]:
    """Interleaved stages (placer.baselines.pipeline.interleaved_stages) at each count of `chunks`
    stages a device that leaves every stage a group, and each micro-batch count of `options`
    above 1 (without micro-batches, several stages a device only add crossings), each once (a group
    slower than a stage's share leaves stages empty, so two counts of stages may make one plan)."""
    if problem.n_devices < 2:
        return []
    return list(dict.fromkeys(interleaved_stages(problem, c, m) for c in chunks
                              if c * problem.n_devices <= problem.n_groups for m in options if m > 1))
