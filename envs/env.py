"""Device placement as a Gymnasium environment.

Two ways to act:

- mode="placement": the action is a whole placement, MultiDiscrete([n_devices] *
  n_groups), as a seq2seq policy emits it (Mirhoseini et al. 2017); every episode
  is one step.
- mode="sequential": the action is one group's device, Discrete(n_devices), in
  group order (Placeto-style); the observation also shows the devices chosen so
  far and which group is next. The reward comes at the last group, 0 before.

The reward scores the finished placement's step time, from the calibrated
simulator (reward_source="sim", about a millisecond) or from a measurement of real
training steps ("measure": the caller hands in `measure`, a function from a placement
to an Outcome, built on placer.runtime's measurement; envs/ never runs a model itself).
Step time becomes reward by the one rule the RL trainer uses too (envs.reward):
shapings "neg_sqrt" (the paper's), "neg_time", "neg_log" and "speedup", against the
best single device's step time; an infeasible placement (memory, split shared
parameters) gets `infeasible_penalty`, by default the reward of a step 10x slower than
that reference, and info["reason"] says why.

Groups that share parameters must share a device. With follow_colocation (the
default) the environment keeps that rule for the agent: each such group takes the
device chosen for the first group of its set (its own action is ignored), so that
a random policy is not almost always infeasible on models with tied weights or
unrolled recurrences; info["placement"] is the placement actually scored.

Made by `gymnasium.make("placer/DevicePlacement-v0", workload=..., devices=...)`
once `envs` is imported (it registers the id).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.calibrate import load_calibration
from envs.features import N_FEATURES, adjacency, group_features
from envs.reward import SHAPINGS, RewardRule, reference_ms
from envs.sim import Calibration, Simulator
from graphs.problem import Placement, PlacementProblem, build_problem

MODES = ("placement", "sequential")
SOURCES = ("sim", "measure")
# Features are fractions and log1p of ms or KiB, so they lie well below log1p(2**63 / 1024) < 64.
FEATURE_MAX = 64.0


@dataclass(frozen=True)
class Outcome:
    """What one placement scored, from either source."""

    step_ms: float
    feasible: bool
    peak_bytes: tuple
    reason: str = ""


MeasureFn = Callable[[Placement], Outcome]


class PlacementEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, workload: str | PlacementProblem, devices: str | None = None, memory: str | None = None,
                 max_groups: int = 256, mode: str = "placement", reward_source: str = "sim",
                 reward: str = "neg_sqrt", infeasible_penalty: float | None = None,
                 calibration: Calibration | None = None, follow_colocation: bool = True,
                 measure: MeasureFn | None = None):
        """`workload`: a spec as the CLI takes it ("zoo:nmt:small", a file), built into a
        problem with `devices`, `memory` and `max_groups` (graphs.problem.build_problem),
        or a PlacementProblem. `max_groups` is also the padded size of the observation.
        `calibration`: the simulator's; by default the one saved for this model and
        cluster (envs.calibrate), else the nominal one. `measure`: with
        reward_source="measure", the function that runs a placement and returns its
        Outcome (step_ms inf when infeasible).

        Raises ValueError for an unknown mode, source or shaping, a problem of more than
        max_groups groups, or reward_source="measure" without `measure`."""
        for name, value, allowed in (("mode", mode, MODES), ("reward_source", reward_source, SOURCES),
                                     ("reward", reward, SHAPINGS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        if reward_source == "measure" and measure is None:
            raise ValueError("reward_source='measure' needs `measure`, a function that runs a placement of the "
                             "workload and returns its Outcome (built on placer.runtime's measurement)")
        problem = workload if isinstance(workload, PlacementProblem) else build_problem(
            workload, devices=devices, memory=memory, max_groups=max_groups)
        if problem.n_groups > max_groups:
            raise ValueError(f"the problem has {problem.n_groups} groups, more than max_groups={max_groups}")
        self.problem = problem
        self.mode, self.reward_source, self.shaping = mode, reward_source, reward
        self.max_groups = max_groups
        self.simulator = Simulator(problem, calibration or load_calibration(problem))
        self._measure = measure
        # leader[g]: the group whose device g takes (itself unless it follows a colocation set's first group)
        self._leader = list(problem.colocation_leader if follow_colocation else range(problem.n_groups))

        n, n_dev = problem.n_groups, problem.n_devices
        features = np.zeros((max_groups, N_FEATURES), dtype=np.float32)
        features[:n] = group_features(problem)
        mask = np.zeros(max_groups, dtype=np.int8)
        mask[:n] = 1
        self._graph_obs = {"features": features, "adjacency": adjacency(problem, max_groups), "mask": mask}
        obs_spaces = {
            "features": spaces.Box(0.0, FEATURE_MAX, (max_groups, N_FEATURES), np.float32),
            "adjacency": spaces.MultiBinary([max_groups, max_groups]),
            "mask": spaces.MultiBinary(max_groups),
        }
        if mode == "placement":
            self.action_space = spaces.MultiDiscrete([n_dev] * n)
        else:
            self.action_space = spaces.Discrete(n_dev)
            obs_spaces["placed"] = spaces.MultiDiscrete([n_dev + 1] * max_groups)  # device + 1, 0 = not yet
            obs_spaces["current"] = spaces.Discrete(max_groups + 1)  # next group; n_groups when done
        self.observation_space = spaces.Dict(obs_spaces)

        self.infeasible_penalty = infeasible_penalty
        self._rule: RewardRule | None = None  # made on the first reward: it needs the reference step
        self._placed: list[int] = []

    # -- Gymnasium API -------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
        self._placed = []
        return self._observation(), {}

    def step(self, action):
        if self.mode == "placement":
            chosen = np.asarray(action).reshape(-1).tolist()
            return self._finish(tuple(int(chosen[leader]) for leader in self._leader))
        g = len(self._placed)
        if g >= self.problem.n_groups:
            raise RuntimeError("the episode is over: call reset()")
        self._placed.append(int(action) if self._leader[g] == g else self._placed[self._leader[g]])
        if len(self._placed) < self.problem.n_groups:
            return self._observation(), 0.0, False, False, {}
        return self._finish(tuple(self._placed))

    # -- scoring -------------------------------------------------------------------

    def evaluate(self, placement: Placement) -> Outcome:
        """Score a placement with the environment's reward source."""
        if self.reward_source == "sim":
            r = self.simulator.simulate(placement)
            return Outcome(r.step_ms, r.feasible, r.peak_bytes, r.reason)
        return self._measure(tuple(placement))

    @property
    def rule(self) -> RewardRule:
        """The reward rule (envs.reward), against the best single device's step time from
        the reward source (the simulator's, feasible or not, when no single device fits)."""
        if self._rule is None:
            singles = [self.simulator.simulate((d,) * self.problem.n_groups).step_ms
                       for d in range(self.problem.n_devices)]
            reference = reference_ms(self.problem, self._step_times, fallback_ms=min(singles))
            self._rule = RewardRule(self.shaping, reference)
        return self._rule

    @property
    def reference_ms(self) -> float:
        """The yardstick of "neg_log", "speedup" and of the penalty (ms)."""
        return self.rule.reference_ms

    def shape(self, step_ms: float) -> float:
        """The reward for a feasible step of step_ms."""
        return self.rule.shape(step_ms)

    def penalty(self) -> float:
        """The reward of an infeasible placement."""
        return self.infeasible_penalty if self.infeasible_penalty is not None else self.rule.penalty

    def _step_times(self, placements: list[Placement]) -> list[float]:
        outcomes = [self.evaluate(p) for p in placements]
        return [o.step_ms if o.feasible else math.inf for o in outcomes]

    def _finish(self, placement: Placement):
        outcome = self.evaluate(placement)
        info = {"step_ms": outcome.step_ms, "peak_bytes": outcome.peak_bytes, "feasible": outcome.feasible,
                "source": self.reward_source, "placement": placement}
        if outcome.feasible:
            reward = self.shape(outcome.step_ms)
        else:
            reward = self.penalty()
            info["reason"] = outcome.reason
        return self._observation(), float(reward), True, False, info

    def _observation(self) -> dict:
        # fresh arrays every time: the caller may keep or modify what it is given
        graph = {name: array.copy() for name, array in self._graph_obs.items()}
        if self.mode == "placement":
            return graph
        placed = np.zeros(self.max_groups, dtype=np.int64)
        placed[:len(self._placed)] = np.asarray(self._placed, dtype=np.int64) + 1
        return {**graph, "placed": placed, "current": len(self._placed)}
