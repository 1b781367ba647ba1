"""Pinned against unpinned workers on branchy plans (a diagnosis for the pinning default).

Virtual CPU devices' workers are pinned to their own cores (docs/DESIGN.md,
"Hand-offs"). On the round-robin chain of bench_crossing.py unpinned workers are
cheaper per crossing; this measures whether they also keep the parallel speed-up
of the towers' 2+2 splits (bench_runtime.py section (b)), each plan pinned and
unpinned (`Executor.repin(False)`), all in one interleaved session with the
`unplaced` row and everything on cpu:0.

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_pinning.py
    .venv/bin/python experiments/bench_pinning.py --quick      # a check that it runs

Writes experiments/results/pinning.{json,md} (pinning_quick.* with --quick).
"""

from __future__ import annotations

import argparse

import torch

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from bench_runtime import HOST_THREADS, Towers, fx_split, module_path
from graphs.devices import parse_cluster
from graphs.workload import Workload
from placer.measurements import Protocol, compare, run_session
from placer.plan import plan_from_assignment
from placer.runtime.timing import EagerTrial, PlacedTrial


class UnpinnedTrial(PlacedTrial):
    """A PlacedTrial whose workers run unpinned."""

    def _build(self):
        built = super()._build()
        self.placed.executor.repin(False)
        return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small towers, few steps: a check that it runs")
    args = parser.parse_args()
    width, depth, batch = (128, 2, 64) if args.quick else (1024, 4, 256)
    protocol = (Protocol(min_runs=2, max_runs=3, cap_s=1.0, warmup=1) if args.quick
                else Protocol(target=0.03, min_runs=10, max_runs=300, cap_s=60.0, warmup=3))
    torch.set_num_threads(1)  # the caller serves cpu:0 of two 1-thread devices
    torch.manual_seed(0)
    workload = Workload(name="towers", spec="experiments:towers", model=Towers(width, depth),
                        inputs=(torch.randn(batch, width),))
    devices = ["cpu:0", "cpu:1"]
    cluster = parse_cluster(",".join(devices))

    def by_towers(node) -> str:  # towers 0,1 on cpu:0; towers 2,3 and the head on cpu:1
        return "cpu:0" if module_path(node).startswith(("towers.0", "towers.1")) else "cpu:1"

    plans = {"all on cpu:0": lambda n: "cpu:0", "towers 0,1 / 2,3 + head": by_towers,
             "fx prefix / suffix from tower 1's last layer (issue)": fx_split(f"towers.1.{2 * depth - 2}")}
    entries = [("unplaced", EagerTrial(workload, threads=HOST_THREADS, warmup=protocol.warmup))]
    for label, assign in plans.items():
        plan = plan_from_assignment(workload.model, assign, devices, inputs=workload.inputs, method=label)
        entries.append((f"{label}, pinned", PlacedTrial(workload, plan, cluster, label=label, warmup=protocol.warmup)))
        entries.append((f"{label}, unpinned", UnpinnedTrial(workload, plan, cluster, label=label,
                                                            warmup=protocol.warmup)))
    results = dict(zip([label for label, _ in entries], run_session([t for _, t in entries], protocol)))
    base = results["all on cpu:0, pinned"]
    rows = {}
    for label, m in results.items():
        ratio = compare(m, base, "all on cpu:0, pinned")
        rows[label] = {"median_ms": m.median_ms, "ci_ms": m.ci_ms, "runs": m.runs,
                       "vs_cpu0": None if ratio is None else {"ratio": ratio.value, "ci": ratio.ci}}
    lines = [f"# Pinned against unpinned workers{' (quick: timings meaningless)' if args.quick else ''}", "",
             f"4 towers of {depth} x Linear({width}) + ReLU and a head, batch {batch}, over cpu:0,cpu:1; "
             "one interleaved session.", "",
             "| plan | median ms (95% CI) | runs | vs all on cpu:0 (pinned) |", "| --- | --- | ---: | --- |"]
    for label, r in rows.items():
        lo, hi = r["ci_ms"] or (float("nan"), float("nan"))
        v = r["vs_cpu0"]
        lines.append(f"| {label} | {r['median_ms']:.2f} ({lo:.2f}-{hi:.2f}) | {r['runs']} | "
                     + ("-" if v is None else f"{v['ratio']:.2f}x ({v['ci'][0]:.2f}-{v['ci'][1]:.2f})") + " |")
    paths = record("pinning_quick" if args.quick else "pinning", {"host": host_info(), "rows": rows},
                   "\n".join(lines + ["", *host_lines(host_info())]))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
