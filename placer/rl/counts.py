"""Micro-batch counts in the RL search: the best candidate found for each count, and
how often each count is drawn.

The policy places a candidate given its micro-batch count (placer.rl.policy); the
trainer draws the count. A pipelined plan may want a placement far from the
unpipelined warm start (spread over more devices, say), so each count keeps its own
incumbent, which the policy samples around and self-imitates for that count, and a
count is drawn by how far its incumbent is behind the best one's: a count that
cannot compete is dropped quickly, one that catches up gets its share back.

`Incumbents` maps a count to [placement (a list of devices; None while nothing
feasible was found for it), simulated ms (inf: nothing feasible yet)]; it is part of
the trainer's checkpoint, hence plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from graphs.problem import Candidate

__all__ = ["Incumbents", "learn", "best_for", "leader", "fastest_ms", "rescore", "draw_weights"]

Incumbents = dict[int, list]


def learn(incumbents: Incumbents, candidates: Sequence[Candidate], times: Sequence[float]) -> None:
    """Keep, for each count, the fastest of `candidates` scored `times` (ms, inf when
    infeasible) and the incumbent; a count tried with nothing feasible gets ms inf.

    >>> kept = {}
    >>> learn(kept, [Candidate((0, 1), 2), Candidate((1, 1), 2), Candidate((0, 0), 4)], [9.0, 8.0, math.inf])
    >>> kept
    {2: [[1, 1], 8.0], 4: [None, inf]}
    """
    for candidate, ms in zip(candidates, times):
        m = candidate.microbatches
        if m not in incumbents or ms < incumbents[m][1]:
            incumbents[m] = [list(candidate.placement) if math.isfinite(ms) else None, float(ms)]


def best_for(incumbents: Incumbents, microbatches: int) -> Candidate | None:
    """The incumbent of this count; None while it has no feasible one."""
    placement, _ = incumbents.get(microbatches, (None, math.inf))
    return None if placement is None else Candidate(tuple(placement), microbatches)


def leader(incumbents: Incumbents) -> Candidate | None:
    """The fastest incumbent of any count; None while none is feasible.

    >>> leader({1: [[0, 0], 9.0], 2: [[0, 1], 8.0], 4: [None, math.inf]})
    Candidate(placement=(0, 1), microbatches=2)
    """
    count = min((m for m, (placement, _) in incumbents.items() if placement is not None),
                key=lambda m: incumbents[m][1], default=None)
    return None if count is None else best_for(incumbents, count)


def fastest_ms(incumbents: Incumbents) -> float:
    """The fastest incumbent's simulated ms; inf while none is feasible."""
    return min((ms for _, ms in incumbents.values()), default=math.inf)


def rescore(incumbents: Incumbents, scorer) -> None:
    """Re-score the incumbents with `scorer` (placer.search.Scorer), after it was refitted
    to measurements, as the search's kept candidates are."""
    counts = [m for m, (placement, _) in incumbents.items() if placement is not None]
    for m, ms in zip(counts, scorer.score([best_for(incumbents, m) for m in counts])):
        incumbents[m][1] = float(ms)


def draw_weights(incumbents: Incumbents, options: Sequence[int], spread: float, worst: float) -> torch.Tensor:
    """[len(options)] weights of drawing each count: exp(-x / spread) for a count whose
    incumbent is behind the best count's by x = log(its ms / the best ms), x at most
    log(`worst`), as much as a count with nothing feasible yet is behind; 1 for a count
    not tried yet (every count starts as promising as the best).

    >>> [round(float(w), 3) for w in draw_weights({1: [[0], 100.0], 2: [[0], 110.0]}, (1, 2, 4), 0.1, 10.0)]
    [1.0, 0.386, 1.0]
    """
    best = min((incumbents[m][1] for m in options if m in incumbents), default=math.inf)
    gaps = [min(math.log(incumbents[m][1] / best), math.log(worst)) if m in incumbents and math.isfinite(best)
            else 0.0 for m in options]
    return torch.tensor([math.exp(-gap / spread) for gap in gaps])
