"""The one reward rule: how a step time becomes a reward, and what an infeasible placement gets.

Both the Gymnasium environment (envs.env.PlacementEnv) and the RL trainer
(placer.rl.trainer) score placements through a `RewardRule`, so a step time earns the
same reward in either.

Shapings of a feasible step of t ms, against a reference step of r ms:

- "neg_sqrt": -sqrt(t / 1000), the paper's (Mirhoseini et al. 2017);
- "neg_time": -t / 1000;
- "neg_log": -log(t / r), 0 at the reference, +0.1 for a step 10% faster;
- "speedup": r / t - 1, 0 at the reference.

The reference is the warm start's step time when there is one (the search starts
there, so the reward says how much better than the start a sample is), else the best
single device's (`reference_ms`). An infeasible placement (memory, split shared
parameters) is rewarded as a feasible step `infeasible_slowdown` times the reference:
worse than any sensible placement, on the same scale as the feasible rewards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphs.problem import Placement, PlacementProblem

SHAPINGS = ("neg_sqrt", "neg_time", "neg_log", "speedup")
INFEASIBLE_SLOWDOWN = 10.0


@dataclass(frozen=True)
class RewardRule:
    """Step time (ms) -> reward; `inf` (or NaN) means infeasible and earns the penalty.

    Examples
    --------
    >>> rule = RewardRule("speedup", reference_ms=100.0)
    >>> rule(50.0), rule(100.0), rule(math.inf)
    (1.0, 0.0, -0.9)
    """

    shaping: str = "neg_sqrt"  # one of SHAPINGS
    reference_ms: float = 1000.0  # the yardstick of "neg_log", "speedup" and of the penalty (ms, > 0)
    infeasible_slowdown: float = INFEASIBLE_SLOWDOWN  # the penalty is the reward of a step this many times the reference

    def __post_init__(self) -> None:
        if self.shaping not in SHAPINGS:
            raise ValueError(f"reward={self.shaping!r}: choose one of {', '.join(SHAPINGS)}")
        if not (math.isfinite(self.reference_ms) and self.reference_ms > 0):
            raise ValueError(f"reference_ms={self.reference_ms!r}: a reward needs a finite, positive reference step")

    def shape(self, step_ms: float) -> float:
        """The reward of a feasible step of `step_ms` (> 0)."""
        if self.shaping == "neg_sqrt":
            return -math.sqrt(step_ms / 1000.0)
        if self.shaping == "neg_time":
            return -step_ms / 1000.0
        if self.shaping == "neg_log":
            return -math.log(step_ms / self.reference_ms)
        return self.reference_ms / step_ms - 1.0

    @property
    def penalty(self) -> float:
        """The reward of an infeasible placement."""
        return self.shape(self.infeasible_slowdown * self.reference_ms)

    def __call__(self, step_ms: float) -> float:
        return self.shape(step_ms) if math.isfinite(step_ms) and step_ms > 0 else self.penalty


def reference_ms(problem: PlacementProblem, score: Callable[[Sequence[Placement]], Sequence[float]],
                 warm_start: Placement | None = None, fallback_ms: float = 1000.0) -> float:
    """The reward's reference step (ms): the warm start's, when it is given and feasible,
    else the fastest feasible single device's, else `fallback_ms`.

    Parameters
    ----------
    problem : the placement problem (its group and device counts).
    score : step times (ms, inf when infeasible) of a batch of placements: a simulator's
        or a measuring one.
    warm_start : the placement the search starts from, if any.
    fallback_ms : the reference when nothing above is feasible (ms, > 0).

    Examples
    --------
    >>> import networkx as nx
    >>> from graphs.devices import parse_cluster
    >>> g = nx.DiGraph(); g.add_nodes_from(range(3))
    >>> problem = PlacementProblem(g, parse_cluster("cpu:0,cpu:1"))
    >>> reference_ms(problem, lambda ps: [10.0 * (1 + p[0]) for p in ps])
    10.0
    >>> reference_ms(problem, lambda ps: [10.0 * (1 + p[0]) for p in ps], warm_start=(1, 1, 0))
    20.0
    """
    if warm_start is not None:
        (warm,) = score([tuple(warm_start)])
        if math.isfinite(warm) and warm > 0:
            return float(warm)
    singles = [(d,) * problem.n_groups for d in range(problem.n_devices)]
    feasible = [float(t) for t in score(singles) if math.isfinite(t) and t > 0]
    return min(feasible) if feasible else fallback_ms
