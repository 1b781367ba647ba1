"""An RL search's wall time with torch's intra-op threads at 2 against 1 (the policy's
ops; placer.search_stage runs searches on one), interleaved 2, 1, 1, 2 per repetition,
on the simulator alone (no measurement). Run it on a quiet host, and again beside a
competing two-thread process to see what a busy host does to each.

    .venv/bin/python experiments/bench_search_threads.py zoo:gpt:medium --samples 256 --reps 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from graphs.problem import build_problem
from placer.rl import TrainConfig
from placer.search import run
from placer.search.scorer import SimulatedScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", nargs="?", default="zoo:gpt:medium")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    problem = build_problem(args.workload, devices="cpu:0,cpu:1")
    config = TrainConfig(seed=0, budget_s=None, max_samples=args.samples, measure_top_k=0)
    times: dict[int, list[float]] = {1: [], 2: []}
    for threads in [2, 1, 1, 2] * args.reps:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        run("rl", problem, SimulatedScorer(problem), config, None)
        times[threads].append(time.perf_counter() - start)
    for threads in (2, 1):
        print(f"{threads} thread(s): median {statistics.median(times[threads]):.2f} s, runs "
              f"{', '.join(f'{t:.2f}' for t in times[threads])}")


if __name__ == "__main__":
    main()
