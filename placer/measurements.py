"""Measuring candidates so that their comparison can be trusted: the protocol, the
comparison of two measurements, and the Measurer that runs a problem's candidates.

The protocol (`Protocol`, `run_session`). Candidates measured in one *session* are
timed interleaved, round by round, each round in the order of a row of a Williams
design (`williams_order`: A B, B A for two; within the rounds, each candidate runs
right after each other equally often), so that drift in the host's load, the position
in a round and what the step before leaves behind hit all of them alike (measured
A-then-B every round, two identical placements differed by 9%; in alternating order
A B C D, D C B A, the one right after the eager model ran 5.9% slower, identical
placements measured apart in 22 sessions of 25). Every timed step waits `pause_ms`
first (untimed), for the threads an eager step leaves spinning to go idle: each step
then starts from an idle host, in every session alike, whoever ran before it. Every
candidate stays in the rounds to the session's end, which comes when, after `min_runs`
steps each, the confidence interval of every candidate's median (order statistics,
placer.runtime.timing.median_ci) is within `target` of the median (default +-3%), or
at `max_runs` steps each, or at the time cap (`cap_s` seconds a session, or `cap_per_candidate_s` times its
candidates), or at a caller's time limit (a search's budget: `Measurer.limited`).

The comparison (`compare`): the speedup of one measurement over another is the ratio
of their medians, with a bootstrap confidence interval (seeded: the same times give
the same interval). A ratio whose interval holds 1 is a *tie*: neither is measurably
faster. Two measurements of one session are *paired*: their steps were timed side by
side, round by round, so the bootstrap resamples whole rounds, and a drift of the host
that slowed both in the same rounds does not widen the interval of their ratio.

The book (placer.book.MeasurementBook) keeps every measurement of a run on disk.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np

from graphs.devices import parse_cluster
from graphs.problem import Candidate, PlacementProblem
from graphs.workload import Workload
from placer.book import UNPLACED, MeasurementBook, candidate_key
from placer.plan import Plan, make_plan
from placer.results import Progress, Ratio, Stage, quiet
from placer.runtime.timing import CONFIDENCE, Clock, EagerTrial, Measurement, PlacedTrial, Trial

__all__ = ["Protocol", "williams_order", "run_session", "compare",
           "Measurer", "UNPLACED", "unplaced_device", "unplaced_problem", "unplaced_plan"]


@dataclass(frozen=True)
class Protocol:
    """How candidates are measured (module docstring)."""

    target: float = 0.03
    """Stop a candidate once its median's CI half-width is at most this fraction of the median."""
    min_runs: int = 5
    """Timed steps of a candidate before its CI is judged."""
    max_runs: int = 200
    """Timed steps of a candidate at most."""
    cap_s: float = 60.0
    """Seconds of rounds (their pauses included) per session, once every candidate has min_runs steps (warm-up
    not counted)."""
    cap_per_candidate_s: float | None = None
    """When set, the session's cap is this times its number of candidates instead of cap_s
    (what optimize uses: a search's round of two candidates stays short, the baselines' long)."""
    warmup: int = 3
    """Untimed steps when a candidate is opened (the first also measures its memory)."""
    step_timeout_s: float = 120.0
    """A step (warm-up included) longer than this makes a candidate infeasible."""
    confidence: float = CONFIDENCE
    """Coverage of every confidence interval."""
    pause_ms: float = 10.0
    """Milliseconds of idle host before every timed step (not timed; the caps count it).
    An eager step on several intra-op threads leaves them spinning after it: without the pause, the step timed next ran 5.9% slower on this host (identical
    placements measured apart in 22 sessions of 25; 2 ms: 3.1%, 10 ms: 0.7%, as after a
    one-thread step; docs/results.md "Position in a round"). Before every step, not only
    after another candidate's: a step that follows its own, threads hot, would otherwise
    run from another start than the rest, and how often that happens depends on the
    session's size."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pause_ms) and self.pause_ms >= 0):
            raise ValueError(f"pause_ms={self.pause_ms}: give a finite number >= 0")
        for name in ("target", "cap_s", "step_timeout_s", "cap_per_candidate_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value}: give a finite number > 0")
        if not 1 <= self.min_runs <= self.max_runs:
            raise ValueError(f"min_runs={self.min_runs}, max_runs={self.max_runs}: need 1 <= min_runs <= max_runs")
        if self.warmup < 1:
            raise ValueError(f"warmup={self.warmup}: give at least 1 (it also measures memory)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence}: give a probability in (0, 1)")

    def to_json(self) -> dict:
        """The protocol's settings (results.json's `protocol`)."""
        return asdict(self)

    def session_cap_s(self, candidates: int) -> float:
        """The time cap of a session of `candidates` candidates (seconds)."""
        return self.cap_s if self.cap_per_candidate_s is None else self.cap_per_candidate_s * candidates

    def settled(self, trial: Trial) -> bool:
        """Whether `trial` needs no more steps: failed, at max_runs, or its CI within target."""
        if trial.failed is not None or len(trial.times_ms) >= self.max_runs:
            return True
        if len(trial.times_ms) < self.min_runs:
            return False
        halfwidth = trial.result(self.confidence).ci_halfwidth
        return halfwidth is not None and halfwidth <= self.target


def williams_order(n: int, round_: int) -> list[int]:
    """The order of `n` candidates in round `round_` (0-based): a row of a Williams
    design (E. J. Williams, "Experimental designs balanced for the estimation of residual
    effects of treatments", 1949), a Latin square in which, within the rows, every
    candidate runs right after every other equally often: once each over n rounds for
    even n, twice over 2n for odd n (the seams between rounds are not balanced). What a
    step leaves behind (threads still spinning, a cache of its own) then slows no
    candidate more than another. Two candidates alternate: A B, B A.

    >>> [williams_order(4, r) for r in range(4)]
    [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    first, low, high = [0][:n], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    row = round_ % (n if n % 2 == 0 else 2 * n) if n else 0
    order = [(x + row) % n for x in first]
    return order[::-1] if row >= n else order


def run_session(trials: Sequence[Trial], protocol: Protocol, clock: Clock = time.perf_counter,
                progress: Progress = quiet, stage: str = "measuring",
                limit_s: float | None = None) -> list[Measurement]:
    """Measure `trials` together under `protocol`, interleaved in Williams-design rounds.

    Every trial is opened (warmed up) first; those that cannot run are infeasible at
    once. Then rounds: each trial that has not failed or reached max_runs times one
    step (after a pause of `Protocol.pause_ms`), in the order `williams_order` gives the
    round, until every trial is settled, or every trial has its `min_runs` steps and either the timed
    rounds have passed the protocol's cap (`Protocol.session_cap_s`) or the whole
    session (opening included) has passed `limit_s`. A settled trial keeps its place in the rounds while another is
    unsettled: the others would otherwise run back to back, which here ran 4-6% faster
    than alternating (new-user trial 9) and made a ratio between two trials of one
    session read a speedup that was not there. Every trial is closed at the end, also on
    Ctrl-C (which propagates).

    Parameters
    ----------
    trials : the candidates (at most a few: all are alive at once).
    protocol : targets and limits.
    clock : seconds, monotonic (a fake one in tests).
    progress : told Stage(stage, steps done, None) as rounds go.
    limit_s : seconds the session may take, opening included (a search's budget left);
        like the cap it stops the session only once every trial has min_runs steps, so
        a session runs past it by at most its warm-up, min_runs steps and one round
        of each trial; <= 0: min_runs steps each. None: the protocol's cap alone.

    Returns
    -------
    One Measurement per trial, in order, all with one `session` id.
    """
    started = clock()
    try:
        for i, trial in enumerate(trials):
            progress(Stage(stage, i, len(trials), {"opening": trial.label}))
            trial.open()
        begin, round_ = clock(), 0
        while True:
            unsettled = any(not protocol.settled(t) for t in trials)
            live = [t for t in trials if t.failed is None and len(t.times_ms) < protocol.max_runs]
            warm = all(t.failed is not None or len(t.times_ms) >= protocol.min_runs for t in trials)
            now = clock()
            capped = now - begin > protocol.session_cap_s(len(trials)) or (limit_s is not None and
                                                                           now - started >= limit_s)
            if not unsettled or (warm and capped):
                break
            for trial in (live[i] for i in williams_order(len(live), round_)):
                if protocol.pause_ms:
                    time.sleep(protocol.pause_ms / 1e3)
                trial.step()
            round_ += 1
            done = sum(len(t.times_ms) for t in trials)
            progress(Stage(stage, done, None, {"round": round_, "steps": done}))
        session = uuid.uuid4().hex  # the rounds' steps of these measurements are aligned: compare pairs them
        return [replace(t.result(protocol.confidence), session=session) for t in trials]
    finally:
        for trial in trials:
            trial.close()


def compare(this: Measurement, reference: Measurement, reference_name: str, confidence: float = CONFIDENCE,
            resamples: int = 2000, seed: int = 0) -> Ratio | None:
    """The speedup of `this` over `reference` with a bootstrap CI, or None when either
    is infeasible or has no step times.

    The interval is the percentile bootstrap of median(reference) / median(this)
    (`resamples` times, seeded: deterministic). Measurements of one session (the same
    `session` id and as many steps) are resampled by whole rounds: step i of each was
    timed in round i, beside the other, so a drift of the host that slowed a round
    slowed both (the paired bootstrap: Efron and Tibshirani, An Introduction to the
    Bootstrap, 1993, ch. 6). Otherwise each sample is resampled on its own."""
    if not (this.feasible and reference.feasible and this.times_ms and reference.times_ms):
        return None
    rng = np.random.default_rng(seed)
    a, b = np.asarray(this.times_ms), np.asarray(reference.times_ms)
    paired = this.session is not None and this.session == reference.session and a.size == b.size
    rounds_b = rng.integers(0, b.size, (resamples, b.size))
    rounds_a = rounds_b if paired else rng.integers(0, a.size, (resamples, a.size))
    ratios = np.median(b[rounds_b], axis=1) / np.median(a[rounds_a], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = (float(x) for x in np.percentile(ratios, [tail, 100 - tail]))
    value = float(np.median(b) / np.median(a))
    verdict = "faster" if low > 1 else "slower" if high < 1 else "tie"
    return Ratio(value, (low, high), verdict, reference_name)


# ----------------------------------------------------------------------------- measuring a problem's candidates

def unplaced_device(problem: PlacementProblem) -> str:
    """Where the user runs the model without placer: the fastest device by profiled
    compute, "cpu" (the whole host) when that is a CPU device, else its "cuda:N"."""
    totals = problem.costs.compute_ms.sum(axis=0)
    fastest = problem.cluster.devices[int(np.argmin(totals))]
    return "cpu" if fastest.kind == "cpu" else fastest.torch_device


def unplaced_problem(problem: PlacementProblem) -> PlacementProblem:
    """`problem` on the one device `unplaced_device` names. Its memory cap: the sum of
    the CPU devices' caps when every CPU device has one (the whole host), the GPU's own."""
    device = unplaced_device(problem)
    if device == "cpu":
        caps = [d.memory_bytes for d in problem.cluster.devices if d.kind == "cpu"]
        cap = sum(caps) if caps and None not in caps else None
    else:
        cap = next(d.memory_bytes for d in problem.cluster.devices if d.torch_device == device)
    return replace(problem, cluster=parse_cluster(device, f"{device}={cap}" if cap is not None else None))


def unplaced_plan(problem: PlacementProblem, seed: int | None = None) -> Plan:
    """The single-device plan of the whole model on `unplaced_device`: what plan.json
    holds when no placement is measurably faster than running the model unplaced."""
    alone = unplaced_problem(problem)
    return make_plan(alone, (0,) * problem.n_groups, UNPLACED, seed=seed)



class Measurer:
    """Measures candidates of one problem under the protocol, remembering each in the book.

    `measure` measures only what the book lacks: candidates the problem already
    knows to be infeasible are recorded without running; the rest in one interleaved
    session (or, with a `pool`, on its worker processes at once). `session` measures
    afresh, for the final choice, with `unplaced` among them when asked, and saved
    plans beside them, each on its own devices (placer compare). Sessions started
    inside `with measurer.limited(seconds)` end by then, past min_runs steps (a
    search's budget: run_session's limit_s); the pool's fixed-step measurements are
    not limited.

    Parameters
    ----------
    workload, problem : what is measured.
    book : where measurements are kept.
    protocol : how (targets and limits).
    pool : a placer.runtime.pool.MeasurementPool, or None to measure in this process.
    progress : told how each session goes.
    clock : seconds, monotonic.
    """

    def __init__(self, workload: Workload, problem: PlacementProblem, book: MeasurementBook, protocol: Protocol,
                 pool: object | None = None, progress: Progress = quiet, clock: Clock = time.perf_counter):
        self.workload, self.problem, self.book, self.protocol = workload, problem, book, protocol
        self.pool, self.progress, self.clock = pool, progress, clock
        self.unplaced_problem = unplaced_problem(problem)
        self.limit_s: float | None = None  # each session's time limit (run_session's limit_s): see `limited`

    @contextmanager
    def limited(self, limit_s: float | None) -> Iterator[None]:
        """Sessions started in this block may take `limit_s` seconds (run_session's
        limit_s: past it only to give each candidate min_runs steps); None: no limit."""
        outer, self.limit_s = self.limit_s, limit_s
        try:
            yield
        finally:
            self.limit_s = outer

    def trial(self, candidate: Candidate | Plan | None, label: str) -> Trial:
        """A Trial of a candidate of the problem (on its cluster), of a saved Plan (on
        the plan's own devices, uncapped), or of the unplaced model (candidate None)."""
        p = self.protocol
        limits = dict(warmup=p.warmup, step_timeout_s=p.step_timeout_s, clock=self.clock)
        if candidate is None:
            device = self.unplaced_problem.cluster.devices[0]
            return EagerTrial(self.workload, device.torch_device, device.threads if device.kind == "cpu" else None,
                              label=label, **limits)
        if isinstance(candidate, Plan):
            return PlacedTrial(self.workload, candidate, label=label, **limits)
        plan = make_plan(self.problem, candidate.placement, label, microbatches=candidate.microbatches)
        return PlacedTrial(self.workload, plan, self.problem.cluster, label=label, **limits)

    def known_infeasible(self, candidate: Candidate | Plan | None) -> Measurement | None:
        """The infeasible Measurement of a candidate (None: unplaced) the problem rules out
        unrun; None for a saved Plan, which only running it judges (its devices may not
        be the problem's)."""
        if isinstance(candidate, Plan):
            return None
        problem = self.unplaced_problem if candidate is None else self.problem
        placement = (0,) * problem.n_groups if candidate is None else candidate.placement
        reasons = problem.violations(placement)
        if not reasons:
            return None
        peaks = problem.memory_per_device(placement)
        return Measurement(feasible=False, peak_bytes={d: int(b) for d, b in zip(problem.cluster.names, peaks)},
                           reason="; ".join(reasons))

    def measure(self, candidates: Sequence[Candidate | None], labels: Sequence[str] | None = None,
                stage: str = "measuring") -> list[Measurement]:
        """The book's Measurement of each candidate (None: the unplaced model),
        measuring the ones it lacks together in one session."""
        labels = list(labels) if labels is not None else ["candidate"] * len(candidates)
        todo: dict[str, tuple[Candidate | None, str]] = {}
        for candidate, label in zip(candidates, labels):
            if self.book.get(candidate) is None:
                known = self.known_infeasible(candidate)
                if known is not None:
                    self.book.record(candidate, known)
                else:
                    todo.setdefault(candidate_key(candidate), (candidate, UNPLACED if candidate is None else label))
        pooled = [(c, label) for c, label in todo.values() if c is not None] if self.pool is not None else []
        if len(pooled) > 1:  # each on its own worker's devices, at once: not interleaved
            plans = [make_plan(self.problem, c.placement, label, microbatches=c.microbatches) for c, label in pooled]
            for (candidate, _), result in zip(pooled, self.pool.measure_many(plans)):
                self.book.record(candidate, result)
            todo = {k: v for k, v in todo.items() if v[0] is None}
        if todo:
            trials = [self.trial(c, label) for c, label in todo.values()]
            try:
                results = run_session(trials, self.protocol, self.clock, self.progress, stage, self.limit_s)
            except KeyboardInterrupt:  # what was timed before it is kept
                for (candidate, _), trial in zip(todo.values(), trials):
                    if trial.failed is not None or trial.times_ms:
                        self.book.record(candidate, trial.result(self.protocol.confidence))
                raise
            for (candidate, _), result in zip(todo.values(), results):
                self.book.record(candidate, result)
        return [self.book.get(c) for c in candidates]

    def session(self, entries: Sequence[tuple[str, Candidate | Plan | None]], stage: str) -> dict[str, Measurement]:
        """Measure afresh, together and interleaved: (label, candidate) pairs, candidate
        None for the unplaced model, a Plan for a saved plan (on its own devices); the
        book is neither read nor changed. Candidates the problem rules out are
        infeasible unrun. Returns label -> Measurement."""
        results: dict[str, Measurement] = {}
        runnable = []
        for label, candidate in entries:
            known = self.known_infeasible(candidate)
            if known is not None:
                results[label] = known
            else:
                runnable.append((label, self.trial(candidate, label)))
        measured = run_session([t for _, t in runnable], self.protocol, self.clock, self.progress, stage,
                               self.limit_s)
        results.update((label, result) for (label, _), result in zip(runnable, measured))
        return {label: results[label] for label, _ in entries}

