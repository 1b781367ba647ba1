"""What every search keeps as it runs (SearchState), how it spends its measurements,
and what it hands back (SearchResult).

The searches differ only in how they propose candidates; the bookkeeping here is
shared, so that their budgets are equal by construction:

- every scored candidate counts as one sample; the `keep_top` best distinct ones are kept
  (and handed back, fastest first, as SearchResult.top);
- every `measure_every` rounds the `measure_top_k` best kept candidates not measured
  yet are measured, the scorer refits its simulator to every measurement so far, and
  the kept candidates are re-scored;
- at the end the same again, plus the warm start, so that the result is never worse
  than the heuristic it started from, measured; then the `finalists` best measured
  candidates and the warm start are measured again side by side in one closing
  session (`closing_session`); all of it once: a finished search resumed with no new
  samples measures nothing (its kept candidates, re-scored under a refit that has seen
  more measurements, would otherwise pick new ones);
- the final choice is the fastest feasible candidate of the closing session, else the
  best measured feasible candidate, else (nothing measured) the best simulated feasible
  one, else None. The best of every session's measurements is biased towards whichever
  candidate was measured in a fast moment of the host (the winner's curse: at s22 an
  mlp search measured its pick at 205 ms in a 6-s session, and it confirmed 3.5%
  slower than the candidate another search chose); side by side in one session, the
  finalists share the host's moments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graphs.problem import Candidate, Placement, PlacementProblem
from placer.search.config import SearchConfig

if TYPE_CHECKING:  # the Protocol lives in the package's face; only type hints need it here
    from placer.search import Scorer

__all__ = []

CURVE_FIELDS = ("update", "samples", "elapsed_s", "mean_ms", "best_sim_ms", "best_measured_ms")


@dataclass
class SearchResult:
    """What a search found. `best` is None when it found nothing feasible (best_sim_ms is then inf)."""

    method: str  # "rl", "random_search" or "local_search"
    best: Candidate | None  # best feasible measured, else best feasible simulated, else None
    best_sim_ms: float  # the best kept candidate's score; inf when none was feasible
    best_measured_ms: float | None  # the best measurement; None when nothing feasible was measured
    measured: list[tuple[Candidate, float]]  # every measurement, in order (inf where infeasible)
    curve: list[dict]  # one row per round, keys CURVE_FIELDS ("update" numbers the round: one RL update each)
    samples: int  # candidates scored
    rounds: int
    elapsed_s: float
    interrupted: bool  # Ctrl-C ended it: what it had is returned
    policy: object | None = field(default=None, repr=False)  # the trained policy (rl only)
    # the kept feasible candidates (at most keep_top, distinct) with their simulated ms, fastest
    # first: top[:k] are the k best distinct ones, for a caller that measures after the search
    top: list[tuple[Candidate, float]] = field(default_factory=list)
    # how many candidates the problem has, when the search scored every one of them instead of
    # sampling (placer.search.exhaustive: a space no larger than the sample budget); None: it sampled
    enumerated: int | None = None
    # the closing session's measurements (ms; inf where infeasible) of the finalists: the best
    # measured candidates and the warm start, side by side; empty where there was none
    final: list[tuple[Candidate, float]] = field(default_factory=list)


@dataclass
class SearchState:
    """Everything a search's bookkeeping changes; what a checkpoint holds besides the proposer's own state."""

    rounds: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    candidates: dict[Candidate, float] = field(default_factory=dict)  # best scored, at most keep_top
    measured: dict[Candidate, float] = field(default_factory=dict)  # ms; inf where infeasible
    final: dict[Candidate, float] = field(default_factory=dict)  # the closing session's, ms (closing_session)
    curve: list[dict] = field(default_factory=list)
    closed_at: int | None = None  # samples when the closing round was measured; None: not yet
    measure_s: float = 0.0  # seconds spent in the scorer's measurement sessions (this run; not checkpointed)
    measure_n: int = 0  # candidates measured in those sessions

    def measure_cost(self, n: int) -> float:
        """Expected seconds to measure `n` candidates: the mean so far per candidate; 0 before any."""
        return n * self.measure_s / self.measure_n if self.measure_n else 0.0

    def remember(self, candidates: Sequence[Candidate], times: Sequence[float], keep: int) -> None:
        """Add scored candidates, keeping the `keep` fastest distinct ones."""
        self.candidates.update(zip(candidates, (float(t) for t in times)))
        if len(self.candidates) > keep:
            self.candidates = dict(sorted(self.candidates.items(), key=lambda kv: kv[1])[:keep])

    def score(self, scorer: Scorer, candidates: Sequence[Candidate], keep: int) -> list[float]:
        """Score `candidates` (Scorer.score), keep them (`remember`) and count them as samples; their times, ms."""
        times = scorer.score(candidates)
        self.remember(candidates, times, keep)
        self.samples += len(candidates)
        return times

    def best_sim(self) -> tuple[Candidate | None, float]:
        """The fastest feasible kept candidate, or (None, inf): an infeasible one is never "best"."""
        return next(iter(self.ranked()), (None, math.inf))

    def best_measured(self) -> tuple[Candidate | None, float]:
        return min(self.measured.items(), key=lambda kv: kv[1], default=(None, math.inf))

    def ranked(self) -> list[tuple[Candidate, float]]:
        """The feasible kept candidates with their scores (ms), fastest first (ties: the one kept first)."""
        feasible = [(c, ms) for c, ms in self.candidates.items() if math.isfinite(ms)]
        return sorted(feasible, key=lambda kv: kv[1])

    def unmeasured_best(self, k: int) -> list[Candidate]:
        """The k best feasible kept candidates not measured yet."""
        return [c for c, _ in self.ranked() if c not in self.measured][:k]

    def record(self, times: Sequence[float], elapsed_s: float) -> dict:
        """Append (and return) the curve row of the round just scored (`times`: its samples')."""
        finite = [t for t in times if math.isfinite(t)]
        row = {"update": self.rounds, "samples": self.samples, "elapsed_s": elapsed_s,
               "mean_ms": sum(finite) / len(finite) if finite else None,
               "best_sim_ms": _or_none(self.best_sim()[1]), "best_measured_ms": _or_none(self.best_measured()[1])}
        self.curve.append(row)
        return row

    def result(self, method: str, interrupted: bool, policy: object | None = None,
               enumerated: int | None = None) -> SearchResult:
        """What the search found (module docstring: the final choice)."""
        best_sim, best_sim_ms = self.best_sim()
        best_measured, best_measured_ms = self.best_measured()
        finalist, finalist_ms = min(self.final.items(), key=lambda kv: kv[1], default=(None, math.inf))
        chosen = (finalist if math.isfinite(finalist_ms)
                  else best_measured if math.isfinite(best_measured_ms) else best_sim)
        return SearchResult(method=method, best=chosen, best_sim_ms=best_sim_ms,
                            best_measured_ms=_or_none(best_measured_ms), measured=list(self.measured.items()),
                            curve=list(self.curve), samples=self.samples, rounds=self.rounds,
                            elapsed_s=self.elapsed_s, interrupted=interrupted, policy=policy, top=self.ranked(),
                            enumerated=enumerated, final=list(self.final.items()))


def as_candidate(problem: PlacementProblem, warm_start: Candidate | Placement | None) -> Candidate | None:
    """The warm start as a Candidate (a bare placement means one micro-batch), checked to fit.

    Raises InfeasibleError naming the first problem when it does not fit the devices:
    a search started there would learn or walk from an infeasible point."""
    if warm_start is None:
        return None
    if not isinstance(warm_start, Candidate):
        warm_start = Candidate(tuple(int(d) for d in warm_start))
    problem.check(warm_start.placement)
    return warm_start


class Clock:
    """Elapsed wall-clock seconds of a search, continuing from a resumed state's."""

    def __init__(self, already_s: float = 0.0):
        self._started = time.monotonic() - already_s

    def __call__(self) -> float:
        return time.monotonic() - self._started


def closing_reserve(state: SearchState, config: SearchConfig) -> float:
    """Seconds kept back for the closing round (measure_top_k + 1 candidates, and the
    closing session's finalists + 1, at the mean cost per measured candidate so far), at
    most half the time budget; 0 without one."""
    if config.budget_s is None or not config.measure_top_k:
        return 0.0
    closing = config.measure_top_k + 1 + (config.finalists + 1 if config.finalists else 0)
    return min(state.measure_cost(closing), config.budget_s / 2)


def budget_left(state: SearchState, config: SearchConfig, elapsed_s: float) -> bool:
    """Whether to start another round: samples left, and time left after the closing round's reserve."""
    return ((config.budget_s is None or elapsed_s + closing_reserve(state, config) < config.budget_s)
            and (config.max_samples is None or state.samples < config.max_samples))


def round_size(state: SearchState, config: SearchConfig) -> int:
    """Candidates to sample this round: a batch, or what the sample budget leaves."""
    if config.max_samples is None:
        return config.batch_size
    return max(0, min(config.batch_size, config.max_samples - state.samples))


def measure(state: SearchState, scorer: Scorer, candidates: Sequence[Candidate], clock: Callable[[], float],
            limit_s: float | None = None) -> bool:
    """Measure `candidates` in a session of at most `limit_s` seconds (Scorer.measure), keep
    their times (and the session's seconds by `clock`); when any is feasible, refit the scorer
    to every measurement so far and re-score the kept candidates under the new fit. Returns
    whether the scorer was refitted."""
    todo = [c for c in dict.fromkeys(candidates) if c not in state.measured]
    if not todo:
        return False
    started = clock()
    times = scorer.measure(todo, limit_s=limit_s)
    state.measure_s += clock() - started
    state.measure_n += len(todo)
    for c, ms in zip(todo, times):
        state.measured[c] = math.inf if ms is None else float(ms)
    return refit(state, scorer)


def refit(state: SearchState, scorer: Scorer) -> bool:
    """Refit the scorer (when anything feasible was measured) and re-score the kept
    candidates; returns whether it refitted."""
    if not any(math.isfinite(ms) for ms in state.measured.values()):
        return False
    scorer.refit()
    kept = list(state.candidates)
    state.candidates = dict(zip(kept, (float(t) for t in scorer.score(kept))))
    return True


def measure_round(state: SearchState, scorer: Scorer, config: SearchConfig, clock: Callable[[], float]) -> bool:
    """The periodic measurement round: after every `measure_every` rounds, unless, at the mean
    cost so far, it would end past the time budget less the closing round's reserve (its
    candidates fall to the closing round). Its session is limited to that time: a host
    slower than the mean so far cuts it short (past the protocol's fewest steps) instead
    of running into the closing round's reserve. Returns whether the scorer was refitted
    (scores from before are stale then)."""
    if not config.measure_top_k or state.rounds % config.measure_every:
        return False
    todo = state.unmeasured_best(config.measure_top_k)
    left_s = None if config.budget_s is None else config.budget_s - closing_reserve(state, config) - clock()
    if left_s is not None and state.measure_cost(len(todo)) > left_s:
        return False
    return measure(state, scorer, todo, clock, left_s)


def final_round(state: SearchState, scorer: Scorer, config: SearchConfig, warm_start: Candidate | None,
                clock: Callable[[], float]) -> None:
    """The closing measurement round: the best unmeasured candidates and the warm start,
    then the closing session (`closing_session`), once per sample count (a search resumed
    after it closed, with no budget left, measures nothing; one given more budget samples
    more and closes again). It runs even when the budget is spent (the final choice needs
    the warm start measured), limited to what the budget leaves: at worst the protocol's
    fewest steps of each candidate past it."""
    if config.measure_top_k and state.closed_at != state.samples:
        final = state.unmeasured_best(config.measure_top_k)
        left_s = None if config.budget_s is None else config.budget_s - clock()
        measure(state, scorer, final + ([warm_start] if warm_start is not None else []), clock, left_s)
        closing_session(state, scorer, config, warm_start, clock)
    state.closed_at = state.samples


def closing_session(state: SearchState, scorer: Scorer, config: SearchConfig, warm_start: Candidate | None,
                    clock: Callable[[], float]) -> None:
    """Measure the `finalists` best measured feasible candidates and the warm start again,
    side by side in one session (Scorer.measure afresh), limited to what the budget leaves;
    their times there (state.final) alone choose the search's result. Nothing where fewer
    than two are measured feasible: one candidate needs no comparison."""
    ranked = sorted((c for c, ms in state.measured.items() if math.isfinite(ms)), key=state.measured.__getitem__)
    finalists = ranked[:config.finalists]
    if warm_start is not None and warm_start in ranked and warm_start not in finalists:
        finalists.append(warm_start)
    state.final = {}
    if not config.finalists or len(finalists) < 2:
        return
    left_s = None if config.budget_s is None else config.budget_s - clock()
    times = scorer.measure(finalists, limit_s=left_s, afresh=True)
    state.final = {c: math.inf if ms is None else float(ms) for c, ms in zip(finalists, times)}


def search_loop(play: Callable[[SearchState, int, Callable[[], float]], list[float]], scorer: Scorer,
                config: SearchConfig, warm_start: Candidate | None,
                on_progress: Callable[[dict], None] | None = None,
                refitted: Callable[[], None] | None = None) -> tuple[SearchState, bool]:
    """The loop of random_search, local_search and the enumeration (placer.search.exhaustive):
    the warm start scored and kept; then, while the budget lasts, a round, `play(state, n,
    clock)`, which scores n candidates (SearchState.score) and returns their times, then the
    periodic measurement round (and `refitted()` after a refit: scores from before it are
    stale), then a curve row; then the closing round. Returns the state and whether Ctrl-C
    ended it early (the state then holds what it had)."""
    state, clock, interrupted = SearchState(), Clock(), False
    try:
        if warm_start is not None:
            state.remember([warm_start], scorer.score([warm_start]), config.keep_top)
        while budget_left(state, config, clock()):
            times = play(state, round_size(state, config), clock)
            state.rounds += 1
            if measure_round(state, scorer, config, clock) and refitted is not None:
                refitted()
            row = state.record(times, clock())
            if on_progress is not None:
                on_progress(dict(row))
        final_round(state, scorer, config, warm_start, clock)
    except KeyboardInterrupt:
        interrupted = True
    state.elapsed_s = clock()
    return state, interrupted


def temperature(state: SearchState, config: SearchConfig, elapsed_s: float) -> float:
    """The annealing temperature now: config.anneal, falling linearly to 0 as the sample
    budget (or, without one, the time budget) is spent."""
    if config.max_samples:
        spent = state.samples / config.max_samples
    elif config.budget_s:
        spent = elapsed_s / config.budget_s
    else:
        spent = 0.0
    return config.anneal * (1.0 - min(1.0, spent))


def accept(ms: float, current_ms: float, temperature: float, uniform: float) -> bool:
    """The annealing rule: a feasible candidate of `ms` replaces the current one if it is
    faster, or, slower by a relative x, if `uniform` (a draw in [0, 1)) < exp(-x / temperature).

    >>> accept(90.0, 100.0, 0.0, 0.5), accept(110.0, 100.0, 0.0, 0.0), accept(101.0, 100.0, 0.1, 0.5)
    (True, False, True)
    """
    if not math.isfinite(ms):
        return False
    if ms < current_ms or not math.isfinite(current_ms):
        return True
    return temperature > 0 and uniform < math.exp(-(ms / current_ms - 1.0) / temperature)


def _or_none(ms: float) -> float | None:
    return ms if math.isfinite(ms) else None
