"""The Gymnasium environment on synthetic problems: API conformance in both modes,
observations, reward shapings, infeasibility, seeding, and the measured-reward path."""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers placer/DevicePlacement-v0)
from envs.env import Outcome, PlacementEnv
from envs.features import N_FEATURES, group_features
from graphs.synthetic import random_grouped_graph
from graphs.devices import parse_cluster
from graphs.problem import PlacementProblem

N_GROUPS, MAX_GROUPS = 10, 16


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE", str(tmp_path))  # no saved calibration leaks in


def problem(tied_pairs: int = 0, memory: str | None = None, workload: str = "") -> PlacementProblem:
    graph = random_grouped_graph(N_GROUPS, seed=2, tied_pairs=tied_pairs)
    return PlacementProblem(graph, parse_cluster("cpu:0,cpu:1", memory), workload=workload)


def make(**kwargs) -> PlacementEnv:
    kwargs.setdefault("max_groups", MAX_GROUPS)
    return PlacementEnv(kwargs.pop("workload", None) or problem(), **kwargs)


def run_episode(env: PlacementEnv, placement: list[int]):
    """Play one placement in either mode; returns (rewards, last info)."""
    env.reset(seed=0)
    if env.mode == "placement":
        _, reward, terminated, truncated, info = env.step(np.array(placement))
        assert terminated and not truncated
        return [reward], info
    rewards = []
    for device in placement:
        _, reward, terminated, _, info = env.step(device)
        rewards.append(reward)
    assert terminated
    return rewards, info


@pytest.mark.parametrize("mode", ["placement", "sequential"])
def test_passes_gymnasium_env_checker(mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings count as failures too
        check_env(make(mode=mode, workload=problem(tied_pairs=1)), skip_render_check=True)


def test_registered_id_makes_the_environment():
    env = gymnasium.make("placer/DevicePlacement-v0", workload=problem(), max_groups=MAX_GROUPS, mode="sequential")
    assert isinstance(env.unwrapped, PlacementEnv)
    assert env.action_space == gymnasium.spaces.Discrete(2)


def test_placement_observation_is_padded_features_and_adjacency():
    env = make()
    obs, info = env.reset(seed=0)
    assert env.action_space == gymnasium.spaces.MultiDiscrete([2] * N_GROUPS)
    assert obs["features"].shape == (MAX_GROUPS, N_FEATURES)
    np.testing.assert_array_equal(obs["features"][:N_GROUPS], group_features(env.problem))
    assert not obs["features"][N_GROUPS:].any()
    assert obs["mask"].tolist() == [1] * N_GROUPS + [0] * (MAX_GROUPS - N_GROUPS)
    edges = {(int(u), int(v)) for u, v in zip(*np.nonzero(obs["adjacency"]))}
    assert edges == set(env.problem.groups.edges)


def test_sequential_mode_places_one_group_per_step_and_scores_at_the_end():
    placement = [i % 2 for i in range(N_GROUPS)]
    env = make(mode="sequential")
    obs, _ = env.reset(seed=0)
    assert obs["current"] == 0 and not obs["placed"].any()
    obs, reward, terminated, _, _ = env.step(1)
    assert (obs["current"], obs["placed"][0], reward, terminated) == (1, 2, 0.0, False)
    rewards, info = run_episode(env, placement)
    assert rewards[:-1] == [0.0] * (N_GROUPS - 1)
    assert info["placement"] == tuple(placement)
    assert rewards[-1] == run_episode(make(), placement)[0][0]
    with pytest.raises(RuntimeError):
        env.step(0)


def test_info_reports_the_simulated_step():
    env = make()
    placement = [0, 1] * (N_GROUPS // 2)
    _, info = run_episode(env, placement)
    expected = env.simulator.simulate(placement)
    assert info["step_ms"] == expected.step_ms and info["feasible"] and info["source"] == "sim"
    assert info["peak_bytes"] == expected.peak_bytes


@pytest.mark.parametrize("shaping, formula", [
    ("neg_sqrt", lambda ms, ref: -math.sqrt(ms / 1000)),
    ("neg_time", lambda ms, ref: -ms / 1000),
    ("speedup", lambda ms, ref: ref / ms - 1),
])
def test_reward_shapings(shaping, formula):
    env = make(reward=shaping)
    reference = min(env.simulator.simulate([d] * N_GROUPS).step_ms for d in range(2))
    for placement in ([0, 1] * (N_GROUPS // 2), [1] * N_GROUPS):
        (reward,), info = run_episode(env, placement)
        assert reward == pytest.approx(formula(info["step_ms"], reference))


def test_infeasible_placement_gets_the_penalty_and_a_reason():
    env = make(workload=problem(tied_pairs=1), follow_colocation=False)
    a, b = env.problem.colocation_sets[0]
    split = [0] * N_GROUPS
    split[b] = 1
    (reward,), info = run_episode(env, split)
    assert not info["feasible"] and "share parameters" in info["reason"]
    reference = min(env.simulator.simulate([d] * N_GROUPS).step_ms for d in range(2))
    assert reward == pytest.approx(-math.sqrt(10 * reference / 1000))
    env = make(workload=problem(tied_pairs=1), infeasible_penalty=-7.0, follow_colocation=False)
    assert run_episode(env, split)[0] == [-7.0]


@pytest.mark.parametrize("mode", ["placement", "sequential"])
def test_colocated_groups_follow_the_first_of_their_set(mode):
    env = make(workload=problem(tied_pairs=2), mode=mode)
    sets = env.problem.colocation_sets
    split = [0] * N_GROUPS
    for members in sets:
        split[members[0]] = 1  # and every other member asks for device 0
    _, info = run_episode(env, split)
    assert info["feasible"]
    for members in sets:
        assert {info["placement"][m] for m in members} == {1}


def test_memory_caps_make_placements_infeasible():
    total = int(problem().costs.memory_bytes.sum())
    env = make(workload=problem(memory=f"cpu:0={total // 2}B"))
    (reward,), info = run_episode(env, [0] * N_GROUPS)
    assert not info["feasible"] and "cpu:0" in info["reason"]
    assert reward == env.penalty()


def test_seeded_runs_repeat_exactly():
    def trajectory(seed: int):
        env = make(mode="sequential")
        env.reset(seed=seed)
        actions, rewards = [], []
        for _ in range(3 * N_GROUPS):
            action = env.action_space.sample()
            _, reward, terminated, _, _ = env.step(action)
            actions.append(int(action))
            rewards.append(reward)
            if terminated:
                env.reset()
        return actions, rewards

    assert trajectory(5) == trajectory(5)
    assert trajectory(5) != trajectory(6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        make(mode="greedy")
    with pytest.raises(ValueError, match="reward"):
        make(reward="neg_cube")
    with pytest.raises(ValueError, match="max_groups"):
        make(max_groups=N_GROUPS - 1)
    with pytest.raises(ValueError, match="workload"):
        make(reward_source="measure")  # a synthetic problem has no model to run


def test_measured_rewards_come_from_the_measure_function_handed_in():
    """The measure path with a stand-in for the runtime: what it is passed and how its answer is read."""
    calls = []

    def measure(placement):
        calls.append(placement)
        feasible = tuple(placement) != (0,) * N_GROUPS
        return Outcome(42.0 if feasible else math.inf, feasible, (1, 2), "" if feasible else "cpu:0 OOM")

    env = make(workload=problem(workload="zoo:fake"), reward_source="measure", measure=measure)
    placement = [0, 1] * (N_GROUPS // 2)
    (reward,), info = run_episode(env, placement)
    assert calls[0] == tuple(placement)
    assert info == {"step_ms": 42.0, "peak_bytes": (1, 2), "feasible": True, "source": "measure",
                    "placement": tuple(placement)}
    assert reward == pytest.approx(-math.sqrt(0.042))
    (reward,), info = run_episode(env, [0] * N_GROUPS)
    assert not info["feasible"] and info["reason"] == "cpu:0 OOM"
    # the penalty's yardstick is the best single device, measured (cpu:1 measures 42 ms)
    assert reward == pytest.approx(-math.sqrt(10 * 0.042))


def test_envs_never_import_placer():
    """Floor 2 imports only floor 1 (graphs), not even inside a function."""
    import ast
    import pathlib

    for path in pathlib.Path(envs.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "placer"], f"{path.name} imports {names}"


@pytest.mark.slow
def test_made_from_a_workload_string_as_the_cli_takes_it():
    env = gymnasium.make("placer/DevicePlacement-v0", workload="zoo:transformer:small", devices="cpu:0,cpu:1",
                         max_groups=64)
    problem = env.unwrapped.problem
    assert problem.workload == "zoo:transformer:small" and problem.cluster.names == ["cpu:0", "cpu:1"]
    obs, _ = env.reset(seed=0)
    assert obs["mask"].sum() == problem.n_groups
    _, reward, terminated, _, info = env.step(env.action_space.sample())
    assert terminated and info["step_ms"] > 0 and info["source"] == "sim"
    assert reward == pytest.approx(-math.sqrt(info["step_ms"] / 1000)) or not info["feasible"]
