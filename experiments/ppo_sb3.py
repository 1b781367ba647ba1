"""A stock RL library trains on the placement environment: PPO from stable-baselines3.

Shows that `placer/DevicePlacement-v0` is an ordinary Gymnasium environment: PPO
with SB3's MultiInputPolicy, untouched, proposes whole placements (placement mode,
simulator rewards) of a zoo model. The best placement it found is compared with the
best of as many uniformly random placements and with the heuristics (placer.baselines).

stable-baselines3 is not a dependency of placer: install it into the environment
for this experiment only (`pip install stable-baselines3`; it uses the installed torch).

    .venv/bin/python experiments/ppo_sb3.py            # zoo:nmt:small, 5,000 steps
    .venv/bin/python experiments/ppo_sb3.py --quick    # 512 steps: a check that it runs

Writes experiments/results/ppo_sb3.{json,md} (ppo_sb3_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3 import PPO

from _record import host_info  # this folder is on sys.path when run as a script
import envs  # noqa: F401  (registers placer/DevicePlacement-v0)
from placer.baselines import run_baselines
from graphs.errors import InfeasibleError
from graphs.problem import build_problem

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Best:
    """The fastest feasible placement seen so far, and how many were scored."""

    step_ms: float = math.inf
    placement: tuple[int, ...] = ()
    scored: int = 0
    feasible: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (placements scored, best ms) at each improvement

    def see(self, info: dict) -> None:
        self.scored += 1
        if info["feasible"]:
            self.feasible += 1
            if info["step_ms"] < self.step_ms:
                self.step_ms, self.placement = info["step_ms"], tuple(info["placement"])
                self.curve.append((self.scored, self.step_ms))


class TrackBest(gym.Wrapper):
    """Records every placement the agent tries (through info) in a Best."""

    def __init__(self, env: gym.Env, best: Best):
        super().__init__(env)
        self.best = best

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if "step_ms" in info:
            self.best.see(info)
        return obs, reward, terminated, truncated, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="zoo:nmt:small")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--steps", type=int, default=5_000, help="placements PPO may try")
    parser.add_argument("--n-steps", type=int, default=128, help="PPO rollout length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="512 steps: check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.n_steps = 512, 64
    torch.set_num_threads(1)

    problem = build_problem(args.workload, devices=args.devices)

    def make_env() -> gym.Env:  # padded to the model's own group count: a smaller policy input
        return gym.make("placer/DevicePlacement-v0", workload=problem, max_groups=problem.n_groups)

    ppo_best = Best()
    started = time.perf_counter()
    model = PPO("MultiInputPolicy", TrackBest(make_env(), ppo_best), n_steps=args.n_steps, batch_size=args.n_steps,
                seed=args.seed, verbose=0, device="cpu")
    model.learn(total_timesteps=args.steps)
    ppo_seconds = time.perf_counter() - started

    random_best = Best()
    env = TrackBest(make_env(), random_best)
    env.reset(seed=args.seed)
    for _ in range(ppo_best.scored):
        env.step(env.action_space.sample())

    simulator = env.unwrapped.simulator
    baselines = {name: (simulator.simulate(p).step_ms if not isinstance(p, InfeasibleError) else None)
                 for name, p in run_baselines(problem).items()}
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": host_info(), "workload": args.workload,
        "devices": args.devices, "groups": problem.n_groups, "steps": args.steps, "seed": args.seed,
        "ppo": {"best_ms": ppo_best.step_ms, "placement": list(ppo_best.placement), "scored": ppo_best.scored,
                "feasible": ppo_best.feasible, "curve": ppo_best.curve, "seconds": ppo_seconds},
        "random": {"best_ms": random_best.step_ms, "scored": random_best.scored, "feasible": random_best.feasible},
        "baselines_ms": baselines,
    }
    print(f"{args.workload} on {args.devices} ({problem.n_groups} groups), {ppo_best.scored} placements each, "
          f"simulated step time:")
    print(f"  PPO best         {ppo_best.step_ms:8.2f} ms ({ppo_best.feasible} feasible, {ppo_seconds:.0f} s)")
    print(f"  random best      {random_best.step_ms:8.2f} ms ({random_best.feasible} feasible)")
    for name, ms in baselines.items():
        print(f"  {name:16s} " + (f"{ms:8.2f} ms" if ms is not None else "infeasible"))

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ppo_sb3_quick" if args.quick else "ppo_sb3"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    rows = [("PPO (stable-baselines3)", ppo_best.step_ms), ("random", random_best.step_ms)]
    rows += [(name, ms) for name, ms in baselines.items() if ms is not None]
    (RESULTS / f"{stem}.md").write_text("\n".join(
        [f"# PPO from stable-baselines3 on the placement environment ({results['date']})", "",
         f"`{args.workload}` on `{args.devices}`, {problem.n_groups} groups; PPO and random search each scored "
         f"{ppo_best.scored} placements with the (default-calibrated) simulator.", "",
         "| method | best simulated step (ms) |", "| --- | ---: |"]
        + [f"| {name} | {ms:.2f} |" for name, ms in rows]) + "\n")
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
