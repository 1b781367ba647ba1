"""Communication overhead of the distributed backends: the same two-device placement,
with one value crossing between the devices per step, measured by the in-process
runtime (two virtual CPU devices, threads of one process), by two local gloo ranks
(processes, point-to-point over loopback), and, since such a plan is a two-stage
pipeline, by torch.distributed.pipelining with M micro-batches (--microbatches,
GPipe). All get half the host's cores per device. The target (issue 8): distributed
within 10% of in-process.

    .venv/bin/python experiments/bench_distributed.py --quick   # a check that it runs
    .venv/bin/python experiments/bench_distributed.py           # the recorded numbers

Writes experiments/results/distributed[_quick].json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.fx as fx

from graphs.capture import node_params
from graphs.trace import trace_model
from graphs.workload import load_workload
from placer.distributed import measure_distributed, measure_pipelined
from placer.plan import Plan, plan_from_assignment
from placer.runtime import measure

RESULTS = Path(__file__).resolve().parent / "results"
DEVICES = ["cpu:0", "cpu:1"]


def crossings(gm: fx.GraphModule, assignment: dict[str, str]) -> int:
    """How many values (not placeholders) a device hands to the other per forward pass."""
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output")
               and any(u.op != "output" and assignment[u.name] != assignment[n.name] for u in n.users))


def one_edge_plan(spec: str) -> tuple[Plan, int]:
    """Cut the fx graph in two at the most balanced point where one value crosses
    (nodes sharing a parameter stay with its first user). Returns the plan and its crossings."""
    w = load_workload(spec)
    model = w.fresh_model()
    gm = trace_model(model, leaf_modules=w.leaf_modules).gm
    nodes = list(gm.graph.nodes)
    best = None
    for cut in range(1, len(nodes) - 1):
        assignment, first_user = {}, {}
        for i, node in enumerate(nodes):
            device = DEVICES[i >= cut]
            for name in node_params(gm, node):
                path, _, attr = name.rpartition(".")
                device = first_user.setdefault(id(getattr(gm.get_submodule(path), attr)), device)
            assignment[node.name] = device
        count = crossings(gm, assignment)
        key = (count != 1, abs(cut - len(nodes) / 2))
        if best is None or key < best[0]:
            best = (key, assignment, count)
    _, assignment, count = best
    plan = plan_from_assignment(model, lambda n: assignment[n.name], DEVICES, leaf_modules=w.leaf_modules,
                                method="one-edge", workload=spec)
    return plan, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small model, few steps: a check that it runs")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches of the pipelining row (GPipe)")
    args = parser.parse_args()
    # Medium sizes: a paper-size step takes tens of seconds on a 2-core host.
    specs = ["zoo:transformer"] if args.quick else ["zoo:transformer", "zoo:rnnlm:medium", "zoo:transformer:medium"]
    iters, warmup = (3, 1) if args.quick else (args.iters, 3)

    rows = []
    for spec in specs:
        plan, count = one_edge_plan(spec)
        local = measure(load_workload(spec), plan, iters=iters, warmup=warmup)
        distributed = measure_distributed(spec, plan, iters=iters, warmup=warmup)
        pipelined = measure_pipelined(spec, plan, iters=iters, warmup=warmup, microbatches=args.microbatches)
        overhead = distributed.median_ms / local.median_ms - 1 if local.feasible and distributed.feasible else None
        rows.append({"workload": spec, "crossings": count, "in_process_ms": local.median_ms,
                     "in_process_iqr_ms": local.iqr_ms, "distributed_ms": distributed.median_ms,
                     "distributed_iqr_ms": distributed.iqr_ms, "overhead": overhead,
                     "within_10_percent": overhead is not None and overhead <= 0.10,
                     "pipelined_microbatches": args.microbatches, "pipelined_ms": pipelined.median_ms,
                     "pipelined_iqr_ms": pipelined.iqr_ms})
        print(f"{spec}: in-process {local.median_ms:.2f} ms, distributed {distributed.median_ms:.2f} ms "
              f"({'n/a' if overhead is None else f'{overhead:+.1%}'}), pipelined (m={args.microbatches}) "
              f"{pipelined.median_ms:.2f} ms, {count} crossing value(s)")

    stem = "distributed_quick" if args.quick else "distributed"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"iters": iters, "warmup": warmup, "rows": rows}, indent=1) + "\n")
    lines = ["| workload | crossing values | in-process ms (IQR) | 2 gloo ranks ms (IQR) | overhead "
             f"| pipelining, m={args.microbatches} GPipe, ms (IQR) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        overhead = "n/a" if r["overhead"] is None else f"{r['overhead']:+.1%}"
        lines.append(f"| {r['workload']} | {r['crossings']} | {_ms(r, 'in_process')} | {_ms(r, 'distributed')} "
                     f"| {overhead} | {_ms(r, 'pipelined')} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _ms(row: dict, kind: str) -> str:
    if row[f"{kind}_ms"] is None:
        return "infeasible"
    return f"{row[f'{kind}_ms']:.2f} ({row[f'{kind}_iqr_ms']:.2f})"


if __name__ == "__main__":
    main()
