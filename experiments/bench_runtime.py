"""The execution engine's targets (issue 15), on whole training steps.

Every section measures its candidates together with placer's protocol
(placer.measurements.run_session: interleaved rounds in a Williams design until each
median's 95% CI is within 3%, or a time cap), always with the `unplaced` row (the
eager model on the whole host), and reports ratios with their bootstrap CI.

(a) Overhead: every zoo model (small) all on one device `cpu:0` through the runtime
    against the eager model with the same threads. Target: within 3%.
(b) Towers: four independent MLP towers and a head over cpu:0,cpu:1, split 2+2 at
    several points of the fx order (the issue's held-out plan among them), against
    all on cpu:0 of the same cluster. Target: at least 1.6x.
(c) Chains: zoo:mlp and zoo:gpt (medium): the best pipelined plan (contiguous
    stages, m = 2, 4, 8 micro-batches, GPipe) against the best unpipelined plan on the
    same devices (the same stages, expert, all on cpu:0). Target: at least 1.3x;
    the pipelined plan's gradients are checked against the eager model's.
(d) Why: each model's eager step with 1 and with 2 intra-op threads (what the whole
    host gains inside every op, which two 1-thread devices must beat).

Record only on a quiet host, under the heavy lock:

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_runtime.py
    .venv/bin/python experiments/bench_runtime.py --quick    # small sizes, few steps: a check that it runs

Writes experiments/results/runtime.{json,md} (runtime_quick.* with --quick); one section alone,
`--sections towers`, writes runtime_towers.{json,md}. The scaling section of other workloads:

    .venv/bin/python experiments/bench_runtime.py --sections scaling \
        --scaling experiments/workloads/narrow_towers.py --name narrow    # runtime_scaling_narrow.*
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from _record import host_info, host_lines  # this folder is on sys.path when run as a script
from graphs.devices import parse_cluster
from graphs.problem import PlacementProblem, build_problem
from graphs.workload import Workload, load_workload
from graphs.zoo import ZOO
from placer.baselines import expert
from placer.baselines.pipeline import pipeline
from placer.measurements import Protocol, compare, run_session
from placer.plan import Plan, make_plan, plan_from_assignment
from placer.runtime import apply
from placer.runtime.timing import EagerTrial, PlacedTrial

RESULTS = Path(__file__).resolve().parent / "results"
HOST_THREADS = torch.get_num_threads()
SECTIONS = ("overhead", "towers", "chains", "scaling")


class Towers(nn.Module):
    """Four independent MLP towers on one input and a head over their sum."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.towers = nn.ModuleList(
            nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())]) for _ in range(4))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(sum(t(x) for t in self.towers))


def module_path(node) -> str:
    """The module a captured node belongs to (fx or torch.export capture)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else ""


def fx_split(first_on_1: str):
    """A contiguous split of the captured graph's order: cpu:1 from the first node of
    module `first_on_1` on, cpu:0 before it; a parameter goes where its first reader goes."""
    cache: dict = {}

    def position(node) -> int:
        if not cache:
            nodes = list(node.graph.nodes)
            cache["at"] = {n: i for i, n in enumerate(nodes)}
            cache["cut"] = next(i for i, n in enumerate(nodes)
                                if n.op not in ("get_attr", "placeholder") and module_path(n).startswith(first_on_1))
        if node.op == "get_attr" and node.users:
            return min(cache["at"][u] for u in node.users)
        return cache["at"][node]

    def assign(node) -> str:
        at = position(node)  # fills the cache first
        return "cpu:1" if at >= cache["cut"] else "cpu:0"

    return assign


def row(m, reference=None, name: str = "") -> dict:
    r = {"median_ms": m.median_ms, "ci_ms": m.ci_ms, "runs": m.runs, "feasible": m.feasible, "reason": m.reason}
    if reference is not None:
        ratio = compare(m, reference, name)
        r[f"vs_{name}"] = None if ratio is None else {"ratio": ratio.value, "ci": ratio.ci, "verdict": ratio.verdict}
    return r


def session(entries: list[tuple[str, object]], protocol: Protocol) -> dict:
    """Measure labelled trials together; every row also compared with `unplaced`."""
    results = dict(zip([label for label, _ in entries], run_session([t for _, t in entries], protocol)))
    unplaced = results.get("unplaced")
    return {label: row(m, unplaced, "unplaced") for label, m in results.items()}, results


def overhead(specs: list[str], protocol: Protocol) -> list[dict]:
    rows = []
    cluster = parse_cluster("cpu:0")
    for spec in specs:
        workload = load_workload(spec)
        plan = plan_from_assignment(workload.model, lambda n: "cpu:0", ["cpu:0"], inputs=workload.inputs,
                                    leaf_modules=workload.leaf_modules)
        table, raw = session([("unplaced", EagerTrial(workload, threads=cluster.devices[0].threads,
                                                      warmup=protocol.warmup)),
                              ("runtime", PlacedTrial(workload, plan, cluster, label="runtime",
                                                      warmup=protocol.warmup))], protocol)
        ratio = compare(raw["unplaced"], raw["runtime"], "runtime")  # runtime over eager: > 1 is overhead
        rows.append({"model": spec, "threads": cluster.devices[0].threads, **table,
                     "overhead": None if ratio is None else {"value": ratio.value - 1,
                                                             "ci": (ratio.ci[0] - 1, ratio.ci[1] - 1)},
                     "target": 0.03})
        print(f"overhead {spec}: {rows[-1]['overhead']}")
    return rows


def towers(width: int, depth: int, batch: int, protocol: Protocol) -> dict:
    torch.manual_seed(0)
    workload = Workload(name="towers", spec="experiments:towers", model=Towers(width, depth),
                        inputs=(torch.randn(batch, width),))
    devices = ["cpu:0", "cpu:1"]
    cluster = parse_cluster(",".join(devices))

    def split(first: tuple[str, ...], head_on: str):
        def assign(node) -> str:
            path = module_path(node)
            if path.startswith("head"):
                return head_on
            return "cpu:0" if path.startswith(first) else "cpu:1"
        return assign

    plans = {
        "all on cpu:0": lambda n: "cpu:0",
        "towers 0,1 / 2,3 + head": split(("towers.0", "towers.1"), "cpu:1"),
        "towers 0,1 + head / 2,3": split(("towers.0", "towers.1"), "cpu:0"),
        "towers 0,2 / 1,3 + head (interleaved in fx order)": split(("towers.0", "towers.2"), "cpu:1"),
        # Contiguous in fx order: a prefix on cpu:0, the rest on cpu:1 (the held-out plan
        # puts the tail of tower 1 with towers 2-3).
        "fx prefix / suffix from tower 1's last layer (issue)": fx_split(f"towers.1.{2 * depth - 2}"),
        "fx prefix / suffix from tower 2": fx_split("towers.2"),
        "fx prefix / suffix from tower 1's middle": fx_split(f"towers.1.{2 * (depth // 2)}"),
    }
    entries = [("unplaced", EagerTrial(workload, threads=HOST_THREADS, warmup=protocol.warmup))]
    for label, assign in plans.items():
        plan = plan_from_assignment(workload.model, assign, devices, inputs=workload.inputs, method=label)
        entries.append((label, PlacedTrial(workload, plan, cluster, label=label, warmup=protocol.warmup)))
    table, raw = session(entries, protocol)
    for label in plans:
        ratio = compare(raw[label], raw["all on cpu:0"], "all on cpu:0")
        table[label]["vs_cpu0"] = None if ratio is None else {"ratio": ratio.value, "ci": ratio.ci}
    print("towers:", {k: v["median_ms"] for k, v in table.items()})
    return {"model": f"4 towers of {depth} x Linear({width}) + ReLU and a head, batch {batch}", "rows": table,
            "target": 1.6}


def chain_plans(name: str, size: str) -> tuple[Workload, PlacementProblem, dict[str, Plan], dict[str, Plan]]:
    """The chain section's candidates for zoo model `name` at `size` on cpu:0,cpu:1:
    the workload, its problem, and its unpipelined and pipelined plans by label (the
    pipeline heuristic's contiguous stages at m = 1, 2, 4, 8 where the batch allows;
    expert; all on cpu:0). experiments/bench_pinning.py measures the same plans."""
    workload = load_workload(f"zoo:{name}:{size}")
    problem = build_problem(workload, "cpu:0,cpu:1")
    stages = pipeline(problem).placement
    unpipelined = {"stages, m=1": make_plan(problem, stages, "stages"),
                   "expert": make_plan(problem, expert(problem), "expert"),
                   "all on cpu:0": make_plan(problem, (0,) * problem.n_groups, "single")}
    pipelined = {f"stages, m={m}": make_plan(problem, stages, "pipeline", microbatches=m, schedule="gpipe")
                 for m in (2, 4, 8) if m <= (problem.batch_size or m)}
    return workload, problem, unpipelined, pipelined


def chain(name: str, size: str, protocol: Protocol) -> dict:
    workload, problem, unpipelined, pipelined = chain_plans(name, size)
    entries = [("unplaced", EagerTrial(workload, threads=HOST_THREADS, warmup=protocol.warmup))]
    entries += [(label, PlacedTrial(workload, plan, problem.cluster, label=label, warmup=protocol.warmup))
                for label, plan in {**unpipelined, **pipelined}.items()]
    table, raw = session(entries, protocol)
    best = {kind: min((label for label in group if raw[label].feasible), key=lambda label: raw[label].median_ms,
                      default=None) for kind, group in (("unpipelined", unpipelined), ("pipelined", pipelined))}
    ratio = (compare(raw[best["pipelined"]], raw[best["unpipelined"]], best["unpipelined"])
             if None not in best.values() else None)
    error = gradient_error(workload, pipelined[best["pipelined"]]) if best["pipelined"] else None
    print(f"chain {name}-{size}: best pipelined {best['pipelined']}, unpipelined {best['unpipelined']}: "
          f"{None if ratio is None else round(ratio.value, 3)}")
    return {"model": f"{name}-{size}", "rows": table, "best": best, "target": 1.3, "gradient_rel_error": error,
            "pipelined_vs_unpipelined": None if ratio is None else {"ratio": ratio.value, "ci": ratio.ci,
                                                                    "verdict": ratio.verdict}}


def gradient_error(workload: Workload, plan) -> float:
    """Max over parameters of max |placed grad - eager grad| / max |eager grad|, one step."""
    torch.manual_seed(0)
    ref = workload.fresh_model()
    placed = apply(copy.deepcopy(ref), plan)
    try:
        for model in (ref, placed):
            workload.loss_fn(model(*workload.inputs), *workload.inputs).backward()
        return max(float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30))
                   for p, q in zip(placed.parameters(), ref.parameters()) if q.grad is not None)
    finally:
        placed.close()


def scaling(specs: list[str], protocol: Protocol) -> list[dict]:
    rows = []
    for spec in specs:
        workload = load_workload(spec)
        _, raw = session([("1 thread", EagerTrial(workload, threads=1, label="1 thread", warmup=protocol.warmup)),
                          ("2 threads", EagerTrial(workload, threads=2, label="2 threads", warmup=protocol.warmup))],
                         protocol)
        ratio = compare(raw["2 threads"], raw["1 thread"], "1 thread")
        rows.append({"model": spec, "one_thread_ms": raw["1 thread"].median_ms,
                     "two_threads_ms": raw["2 threads"].median_ms,
                     "speedup": None if ratio is None else {"ratio": ratio.value, "ci": ratio.ci}})
    return rows


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def write_markdown(path: Path, results: dict) -> None:
    lines = [f"# Engine benchmarks{' (quick: timings meaningless)' if results['quick'] else ''}", "",
             *host_lines(results["host"])]
    if "overhead" in results:
        lines += ["", "## (a) Overhead: everything on cpu:0 through the runtime vs eager (target within 3%)", "",
                  "| model | threads | unplaced ms | runtime ms | overhead (95% CI) |",
                  "| --- | ---: | ---: | ---: | --- |"]
    for r in results.get("overhead", []):
        o = r["overhead"]
        lines.append(f"| {r['model']} | {r['threads']} | {fmt(r['unplaced']['median_ms'])} | "
                     f"{fmt(r['runtime']['median_ms'])} | "
                     + ("-" if o is None else f"{o['value']:+.1%} ({o['ci'][0]:+.1%} to {o['ci'][1]:+.1%})") + " |")
    t = results.get("towers", {"rows": {}})
    if "towers" in results:
        lines += ["", "## (b) Towers over cpu:0,cpu:1 (target at least 1.6x over all on cpu:0)", "", t["model"], "",
                  "| placement | median ms (95% CI) | vs all on cpu:0 | vs unplaced |", "| --- | --- | --- | --- |"]
    for label, r in t["rows"].items():
        lines.append(f"| {label} | {_ms(r)} | {_ratio(r.get('vs_cpu0'))} | {_ratio(r.get('vs_unplaced'))} |")
    for c in results.get("chains", []):
        lines += ["", f"## (c) {c['model']}: pipelined vs unpipelined on cpu:0,cpu:1 (target at least 1.3x)", "",
                  "| plan | median ms (95% CI) | runs | vs unplaced |", "| --- | --- | ---: | --- |"]
        for label, r in c["rows"].items():
            lines.append(f"| {label} | {_ms(r)} | {r['runs']} | {_ratio(r.get('vs_unplaced'))} |")
        lines += ["", f"Best pipelined ({c['best']['pipelined']}) over best unpipelined ({c['best']['unpipelined']}): "
                  f"{_ratio(c['pipelined_vs_unpipelined'])}; its gradients differ from eager's by at most "
                  f"{fmt(c['gradient_rel_error'], '.1e')} (relative)."]
    if "scaling" in results:
        lines += ["", "## (d) Intra-op scaling of the eager step (what the whole host gains inside every op)", "",
                  "| model | 1 thread ms | 2 threads ms | speed-up |", "| --- | ---: | ---: | --- |"]
    for r in results.get("scaling", []):
        lines.append(f"| {r['model']} | {fmt(r['one_thread_ms'])} | {fmt(r['two_threads_ms'])} | "
                     f"{_ratio(r['speedup'])} |")
    path.write_text("\n".join(lines) + "\n")


def _ms(r: dict) -> str:
    if not r["feasible"]:
        return f"infeasible: {r['reason']}"
    lo, hi = r["ci_ms"] or (None, None)
    return f"{r['median_ms']:.2f} ({fmt(lo)}-{fmt(hi)})"


def _ratio(r: dict | None) -> str:
    return "-" if not r else f"{r['ratio']:.2f}x ({r['ci'][0]:.2f}-{r['ci'][1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps: a check that it runs")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds of timed rounds per session")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated, of " + ", ".join(SECTIONS) + " (default: all); a subset writes "
                             "runtime_<sections>.{json,md}")
    parser.add_argument("--scaling", default=None, metavar="SPEC,...",
                        help="workloads of the scaling section (default: zoo mlp, gpt, transformer, nmt)")
    parser.add_argument("--overhead", default=None, metavar="SPEC,...",
                        help="workloads of the overhead section (default: every zoo model, small)")
    parser.add_argument("--name", default="", help="suffix of the written files' stem, e.g. narrow")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    protocol = (Protocol(min_runs=2, max_runs=3, cap_s=1.0, warmup=1) if args.quick
                else Protocol(target=0.03, min_runs=10, max_runs=300, cap_s=args.cap, warmup=3))
    torch.set_num_threads(1)  # the caller serves cpu:0 of two 1-thread devices (the unplaced rows set their own)
    size = "small" if args.quick else "medium"
    results = {"quick": args.quick, "host": host_info(), "protocol": protocol.to_json()}  # host: _record.py
    if "towers" in sections:
        results["towers"] = towers(*((128, 2, 64) if args.quick else (1024, 4, 256)), protocol)
    if "chains" in sections:
        results["chains"] = [chain(name, size, protocol) for name in ("mlp", "gpt")]
    if "scaling" in sections:
        specs = (args.scaling.split(",") if args.scaling
                 else [f"zoo:{name}:{size}" for name in ("mlp", "gpt", "transformer", "nmt")])
        results["scaling"] = scaling(specs, protocol)
    if "overhead" in sections:
        torch.set_num_threads(HOST_THREADS)  # one device `cpu:0` has all the host's threads
        results["overhead"] = overhead(args.overhead.split(",") if args.overhead
                                       else [f"zoo:{name}:small" for name in sorted(ZOO)], protocol)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "runtime" + ("_quick" if args.quick else "") + ("" if set(sections) == set(SECTIONS) else
                                                          "_" + "_".join(s for s in SECTIONS if s in sections)) + (
        f"_{args.name}" if args.name else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_markdown(RESULTS / f"{stem}.md", results)
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
