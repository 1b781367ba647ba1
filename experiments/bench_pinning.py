"""Pinned against unpinned workers (a diagnosis for the pinning default).

Virtual CPU devices' workers are pinned to their own cores (docs/DESIGN.md,
"Hand-offs"). On the round-robin chain of bench_crossing.py unpinned workers are
cheaper per crossing; this measures whether they also keep the speed-ups where two
workers run at once, each plan pinned and unpinned (`Executor.repin`), interleaved
in one session with the `unplaced` row and everything on cpu:0:

(towers) the towers' 2+2 splits (bench_runtime.py section (b)): the two workers run
    independent towers.
(chains) zoo:mlp and zoo:gpt (medium; small with --quick): the pipelined plans of
    bench_runtime.py section (c) (its `chain_plans`: contiguous stages, GPipe) at the
    micro-batch counts that were the best there (mlp m=2 and m=4, gpt m=4), one
    session per model: both workers run all step long.

Each row is compared with all on cpu:0 pinned, and each unpinned row with the same
plan pinned (bootstrap CIs, placer.measurements.compare).

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_pinning.py --sections chains
    .venv/bin/python experiments/bench_pinning.py --quick      # a check that it runs

Writes experiments/results/pinning.{json,md} (towers) and pinning_chains.{json,md}
(the `_quick` names with --quick).
"""

from __future__ import annotations

import argparse

import torch

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from bench_runtime import HOST_THREADS, Towers, chain_plans, fx_split, module_path
from graphs.devices import Cluster, parse_cluster
from graphs.workload import Workload
from placer.measurements import Protocol, compare, run_session
from placer.plan import Plan, plan_from_assignment
from placer.runtime.timing import EagerTrial, PlacedTrial

CHAIN_PLANS = {"mlp": ("stages, m=2", "stages, m=4"), "gpt": ("stages, m=4",)}
"""The pipelined plans measured per chain model: the best of bench_runtime's chain section."""
BASE = "all on cpu:0, pinned"


class PinTrial(PlacedTrial):
    """A PlacedTrial whose workers run pinned to their cores (`pin`) or unpinned,
    whatever the executor's default."""

    def __init__(self, workload: Workload, plan: Plan, cluster: Cluster, label: str, pin: bool, warmup: int):
        super().__init__(workload, plan, cluster, label=label, warmup=warmup)
        self.pin = pin

    def _build(self):
        built = super()._build()
        self.placed.executor.repin(self.pin)
        return built


def measure(workload: Workload, plans: dict[str, Plan], cluster: Cluster, protocol: Protocol) -> dict:
    """One interleaved session of `unplaced` and every plan pinned and unpinned.

    Returns label -> row: median_ms, ci_ms, runs, and the speed-ups (ratio, 95% CI)
    `vs_cpu0` over all on cpu:0 pinned and, on unpinned rows, `vs_pinned` over the
    same plan pinned (> 1: unpinned is faster). `plans` must hold "all on cpu:0"."""
    entries = [("unplaced", EagerTrial(workload, threads=HOST_THREADS, warmup=protocol.warmup))]
    for label, plan in plans.items():
        for pin in (True, False):
            name = f"{label}, {'pinned' if pin else 'unpinned'}"
            entries.append((name, PinTrial(workload, plan, cluster, name, pin, protocol.warmup)))
    results = dict(zip([label for label, _ in entries], run_session([t for _, t in entries], protocol)))
    rows = {}
    for label, m in results.items():
        rows[label] = {"median_ms": m.median_ms, "ci_ms": m.ci_ms, "runs": m.runs, "feasible": m.feasible,
                       "reason": m.reason, "vs_cpu0": _ratio(compare(m, results[BASE], BASE))}
        if label.endswith(", unpinned"):
            pinned = label.removesuffix(", unpinned") + ", pinned"
            rows[label]["vs_pinned"] = _ratio(compare(m, results[pinned], pinned))
    return rows


def towers(quick: bool, protocol: Protocol) -> tuple[dict, list[str]]:
    """The towers' 2+2 splits, pinned and unpinned: (results, markdown lines)."""
    width, depth, batch = (128, 2, 64) if quick else (1024, 4, 256)
    torch.manual_seed(0)
    workload = Workload(name="towers", spec="experiments:towers", model=Towers(width, depth),
                        inputs=(torch.randn(batch, width),))
    devices = ["cpu:0", "cpu:1"]

    def by_towers(node) -> str:  # towers 0,1 on cpu:0; towers 2,3 and the head on cpu:1
        return "cpu:0" if module_path(node).startswith(("towers.0", "towers.1")) else "cpu:1"

    assigns = {"all on cpu:0": lambda n: "cpu:0", "towers 0,1 / 2,3 + head": by_towers,
               "fx prefix / suffix from tower 1's last layer (issue)": fx_split(f"towers.1.{2 * depth - 2}")}
    plans = {label: plan_from_assignment(workload.model, assign, devices, inputs=workload.inputs, method=label)
             for label, assign in assigns.items()}
    rows = measure(workload, plans, parse_cluster(",".join(devices)), protocol)
    model = f"4 towers of {depth} x Linear({width}) + ReLU and a head, batch {batch}"
    return {"model": model, "rows": rows}, [f"{model}, over cpu:0,cpu:1; one interleaved session.", "",
                                            *table(rows)]


def chains(size: str, protocol: Protocol) -> tuple[list[dict], list[str]]:
    """The chain models' best pipelined plans, pinned and unpinned, one session per
    model: (results, markdown lines)."""
    results, lines = [], []
    for name, labels in CHAIN_PLANS.items():
        workload, problem, unpipelined, pipelined = chain_plans(name, size)
        plans = {"all on cpu:0": unpipelined["all on cpu:0"],
                 **{label: pipelined[label] for label in labels if label in pipelined}}
        rows = measure(workload, plans, problem.cluster, protocol)
        results.append({"model": f"{name}-{size}", "rows": rows})
        lines += [f"## {name}-{size} over cpu:0,cpu:1 (GPipe, the pipeline heuristic's stages)", "", *table(rows), ""]
        print(f"chain {name}-{size}:", {k: v["median_ms"] for k, v in rows.items()})
    return results, lines


def table(rows: dict) -> list[str]:
    """Markdown table of `measure`'s rows."""
    lines = ["| plan | median ms (95% CI) | runs | vs all on cpu:0 (pinned) | unpinned vs pinned |",
             "| --- | --- | ---: | --- | --- |"]
    for label, r in rows.items():
        if not r["feasible"]:
            lines.append(f"| {label} | infeasible: {r['reason']} | - | - | - |")
            continue
        lo, hi = r["ci_ms"] or (float("nan"), float("nan"))
        lines.append(f"| {label} | {r['median_ms']:.2f} ({lo:.2f}-{hi:.2f}) | {r['runs']} | "
                     f"{_fmt(r['vs_cpu0'])} | {_fmt(r.get('vs_pinned'))} |")
    return lines


def _ratio(ratio) -> dict | None:
    return None if ratio is None else {"ratio": ratio.value, "ci": ratio.ci, "verdict": ratio.verdict}


def _fmt(r: dict | None) -> str:
    return "-" if r is None else f"{r['ratio']:.2f}x ({r['ci'][0]:.2f}-{r['ci'][1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, few steps: a check that it runs")
    parser.add_argument("--sections", nargs="+", choices=("towers", "chains"), default=["towers", "chains"],
                        help="which sections to measure (default both)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds of timed rounds per session")
    args = parser.parse_args()
    protocol = (Protocol(min_runs=2, max_runs=3, cap_s=1.0, warmup=1) if args.quick
                else Protocol(target=0.03, min_runs=10, max_runs=300, cap_s=args.cap, warmup=3))
    torch.set_num_threads(1)  # the caller serves cpu:0 of two 1-thread devices
    host = host_info()
    title = f"Pinned against unpinned workers{' (quick: timings meaningless)' if args.quick else ''}"
    suffix = "_quick" if args.quick else ""
    if "towers" in args.sections:
        data, lines = towers(args.quick, protocol)
        paths = record(f"pinning{suffix}", {"host": host, "protocol": protocol.to_json(), **data},
                       "\n".join([f"# {title}", "", *lines, "", *host_lines(host)]))
        print(f"wrote {paths[0]} and {paths[1]}")
    if "chains" in args.sections:
        data, lines = chains("small" if args.quick else "medium", protocol)
        paths = record(f"pinning_chains{suffix}", {"host": host, "protocol": protocol.to_json(), "chains": data},
                       "\n".join([f"# {title}: pipelined chains", "", *lines, *host_lines(host)]))
        print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
