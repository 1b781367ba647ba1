"""The one reward rule: its shapings and penalty, and that the env and the trainer share it."""

from __future__ import annotations

import math

import pytest

from envs.env import PlacementEnv
from envs.reward import SHAPINGS, RewardRule, reference_ms
from graphs.devices import parse_cluster
from graphs.problem import Candidate, PlacementProblem
from graphs.synthetic import random_grouped_graph
from placer.rl.trainer import TrainConfig, reward_rule
from placer.search.scorer import SimulatedScorer


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE", str(tmp_path))  # no saved calibration leaks in


def problem(memory: str | None = None) -> PlacementProblem:
    return PlacementProblem(random_grouped_graph(10, seed=2), parse_cluster("cpu:0,cpu:1", memory))


@pytest.mark.parametrize("shaping, formula", [
    ("neg_sqrt", lambda t, r: -math.sqrt(t / 1000)),
    ("neg_time", lambda t, r: -t / 1000),
    ("neg_log", lambda t, r: -math.log(t / r)),
    ("speedup", lambda t, r: r / t - 1),
])
def test_shapings_and_the_penalty(shaping, formula):
    rule = RewardRule(shaping, reference_ms=40.0)
    for t in (10.0, 40.0, 90.0):
        assert rule(t) == pytest.approx(formula(t, 40.0))
    assert rule(math.inf) == rule(math.nan) == pytest.approx(formula(400.0, 40.0)) == rule.penalty
    assert rule(10.0) > rule(40.0) > rule(90.0) > rule.penalty  # faster is better, infeasible is worst


def test_a_bad_rule_is_refused():
    with pytest.raises(ValueError, match="reward"):
        RewardRule("neg_cube", 1.0)
    with pytest.raises(ValueError, match="reference"):
        RewardRule("speedup", 0.0)


def test_the_reference_is_the_warm_start_else_the_best_feasible_single_device():
    p = problem()
    score = SimulatedScorer(p)

    def times(placements):
        return score.score([Candidate(tuple(x)) for x in placements])

    singles = times([(0,) * 10, (1,) * 10])
    assert reference_ms(p, times) == min(singles)
    warm = (0, 1) * 5
    assert reference_ms(p, times, warm) == times([warm])[0]
    capped = problem(memory="cpu:0=1B,cpu:1=1B")  # nothing fits anywhere
    assert reference_ms(capped, SimulatedScorer(capped).score and (lambda ps: [math.inf] * len(ps)),
                        fallback_ms=7.0) == 7.0


@pytest.mark.parametrize("shaping", SHAPINGS)
def test_the_env_and_the_trainer_give_the_same_reward_for_the_same_step_time(shaping):
    p = problem()
    env = PlacementEnv(p, max_groups=16, reward=shaping)
    trainer = reward_rule(p, SimulatedScorer(p), TrainConfig(reward=shaping))
    assert trainer == env.rule
    for step_ms in (1.0, env.reference_ms, 3 * env.reference_ms, math.inf):
        assert trainer(step_ms) == pytest.approx(env.shape(step_ms) if math.isfinite(step_ms) else env.penalty())
