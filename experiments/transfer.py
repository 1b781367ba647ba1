"""Does a policy that has seen other models start the search better on an unseen one?

Pretrains one Seq2SeqPolicy on several zoo models' placement problems in turn (RL on
the simulator, default calibration), then searches an unseen model twice per seed
for the same small number of samples: once from the pretrained policy, once from a
fresh one, neither warm-started from a heuristic (so the comparison is of the
policies alone). Reported: the mean simulated step time of the very first batch (the
policy's zero-shot quality) and the best simulated step time after each sample
budget, against the best baseline's for scale. Where a zoo model cannot be built
(no capture or profiler installed), random grouped DAGs stand in for it.

    .venv/bin/python experiments/transfer.py            # small zoo models, 3 seeds
    .venv/bin/python experiments/transfer.py --quick    # fewer samples, one seed: a check that it runs

Writes experiments/results/transfer.{json,md} (transfer_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from envs.sim import Simulator
from graphs.synthetic import random_grouped_graph
from placer.baselines import run_baselines
from graphs.devices import host_cores, parse_cluster
from graphs.errors import InfeasibleError, PlacerError
from graphs.problem import PlacementProblem
from placer.rl.policy import Seq2SeqPolicy
from placer.rl.trainer import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"


def load_problem(spec: str, args: argparse.Namespace, fallback_seed: int) -> tuple[str, PlacementProblem]:
    """The zoo model's problem, or a random grouped DAG of max_groups groups in its place."""
    try:
        from graphs.problem import build_problem
        return spec, build_problem(spec, devices=args.devices, max_groups=args.max_groups)
    except (ImportError, PlacerError) as error:
        print(f"{spec}: {error}; a random DAG stands in")
        groups = random_grouped_graph(args.max_groups, seed=fallback_seed, tied_pairs=2)
        return f"random{args.max_groups}-{fallback_seed}", PlacementProblem(groups, parse_cluster(args.devices))


def sim_score(problem: PlacementProblem):
    sim = Simulator(problem)

    def score(placements):
        return [r.step_ms if r.feasible else math.inf for r in map(sim.simulate, placements)]
    return score


def best_baseline_ms(problem: PlacementProblem) -> tuple[str, float]:
    score = sim_score(problem)
    times = {name: score([p])[0] for name, p in run_baselines(problem).items() if not isinstance(p, InfeasibleError)}
    name = min(times, key=times.get)
    return name, times[name]


def pretrain(problems: list[PlacementProblem], args: argparse.Namespace) -> Seq2SeqPolicy:
    """Round-robin RL over the problems: each round, max_samples on each."""
    torch.manual_seed(args.seed)
    policy = Seq2SeqPolicy(max_devices=8, hidden=args.hidden)
    for round_ in range(args.rounds):
        for i, problem in enumerate(problems):
            config = TrainConfig(seed=args.seed + 1000 * round_ + i, budget_s=None, max_samples=args.pretrain_samples,
                                 imitation_steps=0, hidden=args.hidden)
            result = train(problem, sim_score(problem), config, policy=policy)
            print(f"pretrain round {round_} problem {i}: best {result.best_sim_ms:.2f} ms")
    return policy


def search(problem: PlacementProblem, policy: Seq2SeqPolicy | None, seed: int, args: argparse.Namespace) -> dict:
    config = TrainConfig(seed=seed, budget_s=None, max_samples=max(args.budgets), imitation_steps=0, hidden=args.hidden)
    start = time.perf_counter()
    result = train(problem, sim_score(problem), config, policy=copy.deepcopy(policy) if policy is not None else None)
    best_at = {b: min(r["best_sim_ms"] for r in result.curve if r["samples"] <= b) for b in args.budgets}
    return {"seed": seed, "first_batch_mean_ms": result.curve[0]["mean_ms"], "best_ms_at_samples": best_at,
            "seconds": time.perf_counter() - start}


def markdown(results: dict) -> str:
    test = results["test"]
    lines = [f"# Policy transfer ({results['host']['date']})", "",
             f"Host: {results['host']['platform']}, {results['host']['cores']} cores, "
             f"torch {results['host']['torch']}. "
             f"Devices `{results['devices']}`; simulated step times (default calibration); no warm start.", "",
             f"Pretrained on: {', '.join(results['pretrain'])} ({results['rounds']} round(s) of "
             f"{results['pretrain_samples']} samples each, {results['pretrain_s']:.0f} s).",
             f"Unseen model: {test['name']} ({test['groups']} groups); best baseline {test['best_baseline']} "
             f"at {test['best_baseline_ms']:.2f} ms.", "",
             "| policy | first batch mean (ms) | "
             + " | ".join(f"best after {b} samples (ms)" for b in results["budgets"]) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in results["budgets"]) + " |"]
    for label in ("pretrained", "fresh"):
        runs = results[label]
        cells = [statistics.mean(r["first_batch_mean_ms"] for r in runs)]
        cells += [statistics.mean(r["best_ms_at_samples"][b] for r in runs) for b in results["budgets"]]
        lines.append(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", f"Means over seeds {[r['seed'] for r in results['fresh']]}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", nargs="*",
                        default=["zoo:rnnlm:small", "zoo:transformer:small", "zoo:inception_v3:small"])
    parser.add_argument("--test", default="zoo:nmt:small")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pretrain-samples", type=int, default=320)
    parser.add_argument("--budgets", type=int, nargs="*", default=[16, 64, 160], help="sample budgets compared")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="two pretraining models, few samples, one seed")
    args = parser.parse_args()
    if args.quick:
        args.pretrain, args.max_groups, args.rounds = args.pretrain[:2], 64, 1
        args.pretrain_samples, args.budgets, args.seeds = 32, [16, 32], 1
    torch.set_num_threads(1)  # tiny tensors: more threads only contend

    pretrain_problems = [load_problem(spec, args, fallback_seed=100 + i) for i, spec in enumerate(args.pretrain)]
    test_name, test_problem = load_problem(args.test, args, fallback_seed=999)
    start = time.perf_counter()
    policy = pretrain([p for _, p in pretrain_problems], args)
    pretrain_s = time.perf_counter() - start
    baseline, baseline_ms = best_baseline_ms(test_problem)
    seeds = range(args.seed, args.seed + args.seeds)
    results = {
        "host": {"platform": platform.platform(), "cores": host_cores(), "torch": torch.__version__,
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "devices": args.devices, "pretrain": [name for name, _ in pretrain_problems], "rounds": args.rounds,
        "pretrain_samples": args.pretrain_samples, "pretrain_s": pretrain_s, "budgets": args.budgets,
        "test": {"name": test_name, "groups": test_problem.n_groups, "best_baseline": baseline,
                 "best_baseline_ms": baseline_ms},
        "pretrained": [search(test_problem, policy, s, args) for s in seeds],
        "fresh": [search(test_problem, None, s, args) for s in seeds],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "transfer_quick" if args.quick else "transfer"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
