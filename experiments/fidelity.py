"""How well the simulator predicts measured step times, before and after calibration.

For each zoo model (small size) on `cpu:0,cpu:1`: at least 30 placements of four
kinds (every baseline's; random ones; "mixed": a baseline with a random share of its
groups moved; "split": a random contiguous cut of the group order), all repaired to
keep colocation. Each is measured on the real runtime and simulated. The
calibration is fitted on a random third of the placements and judged on the other
two thirds, against the uncalibrated simulator on the same two thirds: Spearman
rank correlation (does the simulator order placements as the runtime does?) and
the median absolute percentage error. Targets (issue 5): Spearman >= 0.9 and median
error <= 10% after calibration.

    .venv/bin/python experiments/fidelity.py             # every zoo model, 40 placements each
    .venv/bin/python experiments/fidelity.py --quick     # nmt only, 6 placements, short measurements
    .venv/bin/python experiments/fidelity.py --save      # also keep each model's calibration (fit on all)

Writes experiments/results/fidelity.{json,md} (fidelity_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from envs.calibrate import fit_calibration, save_calibration
from envs.sim import Calibration, Simulator
from graphs.workload import load_workload
from graphs.zoo import ZOO
from placer.baselines import run_baselines
from placer.baselines.repair import repair
from graphs.devices import host_cores
from graphs.errors import InfeasibleError
from placer.plan import make_plan
from graphs.problem import Placement, PlacementProblem, build_problem
from placer.runtime.measure import measure

RESULTS = Path(__file__).resolve().parent / "results"


def placements(problem: PlacementProblem, count: int, rng: np.random.Generator) -> list[tuple[str, Placement]]:
    """(kind, placement) pairs, distinct: baselines (at most a third), then random,
    mixed and split in turn."""
    chosen: dict[Placement, str] = {}
    baselines = [p for p in run_baselines(problem).values() if not isinstance(p, InfeasibleError)]
    for p in baselines[:max(1, count // 3)]:
        chosen.setdefault(tuple(p), "baseline")
    n, k = problem.n_groups, problem.n_devices
    makers = {
        "random": lambda: rng.integers(0, k, n),
        "mixed": lambda: np.where(rng.random(n) < rng.uniform(0.1, 0.5), rng.integers(0, k, n),
                                  baselines[rng.integers(len(baselines))]),
        "split": lambda: np.searchsorted(np.sort(rng.integers(0, n + 1, k - 1)), np.arange(n), side="right"),
    }
    attempts = 0
    while len(chosen) < count and attempts < 50 * count:
        kind = list(makers)[attempts % len(makers)]
        attempts += 1
        try:
            chosen.setdefault(repair(problem, makers[kind]()), kind)
        except InfeasibleError:
            continue
    return [(kind, p) for p, kind in list(chosen.items())[:count]]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def median_error(simulated: np.ndarray, measured: np.ndarray) -> float:
    return float(np.median(np.abs(simulated / measured - 1.0)))


def evaluate_model(name: str, args: argparse.Namespace) -> dict:
    spec = f"zoo:{name}:{args.size}"
    problem = build_problem(spec, devices=args.devices, max_groups=args.max_groups)
    workload = load_workload(spec)
    rng = np.random.default_rng(args.seed)
    rows = []
    for kind, placement in placements(problem, args.placements, rng):
        m = measure(workload, make_plan(problem, placement, kind), problem.cluster, iters=args.iters,
                    warmup=args.warmup)
        rows.append({"kind": kind, "placement": list(placement), "feasible": bool(m.feasible),
                     "measured_ms": m.median_ms if m.feasible else None, "iqr_ms": m.iqr_ms if m.feasible else None,
                     "reason": m.reason or ""})
        outcome = f"{m.median_ms:8.2f} ms" if m.feasible else f"infeasible: {m.reason}"
        print(f"  {spec} {len(rows):3d} {kind:8s} {outcome}")
    measured_rows = [r for r in rows if r["feasible"]]
    measured = np.array([r["measured_ms"] for r in measured_rows])
    chosen = [tuple(r["placement"]) for r in measured_rows]

    order = rng.permutation(len(measured_rows))
    n_fit = max(3, len(order) // 3)
    fit_idx, test_idx = order[:n_fit], order[n_fit:]
    before = Simulator(problem)
    calibration = fit_calibration(problem, [chosen[i] for i in fit_idx], measured[fit_idx])
    after = Simulator(problem, calibration)
    for r, p in zip(measured_rows, chosen):
        r["simulated_ms"] = before.simulate(p).step_ms
        r["calibrated_ms"] = after.simulate(p).step_ms
    sim_before = np.array([r["simulated_ms"] for r in measured_rows])
    sim_after = np.array([r["calibrated_ms"] for r in measured_rows])
    for i in fit_idx:
        measured_rows[i]["fit"] = True

    if args.save and len(measured_rows) >= 3:
        path = save_calibration(problem, fit_calibration(problem, chosen, measured))
        print(f"  saved the calibration fitted on all {len(chosen)} measurements to {path}")
    return {
        "workload": spec, "groups": problem.n_groups, "placements": len(rows), "measured": len(measured_rows),
        "fit_on": int(len(fit_idx)), "evaluated_on": int(len(test_idx)),
        "before": {"spearman": spearman(sim_before[test_idx], measured[test_idx]),
                   "median_abs_error": median_error(sim_before[test_idx], measured[test_idx])},
        "after": {"spearman": spearman(sim_after[test_idx], measured[test_idx]),
                  "median_abs_error": median_error(sim_after[test_idx], measured[test_idx])},
        "calibration": {"initial": Calibration.default(problem.cluster).to_json(), "fitted": calibration.to_json()},
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [f"# Simulator fidelity ({results['host']['date']})", "",
             f"Host: {results['host']['platform']}, {results['host']['cores']} cores, torch {results['host']['torch']}. "
             f"Devices `{results['devices']}`; each placement measured as the median of {results['iters']} steps "
             f"after {results['warmup']} warm-up steps. Calibration fitted on a random third of each model's "
             "placements; both columns judged on the other two thirds. Targets: Spearman >= 0.9, median error <= 10%.",
             "", "| model | groups | placements (measured) | fit / judged | Spearman before | after | "
             "median error before | after |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        b, a = m["before"], m["after"]
        lines.append(f"| {m['workload']} | {m['groups']} | {m['placements']} ({m['measured']}) | "
                     f"{m['fit_on']} / {m['evaluated_on']} | {b['spearman']:.2f} | {a['spearman']:.2f} | "
                     f"{100 * b['median_abs_error']:.1f}% | {100 * a['median_abs_error']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--size", default="small", choices=["small", "medium"], help="zoo size")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--placements", type=int, default=40)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="save each model's calibration (fit on all placements)")
    parser.add_argument("--quick", action="store_true", help="nmt, 6 placements, 3 steps: check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.models, args.placements, args.iters, args.warmup = ["nmt"], 6, 3, 1

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    models = []
    for name in args.models:
        print(f"{name}:")
        models.append(evaluate_model(name, args))
        m = models[-1]
        print(f"  Spearman {m['before']['spearman']:.2f} -> {m['after']['spearman']:.2f}, median error "
              f"{100 * m['before']['median_abs_error']:.1f}% -> {100 * m['after']['median_abs_error']:.1f}%")
    results = {"host": {"platform": platform.platform(), "cores": host_cores(), "torch": torch.__version__,
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
               "devices": args.devices, "size": args.size, "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
               "seconds": time.perf_counter() - started, "models": models}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "fidelity_quick" if args.quick else f"fidelity_{args.size}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
