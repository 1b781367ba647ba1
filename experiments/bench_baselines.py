"""How long each baseline takes to compute, and how good its placement is.

The issue's target: any one baseline on `zoo:nmt:paper` (a few thousand ops, <= 256
groups) in under 10 s. Also timed on random grouped DAGs of 256 and 2000 groups,
which need no model. For each (problem, method): the median compute time, the
devices it used, and the simulated step time (envs.sim, default calibration) where
the simulator is installed, or why the method found no placement.

    .venv/bin/python experiments/bench_baselines.py            # nmt:paper + random 256, 2000
    .venv/bin/python experiments/bench_baselines.py --quick    # nmt:small, one repeat: a check that it runs

Writes experiments/results/baselines.{json,md} (baselines_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _record import host_info  # this folder is on sys.path when run as a script
from graphs.synthetic import random_grouped_graph
from placer.baselines import BASELINES
from graphs.devices import parse_cluster
from graphs.errors import InfeasibleError, PlacerError
from graphs.problem import PlacementProblem

RESULTS = Path(__file__).resolve().parent / "results"


def problems(args: argparse.Namespace) -> dict[str, PlacementProblem]:
    """The benchmark's problems by label; a zoo model that cannot be built is reported and skipped."""
    built = {}
    try:
        from graphs.problem import build_problem
        built[args.workload] = build_problem(args.workload, devices=args.devices, max_groups=args.max_groups)
    except (ImportError, PlacerError) as error:
        print(f"skipping {args.workload}: {error}")
    for n in args.random:
        groups = random_grouped_graph(n, seed=args.seed, tied_pairs=n // 100)
        built[f"random{n}"] = PlacementProblem(groups=groups, cluster=parse_cluster(args.devices))
    return built


def bench(problem: PlacementProblem, method: str, repeats: int, seed: int) -> dict:
    row: dict = {"method": method}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            placement = BASELINES[method](problem, seed)
        except InfeasibleError as error:
            return {**row, "error": str(error)}
        seconds.append(time.perf_counter() - start)
    row.update(compute_s=statistics.median(seconds), devices_used=int(len(set(placement))),
               step_ms=simulated_step_ms(problem, placement))
    return row


def simulated_step_ms(problem: PlacementProblem, placement) -> float | None:
    try:
        from envs.sim import Simulator
    except ImportError:
        return None
    return float(Simulator(problem).simulate(placement).step_ms)


def markdown(results: dict) -> str:
    lines = [f"# Baseline compute time ({results['host']['date']})", "",
             f"Host: {results['host']['platform']}, {results['host']['cores']} cores, torch {results['host']['torch']}. "
             f"Devices: `{results['devices']}`. Median of {results['repeats']} run(s); "
             "step time simulated with the default calibration.", ""]
    for label, entry in results["problems"].items():
        lines += [f"## {label} ({entry['groups']} groups, {entry['edges']} edges)", "",
                  "| method | compute (s) | devices used | simulated step (ms) |", "| --- | ---: | ---: | ---: |"]
        for row in entry["methods"]:
            if "error" in row:
                lines.append(f"| {row['method']} | infeasible: {row['error']} | | |")
            else:
                step = "-" if row["step_ms"] is None else f"{row['step_ms']:.2f}"
                lines.append(f"| {row['method']} | {row['compute_s']:.3f} | {row['devices_used']} | {step} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="zoo:nmt:paper")
    parser.add_argument("--devices", default="cpu:0,cpu:1,cpu:2,cpu:3")
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--random", type=int, nargs="*", default=[256, 2000], help="sizes of random grouped DAGs")
    parser.add_argument("--methods", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="nmt:small, one repeat: check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.workload, args.repeats = args.workload.replace(":paper", ":small"), 1

    results = {
        "host": host_info(),  # experiments/_record.py: the one host-info helper
        "devices": args.devices, "repeats": args.repeats, "seed": args.seed, "problems": {},
    }
    for label, problem in problems(args).items():
        problem.costs  # derived once per problem, shared by all methods: not part of any one's time
        rows = [bench(problem, method, args.repeats, args.seed) for method in args.methods]
        results["problems"][label] = {"groups": problem.n_groups, "edges": int(len(problem.costs.edges)), "methods": rows}
        slowest = max((r.get("compute_s", 0.0) for r in rows), default=0.0)
        print(f"{label}: {problem.n_groups} groups, slowest method {slowest:.3f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "baselines_quick" if args.quick else "baselines"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2, default=_plain))
    (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / stem}.json and .md")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    main()
