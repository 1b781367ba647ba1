"""The runtime's three targets (issue 3), measured on whole training steps.

(a) Overhead: every zoo `small` model placed entirely on cpu:0 through the runtime,
    against the plain eager model with the same intra-op thread count. Target:
    within 3%.
(b) Concurrency: a model with two independent heavy branches, split over cpu:0 and
    cpu:1, against the same model all on cpu:0 of the same two-device cluster (each
    virtual device has half the cores). Target: at least 1.6x. The whole host as one
    device (`cpu`) is reported beside it, for reference.
(c) Noise: the interquartile range of repeated measurements of one placement as a
    fraction of the median. Target: under 5% on an idle host.

Placed and eager runs alternate round by round, so that drift in the host's load
hits both alike; each reported time is the median over rounds of per-round medians.

    .venv/bin/python experiments/bench_runtime.py            # for the record, on an idle host
    .venv/bin/python experiments/bench_runtime.py --quick    # a check that it runs (timings meaningless)

Writes experiments/results/runtime.{json,md} (runtime_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graphs.workload import Workload, load_workload
from graphs.zoo import ZOO
from graphs.devices import parse_cluster
from placer.baselines import expert
from placer.plan import make_plan, plan_from_assignment
from graphs.problem import build_problem
from placer.runtime import measure, measure_eager

RESULTS = Path(__file__).resolve().parent / "results"


class TwoBranches(nn.Module):
    """Two independent stacks of Linear+ReLU on the same input, summed at the end."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.left = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])
        self.right = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])

    def forward(self, x):
        return self.left(x) + self.right(x)


def median_of_rounds(results: list) -> float | None:
    medians = [r.median_ms for r in results if r.feasible]
    return float(np.median(medians)) if medians else None


def overhead(names: list[str], rounds: int, iters: int, warmup: int) -> list[dict]:
    rows = []
    cluster = parse_cluster("cpu:0")
    threads = cluster.devices[0].threads
    torch.set_num_threads(threads)  # the caller's too: it runs cpu:0's chunks itself at this count
    for name in names:
        workload = load_workload(f"zoo:{name}")
        plan = plan_from_assignment(workload.model, lambda n: "cpu:0", ["cpu:0"], leaf_modules=workload.leaf_modules)
        placed, eager = [], []
        for _ in range(rounds):
            eager.append(measure_eager(workload, threads, iters=iters, warmup=warmup))
            placed.append(measure(workload, plan, cluster, iters=iters, warmup=warmup))
        p, e = median_of_rounds(placed), median_of_rounds(eager)
        rows.append({"model": f"{name}-small", "threads": threads, "eager_ms": e, "runtime_ms": p,
                     "overhead": (p / e - 1) if p and e else None, "target": 0.03})
        print(f"overhead {name}: eager {e:.2f} ms, runtime {p:.2f} ms")
    return rows


def concurrency(width: int, depth: int, batch: int, rounds: int, iters: int, warmup: int) -> dict:
    torch.manual_seed(0)
    workload = Workload(name="two-branches", spec="experiments:two-branches", model=TwoBranches(width, depth),
                        inputs=(torch.randn(batch, width),))
    devices = ["cpu:0", "cpu:1"]
    split = plan_from_assignment(workload.model, lambda n: "cpu:1" if str(n.target).startswith("right") else "cpu:0",
                                 devices, method="split")
    single = plan_from_assignment(workload.model, lambda n: "cpu:0", devices, method="single")
    two = parse_cluster("cpu:0,cpu:1")
    host = parse_cluster("cpu")
    host_plan = plan_from_assignment(workload.model, lambda n: "cpu", ["cpu"], method="single")
    runs = {"split": [], "single": [], "host": []}
    for _ in range(rounds):
        runs["single"].append(measure(workload, single, two, iters=iters, warmup=warmup))
        runs["split"].append(measure(workload, split, two, iters=iters, warmup=warmup))
        runs["host"].append(measure(workload, host_plan, host, iters=iters, warmup=warmup))
    ms = {k: median_of_rounds(v) for k, v in runs.items()}
    result = {
        "model": f"two branches of {depth} x Linear({width}) + ReLU, batch {batch}",
        "threads_per_device": two.devices[0].threads, "host_threads": host.devices[0].threads,
        "split_ms": ms["split"], "cpu0_alone_ms": ms["single"], "whole_host_ms": ms["host"],
        "speedup": ms["single"] / ms["split"] if ms["split"] and ms["single"] else None,
        "speedup_vs_whole_host": ms["host"] / ms["split"] if ms["split"] and ms["host"] else None,
        "target": 1.6,
    }
    print(f"concurrency: split {ms['split']:.2f} ms, cpu:0 alone {ms['single']:.2f} ms, "
          f"whole host {ms['host']:.2f} ms")
    return result


def noise(repeats: int, iters: int, warmup: int) -> list[dict]:
    """IQR / median of each of `repeats` measurements of the expert placement."""
    rows = []
    for name in ("transformer", "rnnlm"):
        workload = load_workload(f"zoo:{name}")
        problem = build_problem(workload, "cpu:0,cpu:1")
        plan = make_plan(problem, expert(problem), "expert")
        results = [measure(workload, plan, problem.cluster, iters=iters, warmup=warmup) for _ in range(repeats)]
        spreads = [r.iqr_ms / r.median_ms for r in results if r.feasible]
        medians = [r.median_ms for r in results if r.feasible]
        rows.append({"model": f"{name}-small", "placement": "expert over cpu:0,cpu:1",
                     "medians_ms": medians, "iqr_over_median": spreads,
                     "median_iqr_over_median": float(np.median(spreads)) if spreads else None,
                     "spread_of_medians": (float(np.ptp(medians) / np.median(medians)) if medians else None),
                     "target": 0.05})
        print(f"noise {name}: IQR/median {np.median(spreads):.3f}")
    return rows


def write_markdown(path: Path, results: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:+.1f}%"

    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    def times(x):
        return "-" if x is None else f"{x:.2f}x"

    lines = [f"# Runtime benchmarks{' (quick: timings meaningless)' if results['quick'] else ''}", "",
             f"{results['host']}, torch {results['torch']}, {results['date']}", "",
             "## Overhead: everything on cpu:0 through the runtime vs eager (target within 3%)", "",
             "| model | threads | eager ms | runtime ms | overhead |", "| --- | --- | --- | --- | --- |"]
    for r in results["overhead"]:
        lines.append(f"| {r['model']} | {r['threads']} | {ms(r['eager_ms'])} | {ms(r['runtime_ms'])} | {pct(r['overhead'])} |")
    c = results["concurrency"]
    lines += ["", "## Concurrency: two independent branches over cpu:0,cpu:1 (target at least 1.6x)", "",
              f"{c['model']}; {c['threads_per_device']} thread(s) per virtual device, {c['host_threads']} on the host.", "",
              "| placement | ms |", "| --- | --- |",
              f"| branches split over cpu:0, cpu:1 | {ms(c['split_ms'])} |",
              f"| all on cpu:0 (same cluster) | {ms(c['cpu0_alone_ms'])} |",
              f"| all on the whole host `cpu` | {ms(c['whole_host_ms'])} |", "",
              f"Speed-up over cpu:0 alone: {times(c['speedup'])}; over the whole host: {times(c['speedup_vs_whole_host'])}.",
              "", "## Noise: IQR / median of repeated measurements (target under 5%)", "",
              "| model | placement | IQR/median per run | median | spread of medians |", "| --- | --- | --- | --- | --- |"]
    for r in results["noise"]:
        per_run = ", ".join(f"{100 * s:.1f}%" for s in r["iqr_over_median"])
        lines.append(f"| {r['model']} | {r['placement']} | {per_run} | {pct(r['median_iqr_over_median'])[1:]} | "
                     f"{pct(r['spread_of_medians'])[1:]} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a check that it runs")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    iters, warmup, rounds = (3, 1, 1) if args.quick else (args.iters, args.warmup, args.rounds)

    results = {
        "quick": args.quick, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "torch": torch.__version__,
        "iters": iters, "warmup": warmup, "rounds": rounds,
        "overhead": overhead(sorted(ZOO), rounds, iters, warmup),
        "concurrency": concurrency(*((256, 2, 64) if args.quick else (1024, 6, 256)), rounds, iters, warmup),
        "noise": noise(2 if args.quick else 5, iters, warmup),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "runtime_quick" if args.quick else "runtime"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(RESULTS / f"{stem}.md", results)
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
