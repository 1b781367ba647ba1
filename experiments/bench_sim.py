"""How many placements the simulator scores per second.

The issue's target: at least 1,000 simulate() calls a second for a 256-group graph
on one core. Random grouped DAGs (no model needed) on 2 and 4 virtual CPU devices;
each call is a new random placement, so the memo cache never answers (the cached
rate, a placement seen before, is reported apart), and the timeline variant (what
the report draws) is timed too.

    .venv/bin/python experiments/bench_sim.py            # 256 and 1024 groups, 5,000 placements
    .venv/bin/python experiments/bench_sim.py --quick    # 256 groups, 300 placements: a check that it runs

Writes experiments/results/bench_sim.{json,md} (bench_sim_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _record import host_info  # this folder is on sys.path when run as a script
from envs.sim import Simulator
from graphs.synthetic import random_grouped_graph
from graphs.devices import parse_cluster
from graphs.problem import PlacementProblem

RESULTS = Path(__file__).resolve().parent / "results"


def per_second(run: Callable[[], int], repeats: int = 3) -> float:
    """Calls a second of `run` (which makes some calls and returns how many): the best
    of `repeats` timings, the one least disturbed by other load."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        calls = run()
        best = max(best, calls / (time.perf_counter() - start))
    return best


def bench(n_groups: int, devices: str, count: int, seed: int) -> dict:
    problem = PlacementProblem(random_grouped_graph(n_groups, seed=seed, tied_pairs=n_groups // 100),
                               parse_cluster(devices))
    rng = np.random.default_rng(seed)
    placements = [tuple(rng.integers(0, problem.n_devices, n_groups).tolist()) for _ in range(count)]

    def fresh() -> int:  # a new simulator each time, so that no call is answered from its cache
        sim = Simulator(problem)
        for p in placements:
            sim.simulate(p)
        return count

    sim = Simulator(problem)

    def cached() -> int:
        for _ in range(count):
            sim.simulate(placements[0])
        return count

    def with_timeline() -> int:
        for p in placements[:100]:
            sim.simulate(p, timeline=True)
        return len(placements[:100])

    return {"groups": n_groups, "edges": int(len(problem.costs.edges)), "devices": devices,
            "per_second": per_second(fresh), "cached_per_second": per_second(cached),
            "timeline_per_second": per_second(with_timeline)}


def markdown(results: dict) -> str:
    lines = [f"# Simulator speed ({results['host']['date']})", "",
             f"Host: {results['host']['platform']}, one Python thread. Random placements of random grouped DAGs; "
             "target >= 1,000 a second at 256 groups.", "",
             "| groups | edges | devices | placements/s | cached/s | with timeline/s |",
             "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in results["rows"]:
        lines.append(f"| {r['groups']} | {r['edges']} | `{r['devices']}` | {r['per_second']:,.0f} | "
                     f"{r['cached_per_second']:,.0f} | {r['timeline_per_second']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--devices", nargs="*", default=["cpu:0,cpu:1", "cpu:0,cpu:1,cpu:2,cpu:3"])
    parser.add_argument("--placements", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="256 groups, 300 placements: check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.groups, args.placements = [256], 300
    if hasattr(os, "sched_setaffinity"):  # one core, as the target says
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    rows = []
    for n in args.groups:
        for devices in args.devices:
            row = bench(n, devices, args.placements, args.seed)
            rows.append(row)
            print(f"{n} groups on {devices}: {row['per_second']:,.0f} placements/s "
                  f"(cached {row['cached_per_second']:,.0f}/s, with timeline {row['timeline_per_second']:,.0f}/s)")
    results = {"host": host_info(),  # experiments/_record.py: the one host-info helper
               "placements": args.placements, "seed": args.seed, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_sim_quick" if args.quick else "bench_sim"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
