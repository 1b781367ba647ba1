"""Searching for a fast candidate (placement + micro-batch count): RL and its yardsticks.

    placer.search.run(method, problem, scorer, config, warm_start) -> SearchResult

| method          | proposes                                                           | module              |
| --------------- | ------------------------------------------------------------------ | ------------------- |
| `rl`            | samples of the seq2seq policy, trained as it goes (REINFORCE, PPO) | placer.rl.trainer   |
| `random_search` | uniformly random candidates                                        | random_search       |
| `local_search`  | single-group moves (and micro-batch changes), simulated annealing  | local_search        |

All three score candidates through one `Scorer`, sample the same number of candidates
in rounds of the same size and spend the same measurements at the same points
(placer.search.state), all from the same warm start: given one SearchConfig (or a
TrainConfig, which extends it) their results compare at equal budget.

Where a problem has no more candidates than a search may sample, every method scores
each one instead (placer.search.exhaustive.exhaustive_search, at the same budget and
cadence; the result's `enumerated` says so): sampling a space that small only draws the
same candidates again. Where it is small enough to enumerate at all (at most 2^20),
`placer.search.exhaustive.optimum` scores every candidate: the exact simulated optimum
the searches are measured against (a yardstick, not a search: it spends no budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from graphs.problem import Candidate, Placement, PlacementProblem
from placer.search.config import SearchConfig, microbatch_options, overrides
from placer.search.exhaustive import enumerates, exhaustive_search
from placer.search.local_search import local_search
from placer.search.random_search import random_search
from placer.search.state import CURVE_FIELDS, SearchResult, as_candidate

if TYPE_CHECKING:
    from placer.rl.policy import Seq2SeqPolicy

__all__ = ["Scorer", "SearchConfig", "SearchResult", "METHODS", "run", "overrides", "microbatch_options",
           "CURVE_FIELDS"]


class Scorer(Protocol):
    """How a search learns what a candidate is worth (seam 5 of the design: placer.optimize
    implements it over the calibrated simulator and the measurement protocol).

    score : simulated step time of each candidate, ms; inf where infeasible. Cheap
        (about a millisecond each); called for every sample.
    measure : measured median step time of each candidate through the measurement
        protocol, ms; None where infeasible (memory, a crash). Expensive; called only
        for the few candidates a measurement round picks, with `limit_s`, the seconds
        the round may take (what the time budget leaves it; None: no budget): the
        session stops by then once each candidate has the protocol's fewest steps
        (<= 0: only those), so a slow host overruns the budget by at most that. With
        `afresh`, every candidate is measured again in one new session, side by side,
        even one measured before (the closing session's finalists); else a scorer may
        answer from what it measured already.
    refit : recalibrate `score` from every measurement made so far; called after each
        measurement round that measured something feasible, and on resume.
    """

    def score(self, candidates: Sequence[Candidate]) -> list[float]: ...

    def measure(self, candidates: Sequence[Candidate], limit_s: float | None = None,
                afresh: bool = False) -> list[float | None]: ...

    def refit(self) -> None: ...


METHODS = ("rl", "random_search", "local_search")


def run(method: str, problem: PlacementProblem, scorer: Scorer, config: SearchConfig,
        warm_start: Candidate | Placement | None = None, *, out_dir: Path | None = None, resume: bool = False,
        on_progress: Callable[[dict], None] | None = None, policy: Seq2SeqPolicy | None = None) -> SearchResult:
    """Run one search on `problem` and return what it found.

    Parameters
    ----------
    method : one of METHODS.
    problem : the grouped graph and the cluster.
    scorer : scores and measures candidates (Scorer).
    config : budget and cadence; a TrainConfig carries RL's own fields too (a plain
        SearchConfig runs RL with TrainConfig's defaults for them).
    warm_start : where every search starts (the best heuristic's placement): it is
        scored first, kept as a candidate and measured at the end, so no search returns
        worse than it. A bare placement means one micro-batch.
    out_dir, resume : RL's checkpoint folder, and whether to continue from it.
    on_progress : called with each round's curve row (CURVE_FIELDS).
    policy : RL only: start from these weights (e.g. placer.rl.load_policy of another search).

    Returns
    -------
    SearchResult; its `best` is None when nothing feasible was found. Where the problem
    has no more candidates than the sample budget (placer.search.exhaustive.enumerates),
    every method scores each one instead of sampling: `enumerated` is then set, and RL
    trains no policy (its `policy` is None, and nothing is saved in `out_dir`).

    Raises
    ------
    ValueError : an unknown method.
    InfeasibleError : the warm start does not fit the devices.
    CheckpointError : resume from a checkpoint of another problem, or a damaged one.
    """
    warm_start = as_candidate(problem, warm_start)
    if method not in METHODS:
        raise ValueError(f"unknown search {method!r}: choose one of {', '.join(METHODS)}")
    if enumerates(problem, config):
        return exhaustive_search(method, problem, scorer, config, warm_start, on_progress)
    if method == "rl":
        # Imported here, not above: the trainer builds on this package's state and config,
        # so importing it at the top would make `import placer.rl` circular.
        from placer.rl.trainer import TrainConfig, train

        rl_config = config if isinstance(config, TrainConfig) else TrainConfig(**asdict(config))
        return train(problem, scorer, rl_config, warm_start=warm_start, out_dir=out_dir, resume=resume,
                     on_progress=on_progress, policy=policy)
    if method == "random_search":
        return random_search(problem, scorer, config, warm_start, on_progress=on_progress)
    return local_search(problem, scorer, config, warm_start, on_progress=on_progress)
