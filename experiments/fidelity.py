"""How well the simulator predicts measured step times, before and after calibration,
and which cost is wrong where it does not.

For each zoo model on `--devices`: at least `--placements` candidates of five kinds
(every baseline's; random ones; "mixed": a baseline with a random share of its
groups moved; "split": a random contiguous cut of the group order; "pipelined": a
split or a baseline run with m > 1 micro-batches, where the profile allows it), all
repaired to keep colocation and memory. Each is measured through the measurement
protocol (placer.measurements: interleaved sessions of `--session` candidates, CI of
the median) on the dataflow runtime, and simulated. The calibration is fitted on a
random third of the candidates and judged on the other two thirds, against the
uncalibrated simulator on the same two thirds: Spearman rank correlation and median
absolute percentage error. Targets (issue 16): Spearman >= 0.9 and median error <= 10%.

Where the calibrated simulator still misses, `diagnose` says which cost is wrong: the
correlation of the log error (measured / simulated) with what each candidate costs in
crossings (values handed between devices), chunks (dispatches), devices busy at once
(virtual CPU devices share one memory bus) and micro-batches. A cost that the
simulator models wrongly shows as a strong correlation with its count.

    .venv/bin/python experiments/fidelity.py --size medium            # every zoo model, 36 candidates each
    .venv/bin/python experiments/fidelity.py --quick                  # nmt small, 6 candidates: a check it runs
    flock /tmp/placer-heavy.lock .venv/bin/python experiments/fidelity.py --size medium --save

Writes experiments/results/fidelity_{size}.{json,md} (fidelity_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from envs.calibrate import fit_calibration, save_calibration
from envs.sim import Calibration, Simulator
from graphs.errors import InfeasibleError
from graphs.problem import Candidate, PlacementProblem, build_problem
from graphs.workload import load_workload
from graphs.zoo import ZOO
from placer.baselines import run_baselines
from placer.baselines.repair import repair
from placer.measurements import MeasurementBook, Measurer, Protocol
from placer.search import microbatch_options

KINDS = ("baseline", "random", "mixed", "split", "pipelined")


def candidates(problem: PlacementProblem, count: int, rng: np.random.Generator) -> list[tuple[str, Candidate]]:
    """(kind, candidate) pairs, distinct: baselines (at most a fifth), then the other kinds in turn."""
    chosen: dict[Candidate, str] = {}
    baselines = [tuple(p) for p in run_baselines(problem).values() if not isinstance(p, InfeasibleError)]
    for p in baselines[:max(1, count // 5)]:
        chosen.setdefault(Candidate(p), "baseline")
    n, k = problem.n_groups, problem.n_devices
    piped = [m for m in microbatch_options(problem) if m > 1]

    def split() -> np.ndarray:
        return np.searchsorted(np.sort(rng.integers(0, n + 1, k - 1)), np.arange(n), side="right")

    makers = {
        "random": lambda: (rng.integers(0, k, n), 1),
        "mixed": lambda: (np.where(rng.random(n) < rng.uniform(0.1, 0.5), rng.integers(0, k, n),
                                   baselines[rng.integers(len(baselines))]), 1),
        "split": lambda: (split(), 1),
        "pipelined": lambda: (split() if rng.random() < 0.7 else np.asarray(baselines[rng.integers(len(baselines))]),
                              int(rng.choice(piped))),
    }
    kinds = [kind for kind in makers if kind != "pipelined" or piped]
    attempts = 0
    while len(chosen) < count and attempts < 50 * count:
        kind = kinds[attempts % len(kinds)]
        attempts += 1
        placement, m = makers[kind]()
        try:
            candidate = Candidate(repair(problem, placement), m)
        except InfeasibleError:
            continue
        if not problem.violations(candidate.placement, m):  # m micro-batches in flight need more memory
            chosen.setdefault(candidate, kind)
    return [(kind, c) for c, kind in list(chosen.items())[:count]]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def median_error(simulated: np.ndarray, measured: np.ndarray) -> float:
    return float(np.median(np.abs(simulated / measured - 1.0)))


def cost_counts(problem: PlacementProblem, candidate: Candidate) -> dict[str, float]:
    """What a candidate pays in each cost the simulator models with few parameters."""
    p = np.asarray(candidate.placement)
    edges = problem.costs.edges
    cut = p[edges[:, 0]] != p[edges[:, 1]] if len(edges) else np.zeros(0, dtype=bool)
    runs = 1 + int(np.count_nonzero(p[1:] != p[:-1]))
    return {"crossings": float(cut.sum()), "crossing_mb": float(problem.costs.edge_bytes[cut].sum() / 1e6),
            "chunks": float(runs * candidate.microbatches), "devices_used": float(len(set(p.tolist()))),
            "microbatches": float(candidate.microbatches)}


def diagnose(problem: PlacementProblem, rows: list[dict]) -> dict[str, float]:
    """Spearman correlation of each cost count with the calibrated simulator's log error."""
    error = np.log([r["measured_ms"] / r["calibrated_ms"] for r in rows])
    counts = [cost_counts(problem, Candidate(tuple(r["placement"]), r["microbatches"])) for r in rows]
    out = {}
    for name in counts[0] if counts else ():
        values = np.array([c[name] for c in counts])
        out[name] = spearman(values, error) if values.std() > 0 else float("nan")
    return out


def evaluate_model(name: str, args: argparse.Namespace) -> dict:
    spec = f"zoo:{name}:{args.size}"
    problem = build_problem(spec, devices=args.devices, max_groups=args.max_groups)
    workload = load_workload(spec)
    rng = np.random.default_rng(args.seed)
    protocol = Protocol(target=args.target, cap_s=args.cap_s, warmup=args.warmup)
    measurer = Measurer(workload, problem, MeasurementBook({"fidelity": spec, "devices": args.devices}), protocol)
    chosen = candidates(problem, args.placements, rng)
    rows = []
    for start in range(0, len(chosen), args.session):
        batch = chosen[start:start + args.session]
        for (kind, candidate), m in zip(batch, measurer.measure([c for _, c in batch], [k for k, _ in batch])):
            rows.append({"kind": kind, "placement": list(candidate.placement), "microbatches": candidate.microbatches,
                         "feasible": bool(m.feasible), "measured_ms": m.median_ms if m.feasible else None,
                         "ci_ms": list(m.ci_ms) if m.feasible and m.ci_ms else None, "reason": m.reason or ""})
            outcome = f"{m.median_ms:8.2f} ms" if m.feasible else f"infeasible: {m.reason}"
            print(f"  {spec} {len(rows):3d} {kind:9s} m={candidate.microbatches} {outcome}", flush=True)
    measured_rows = [r for r in rows if r["feasible"]]
    measured = np.array([r["measured_ms"] for r in measured_rows])
    pairs = [Candidate(tuple(r["placement"]), r["microbatches"]) for r in measured_rows]

    order = rng.permutation(len(measured_rows))
    n_fit = max(3, len(order) // 3)
    fit_idx, test_idx = order[:n_fit], order[n_fit:]
    plain = [i for i in fit_idx if pairs[i].microbatches == 1]  # the fit takes one-micro-batch placements
    before = Simulator(problem)
    calibration = fit_calibration(problem, [pairs[i].placement for i in plain], measured[plain])
    after = Simulator(problem, calibration)
    for r, c in zip(measured_rows, pairs):
        r["simulated_ms"] = before.simulate(c.placement, c.microbatches).step_ms
        r["calibrated_ms"] = after.simulate(c.placement, c.microbatches).step_ms
    for i in fit_idx:
        measured_rows[i]["fit"] = True
    sim_before = np.array([r["simulated_ms"] for r in measured_rows])
    sim_after = np.array([r["calibrated_ms"] for r in measured_rows])
    judged = [measured_rows[i] for i in test_idx]
    noise = [(r["ci_ms"][1] - r["ci_ms"][0]) / 2 / r["measured_ms"] for r in measured_rows if r["ci_ms"]]

    if args.save and len(measured_rows) >= 3:
        singles = [i for i, c in enumerate(pairs) if c.microbatches == 1]
        path = save_calibration(problem, fit_calibration(problem, [pairs[i].placement for i in singles],
                                                         measured[singles]))
        print(f"  saved the calibration fitted on all {len(singles)} one-micro-batch measurements to {path}")
    return {
        "workload": spec, "groups": problem.n_groups, "placements": len(rows), "measured": len(measured_rows),
        "pipelined": sum(1 for c in pairs if c.microbatches > 1), "fit_on": int(len(fit_idx)),
        "evaluated_on": int(len(test_idx)), "median_ci_halfwidth": float(np.median(noise)) if noise else None,
        "before": {"spearman": spearman(sim_before[test_idx], measured[test_idx]),
                   "median_abs_error": median_error(sim_before[test_idx], measured[test_idx])},
        "after": {"spearman": spearman(sim_after[test_idx], measured[test_idx]),
                  "median_abs_error": median_error(sim_after[test_idx], measured[test_idx])},
        "diagnosis": diagnose(problem, judged),
        "calibration": {"initial": Calibration.default(problem.cluster).to_json(), "fitted": calibration.to_json()},
        "rows": rows,
    }


def markdown(results: dict) -> str:
    host = results["host"]
    lines = [f"# Simulator fidelity ({host['date']})", "",
             f"Devices `{results['devices']}`; each candidate measured by the protocol (interleaved "
             f"sessions of {results['session']}, CI half-width target {100 * results['target']:.0f}%, at most "
             f"{results['cap_s']:.0f} s of timed rounds per session). Calibration fitted on a random third of each "
             "model's candidates; both columns judged on the other two thirds. Targets: Spearman >= 0.9, median "
             "error <= 10%.", "",
             "| model | groups | candidates (measured, pipelined) | fit / judged | noise (CI half-width) | "
             "Spearman before | after | median error before | after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        b, a = m["before"], m["after"]
        noise = f"{100 * m['median_ci_halfwidth']:.1f}%" if m["median_ci_halfwidth"] is not None else "-"
        lines.append(f"| {m['workload']} | {m['groups']} | {m['placements']} ({m['measured']}, {m['pipelined']}) | "
                     f"{m['fit_on']} / {m['evaluated_on']} | {noise} | {b['spearman']:.2f} | {a['spearman']:.2f} | "
                     f"{100 * b['median_abs_error']:.1f}% | {100 * a['median_abs_error']:.1f}% |")
    counts = list(results["models"][0]["diagnosis"]) if results["models"] else []
    lines += ["", "What the calibrated simulator's remaining error follows (Spearman of log(measured / simulated) "
              "with each count, over the judged candidates):", "",
              "| model | " + " | ".join(counts) + " |", "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for m in results["models"]:
        lines.append(f"| {m['workload']} | " + " | ".join(f"{m['diagnosis'][c]:.2f}" for c in counts) + " |")
    return "\n".join(lines + ["", *host_lines(host)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--size", default="medium", choices=["small", "medium"], help="zoo size")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--placements", type=int, default=36)
    parser.add_argument("--session", type=int, default=6, help="candidates measured together, interleaved")
    parser.add_argument("--target", type=float, default=0.03, help="CI half-width target, relative")
    parser.add_argument("--cap-s", type=float, default=60.0, help="seconds of timed rounds per session")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="save each model's calibration (fit on all candidates)")
    parser.add_argument("--quick", action="store_true", help="nmt small, 6 candidates, short sessions: a check it runs")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.placements, args.session, args.cap_s = ["nmt"], "small", 6, 3, 5.0

    torch.manual_seed(args.seed)
    host = host_info()  # the load as the run starts: is it quiet enough to record?
    started = time.perf_counter()
    models = []
    for name in args.models:
        print(f"{name}:", flush=True)
        models.append(evaluate_model(name, args))
        m = models[-1]
        print(f"  Spearman {m['before']['spearman']:.2f} -> {m['after']['spearman']:.2f}, median error "
              f"{100 * m['before']['median_abs_error']:.1f}% -> {100 * m['after']['median_abs_error']:.1f}%")
    results = {"host": host, "devices": args.devices, "size": args.size, "session": args.session,
               "target": args.target, "cap_s": args.cap_s, "seed": args.seed,
               "seconds": time.perf_counter() - started, "models": models}
    stem = "fidelity_quick" if args.quick else f"fidelity_{args.size}"
    paths = record(stem, results, markdown(results))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
