"""The search seam (placer.search.run) and the yardsticks: equal budgets, the warm start
never lost, colocation kept, measurement bookkeeping shared."""

from __future__ import annotations

import importlib
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from graphs.devices import parse_cluster
from graphs.errors import InfeasibleError
from graphs.problem import Candidate, PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.baselines import run_baselines
from placer.rl import TrainConfig
from placer.search import METHODS, SearchConfig, microbatch_options, overrides, run
from placer.search.exhaustive import candidate_count, enumerates, optimum
from placer.search.local_search import neighbour
from placer.search.random_search import block_candidates, random_candidates
from placer.search.scorer import SimulatedScorer
from placer.search.state import SearchState, budget_left, measure_round


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n=16, devices="cpu:0,cpu:1,cpu:2", tied_pairs=2, seed=4, memory=None):
    return PlacementProblem(random_grouped_graph(n, seed=seed, tied_pairs=tied_pairs), parse_cluster(devices, memory))


class Counting(SimulatedScorer):
    """The simulator, a 'real machine' 10% slower than it, and a count of every call."""

    def __init__(self, problem):
        super().__init__(problem, measure=lambda c: 1.1 * self.score([c])[0])
        self.scored, self.measured_calls, self.refit_calls = 0, [], 0

    def score(self, candidates):
        self.scored += len(candidates)
        return super().score(candidates)

    def measure(self, candidates, limit_s=None, afresh=False):
        self.measured_calls.append(list(candidates))
        return super().measure(candidates, limit_s)

    def refit(self):
        self.refit_calls += 1


CONFIG = TrainConfig(budget_s=None, max_samples=96, batch_size=8, measure_every=4, measure_top_k=2, hidden=16,
                     imitation_steps=50, first_round=1)  # RL's first round one batch long: rounds line up


def best_heuristic(problem):
    scorer = SimulatedScorer(problem)
    placements = [p for p in run_baselines(problem).values() if not isinstance(p, InfeasibleError)]
    return min(placements, key=lambda p: scorer.score([Candidate(p)])[0])


@pytest.mark.parametrize("method", METHODS)
def test_every_search_spends_the_same_budget_and_never_loses_the_warm_start(method):
    problem = synthetic()
    warm = best_heuristic(problem)
    scorer = Counting(problem)
    result = run(method, problem, scorer, CONFIG, warm)
    assert result.method == method and result.samples == 96 and result.rounds == 12
    assert [row["samples"] for row in result.curve] == list(range(8, 97, 8))
    # measurement rounds after rounds 4, 8 and 12 (2 candidates each), then the end: 2 more + the warm start
    assert [len(batch) for batch in scorer.measured_calls][:3] == [2, 2, 2]
    assert len(result.measured) <= 3 * 2 + 3 and Candidate(warm) in dict(result.measured)
    assert len({c for c, _ in result.measured}) == len(result.measured)  # nothing measured twice
    best_ms = min(ms for _, ms in result.measured)
    assert result.best_measured_ms == best_ms <= dict(result.measured)[Candidate(warm)]
    for candidate, _ in result.measured:
        for members in problem.colocation_sets:  # every candidate keeps colocation
            assert len({candidate.placement[m] for m in members}) == 1


@pytest.mark.parametrize("method", METHODS)
def test_the_closing_session_of_the_finalists_chooses_not_the_luckiest_measurement(method):
    """The first candidate a search measures catches a fast moment of the host (half its time):
    the best of all measurements would pick it. The closing session measures the finalists
    (the best measured, and the warm start) again side by side, and only it chooses."""
    problem = synthetic()
    warm = Candidate(best_heuristic(problem))
    truth, lucky = SimulatedScorer(problem), []

    def measure(candidate):
        ms = 1.1 * truth.score([candidate])[0]
        if not lucky and candidate != warm:
            lucky.append(candidate)
            return 0.5 * ms
        return ms

    def search(finalists):
        lucky.clear()
        scorer = Closing(problem, measure)
        return scorer, run(method, problem, scorer, replace(CONFIG, finalists=finalists), warm)

    scorer, result = search(3)
    measured = dict(result.measured)
    assert min(measured, key=measured.get) == lucky[0]  # the luckiest of every session's measurements
    finalists = sorted(measured, key=measured.get)[:3]
    assert scorer.closing == [[*finalists, *([warm] if warm not in finalists else [])]]
    final = dict(result.final)
    assert final[lucky[0]] == pytest.approx(1.1 * truth.score([lucky[0]])[0])  # measured again: no luck
    assert result.best == min(final, key=final.get) and final[result.best] <= final[warm]
    assert [len(batch) for batch in scorer.measured_calls][:3] == [2, 2, 2]  # the cadence is unchanged
    scorer, result = search(0)
    assert scorer.closing == [] and result.final == [] and result.best == lucky[0]


class Closing(SimulatedScorer):
    """`measure_fn` stands in for the real machine; the closing session's calls are kept in `closing`."""

    def __init__(self, problem, measure_fn):
        super().__init__(problem, measure=measure_fn)
        self.measured_calls, self.closing = [], []

    def measure(self, candidates, limit_s=None, afresh=False):
        (self.closing if afresh else self.measured_calls).append(list(candidates))
        return super().measure(candidates, limit_s)


@pytest.mark.parametrize("method", METHODS)
def test_a_space_no_larger_than_the_sample_budget_is_enumerated_at_the_same_budget_and_cadence(method):
    problem = synthetic(5, devices="cpu:0,cpu:1", tied_pairs=1)
    config = replace(CONFIG, microbatches=(1, 2))
    count = candidate_count(problem, (1, 2))
    assert count < config.max_samples
    found = optimum(problem, SimulatedScorer(problem), (1, 2))
    scored = []

    class Recording(Counting):
        def score(self, candidates):
            scored.extend(candidates)
            return super().score(candidates)

    scorer = Recording(problem)
    result = run(method, problem, scorer, config, best_heuristic(problem))
    assert result.method == method and result.enumerated == count and result.policy is None
    assert result.samples == 96 and result.rounds == 12  # as a sampling search: test_every_search_spends...
    assert [len(batch) for batch in scorer.measured_calls][:3] == [2, 2, 2]
    assert len(set(scored)) == count  # every candidate, and nothing else
    assert result.best_sim_ms == found.ms and scorer.score([result.best])[0] == found.ms
    # without a sample budget (nor a time budget here) it ends once every candidate is scored
    once = run(method, problem, Counting(problem), replace(config, max_samples=None), best_heuristic(problem))
    assert once.enumerated == count and once.samples == count and once.rounds == math.ceil(count / config.batch_size)
    # a sample budget smaller than the space, or no sample budget and a space above SMALL: sampled
    assert run("random_search", problem, scorer, replace(config, max_samples=count - 1)).enumerated is None
    assert enumerates(problem, replace(config, max_samples=None))
    assert not enumerates(synthetic(16, tied_pairs=0), replace(config, max_samples=None))  # 3**16 * 2


def test_local_search_never_returns_worse_than_its_start_and_improves_a_poor_one():
    problem = synthetic(24, tied_pairs=0)
    scorer = SimulatedScorer(problem)
    start = (0,) * 24
    start_ms = scorer.score([Candidate(start)])[0]
    for seed in range(3):
        config = SearchConfig(seed=seed, budget_s=None, max_samples=200, measure_top_k=0, anneal=0.05)
        result = run("local_search", problem, scorer, config, start)
        assert result.best_sim_ms <= start_ms
        assert scorer.score([result.best])[0] == result.best_sim_ms
    assert result.best_sim_ms < start_ms  # three devices beat one on a graph with parallel branches


def test_a_neighbour_moves_exactly_one_colocation_set_or_the_microbatch_count():
    problem = synthetic(20, tied_pairs=3)
    leader = np.asarray(problem.colocation_leader)
    sets = [np.flatnonzero(leader == g) for g in np.unique(leader)]
    rng = np.random.default_rng(0)
    start = Candidate(tuple([0] * 20), 2)
    for _ in range(100):
        moved = neighbour(start, sets, 3, (1, 2, 4), rng)
        changed = {g for g in range(20) if moved.placement[g] != start.placement[g]}
        if moved.microbatches != start.microbatches:
            assert not changed
        else:
            assert any(changed == set(s.tolist()) for s in sets)


def test_searches_are_reproducible_for_a_seed():
    problem = synthetic()
    for method in METHODS:
        first, second = (run(method, problem, SimulatedScorer(problem), CONFIG.__class__(
            **{**CONFIG.__dict__, "measure_top_k": 0}), best_heuristic(problem)) for _ in range(2))
        assert first.best == second.best and [r["mean_ms"] for r in first.curve] == [r["mean_ms"] for r in second.curve]


def test_run_refuses_an_unknown_method_and_an_infeasible_warm_start():
    problem = synthetic(memory="cpu:0=1B")
    with pytest.raises(ValueError, match="unknown search 'annealing'"):
        run("annealing", problem, SimulatedScorer(problem), CONFIG)
    with pytest.raises(InfeasibleError, match="cpu:0"):
        run("local_search", problem, SimulatedScorer(problem), CONFIG, (0,) * 16)


def test_a_search_with_nothing_feasible_returns_no_best():
    problem = synthetic(memory="cpu:0=1B,cpu:1=1B,cpu:2=1B")
    for method in METHODS:
        result = run(method, problem, Counting(problem), CONFIG)
        assert result.best is None and result.best_sim_ms == math.inf and result.best_measured_ms is None


@pytest.mark.parametrize("method", METHODS)
def test_a_search_hands_back_its_best_distinct_feasible_candidates_fastest_first(method):
    problem = synthetic(memory="cpu:0=40MB")  # a quarter of the model's memory: many random candidates do not fit
    scored = {}

    class Recording(SimulatedScorer):
        def score(self, candidates):
            times = super().score(candidates)
            scored.update(zip(candidates, times))
            return times

    scorer = Recording(problem)
    result = run(method, problem, scorer, replace(CONFIG, measure_top_k=0, keep_top=10), best_heuristic(problem))
    candidates, times = [c for c, _ in result.top], [ms for _, ms in result.top]
    assert math.inf in scored.values()  # there were infeasible candidates to leave out
    assert len(result.top) == 10 and len(set(candidates)) == 10
    assert times == sorted(times) and times == [scored[c] for c in candidates] and math.inf not in times
    assert result.top[0] == (result.best, result.best_sim_ms)
    assert all(ms >= times[-1] for c, ms in scored.items() if c not in candidates)  # nothing faster left out


def test_block_candidates_are_a_few_contiguous_stages_keeping_colocation():
    problem = synthetic(24, tied_pairs=2)
    candidates = block_candidates(problem, (1, 4), np.random.default_rng(0), 50)
    assert len(candidates) == 50 and {c.microbatches for c in candidates} == {1, 4}
    leader = problem.colocation_leader
    for c in candidates:
        assert all(c.placement[g] == c.placement[leader[g]] for g in range(24))
        free = [d for g, d in enumerate(c.placement) if leader[g] == g]  # the blocks, before colocation
        changes = sum(a != b for a, b in zip(free, free[1:]))
        assert changes < 2 * problem.n_devices  # at most 2 * devices blocks
    assert len({c.placement for c in candidates}) > 40  # random, not one pattern
    # uniformly random candidates change device at about two groups in three
    uniform = random_candidates(problem, (1,), np.random.default_rng(0), 50)
    assert max(sum(a != b for a, b in zip(c.placement, c.placement[1:])) for c in uniform) >= 2 * problem.n_devices


def test_rl_starts_every_micro_batch_count_from_interleaved_stage_like_and_scattered_candidates():
    from placer.baselines.pipeline import interleaved_stages
    from placer.rl.starts import interleaved_candidates, seed_candidates

    problem = synthetic(24, tied_pairs=0)
    batch = seed_candidates(problem, Candidate((0,) * 24), (1, 2, 4), 20, seed=3)
    assert batch[:2] == [Candidate((0,) * 24, 2), Candidate((0,) * 24, 4)]  # the warm start at the other counts
    # interleaved stages: 2, 3, 4 and 6 stages a device on 3 devices (at most 24 stages), at 2 and 4 micro-batches
    interleaved = interleaved_candidates(problem, (1, 2, 4))
    assert set(interleaved) == {interleaved_stages(problem, c, m) for c in (2, 3, 4, 6) for m in (2, 4)}
    assert len(set(interleaved)) == len(interleaved)  # each plan once
    k = 2 + len(interleaved)
    assert batch[2:k] == interleaved
    rng = np.random.default_rng(3)  # then half stage-like candidates, half uniformly random ones
    half = (20 - k) // 2
    assert batch[k:] == (block_candidates(problem, (1, 2, 4), rng, half)
                         + random_candidates(problem, (1, 2, 4), rng, 20 - k - half))
    # a restart draws other random candidates, and no interleaved ones (they are scored already)
    again = seed_candidates(problem, None, (1, 2, 4), 20, seed=3, start=1)
    rng = np.random.default_rng([3, 1])
    assert again == block_candidates(problem, (1, 2, 4), rng, 10) + random_candidates(problem, (1, 2, 4), rng, 10)


def test_overrides_read_each_field_as_its_type_and_refuse_unknown_ones():
    config = overrides(TrainConfig(), ["lr=0", "algo=reinforce", "budget_s=none", "max_samples=500",
                                       "microbatches=1,2", "normalize_advantages=false"])
    assert (config.lr, config.algo, config.budget_s, config.max_samples, config.microbatches,
            config.normalize_advantages) == (0.0, "reinforce", None, 500, (1, 2), False)
    with pytest.raises(ValueError, match="'learning_rate=1'"):
        overrides(TrainConfig(), ["learning_rate=1"])
    with pytest.raises(ValueError, match="'batch_size=many'"):
        overrides(SearchConfig(), ["batch_size=many"])
    with pytest.raises(ValueError, match="algo"):
        overrides(TrainConfig(), ["algo=sarsa"])


def test_microbatch_options_come_from_the_profile():
    problem = synthetic()
    assert microbatch_options(problem) == (1,)
    problem.groups.graph["microbatch_step_ms"] = {1: 10.0, 2: 11.0, 4: 13.0}
    assert microbatch_options(problem) == (1, 2, 4)
    problem.groups.graph["microbatch_step_ms_by_kind"] = {"cpu": {"1": 10.0, "2": 11.0}}  # JSON keys
    assert microbatch_options(problem) == (1, 2)


class FakeTime:
    """A fake search clock: each reading advances it `tick` s; `measure_s` per measured candidate."""

    def __init__(self, tick=0.01, measure_s=1.0):
        self.now, self.tick, self.measure_s = 0.0, tick, measure_s

    def clock(self, already_s=0.0):
        self.now = already_s

        def read():
            self.now += self.tick
            return self.now
        return read


class TimedScorer(Counting):
    """Counting, whose measurement session advances the fake clock by its cost: `measure_s`
    per candidate (the first session; `later_s` per candidate after it), cut at the session's
    limit as the protocol cuts it (placer.measurements.run_session): never below `floor_s` per
    candidate (the warm-up and min_runs steps). Keeps each session's (start, limit)."""

    def __init__(self, problem, time, later_s=None, floor_s=None):
        super().__init__(problem)
        self.time, self.later_s, self.floor_s, self.limits = time, later_s, floor_s, []

    def measure(self, candidates, limit_s=None, afresh=False):
        self.limits.append((self.time.now, limit_s))
        per = self.later_s if self.later_s is not None and len(self.limits) > 1 else self.time.measure_s
        cost, floor = per * len(candidates), (self.floor_s if self.floor_s is not None else per) * len(candidates)
        self.time.now += cost if limit_s is None else min(cost, max(limit_s, floor))
        return super().measure(candidates, limit_s)


def search_on_fake_time(method: str, monkeypatch, **timing):
    """`method` run on a synthetic problem with a 20 s budget, measuring every 2 rounds, on fake
    time (TimedScorer(**timing) sets what sessions cost): (time, scorer, warm start, result)."""
    time = FakeTime()
    for module in ("placer.search.state", "placer.rl.trainer"):
        monkeypatch.setattr(importlib.import_module(module), "Clock", time.clock)
    problem = synthetic()
    warm = best_heuristic(problem)
    scorer = TimedScorer(problem, time, **timing)
    config = TrainConfig(**{**CONFIG.__dict__, "budget_s": 20.0, "max_samples": None, "measure_every": 2})
    return time, scorer, warm, run(method, problem, scorer, config, warm)


@pytest.mark.parametrize("method", METHODS)
def test_a_time_budget_covers_the_closing_measurement(method, monkeypatch):
    time, scorer, warm, result = search_on_fake_time(method, monkeypatch)
    # periodic sessions ran, and the closing one (2 best + the warm start, 3 s) ended within the budget
    assert len(scorer.measured_calls) >= 2 and Candidate(warm) in dict(result.measured)
    # within the budget, give or take the last round's own compute (not reserved: at most ~0.15 fake s here);
    # without the reserve the closing 3 s would end near 22 s
    assert time.now <= 20.0 + 0.25 and result.elapsed_s == time.now
    assert result.rounds >= 4  # the reserve held rounds back only near the end, not from the start


@pytest.mark.parametrize("method", METHODS)
def test_measurements_slower_than_predicted_are_cut_to_the_budget_and_still_measure_the_warm_start(method, monkeypatch):
    # The first session costs 1 s a candidate; every later one would take 10 s a candidate (a loaded
    # host; the user's 45 s round in a 60 s budget), but the protocol can stop one at its fewest steps
    # (0.5 s a candidate) once its limit has passed.
    time, scorer, warm, result = search_on_fake_time(method, monkeypatch, later_s=10.0, floor_s=0.5)
    assert Candidate(warm) in dict(result.measured)  # the closing round ran: the final choice needs it
    # each limit is the budget left when the round began (a clock reading, 0.01 fake s, before the session)
    assert all(limit is not None and start + limit <= 20.0 + time.tick for start, limit in scorer.limits)
    # Uncut, the second session alone would end past 20 s (2 x 10 s). Cut, the search ends within the
    # budget plus the fewest steps of the closing round (3 candidates x 0.5 s) and of the closing session
    # (at most finalists + 1 = 4 candidates x 0.5 s), and the last round's compute.
    assert len(scorer.limits) >= 2 and time.now <= 20.0 + 7 * 0.5 + 0.25 and result.elapsed_s == time.now


def test_a_periodic_measurement_that_would_overrun_is_left_to_the_closing_round():
    problem = synthetic()
    scorer, time = Counting(problem), FakeTime(tick=0.0)
    state = SearchState(rounds=2, measure_s=4.0, measure_n=2)  # 2 s per measured candidate so far
    candidates = [Candidate((0,) * 16), Candidate((1,) * 16)]
    state.remember(candidates, scorer.score(candidates), keep=8)
    config = SearchConfig(budget_s=20.0, measure_every=2, measure_top_k=2, finalists=0)
    # 2 candidates at 2 s each, then the closing reserve of 3 x 2 s, would end at 20.5 s
    clock = time.clock(already_s=10.5)
    assert not measure_round(state, scorer, config, clock) and scorer.measured_calls == []
    assert budget_left(state, config, 13.5) and not budget_left(state, config, 14.5)  # reserve: 6 s
    # the closing session's finalists and the warm start are reserved too: (3 + 1 + 1) x 2 s
    longer = replace(config, budget_s=40.0, finalists=1)
    assert budget_left(state, longer, 29.5) and not budget_left(state, longer, 30.5)
    time.now = 9.5  # now they end at 19.5 s: measured
    measure_round(state, scorer, config, clock)
    assert scorer.measured_calls == [candidates]


def test_the_exhaustive_optimum_is_the_fastest_of_every_candidate_and_no_search_beats_it():
    problem = synthetic(9, devices="cpu:0,cpu:1", tied_pairs=2)
    scorer = SimulatedScorer(problem)
    found = optimum(problem, scorer, options=(1, 2), chunk=7)  # a chunk that does not divide the count
    sets = len(set(problem.colocation_leader))
    assert found.candidates == candidate_count(problem, (1, 2)) == 2 ** sets * 2
    # every assignment of devices that keeps colocation, enumerated independently
    every = [Candidate(p, m) for p in itertools.product(range(2), repeat=9) for m in (1, 2)
             if all(len({p[g] for g in members}) == 1 for members in problem.colocation_sets)]
    assert len(every) == found.candidates
    assert found.ms == min(scorer.score(every)) == scorer.score([found.best])[0]
    for method in METHODS:
        config = replace(CONFIG, measure_top_k=0, microbatches=(1, 2))
        assert run(method, problem, scorer, config, best_heuristic(problem)).best_sim_ms >= found.ms
    assert optimum(problem, scorer, options=(1, 2), limit=found.candidates - 1) is None
