"""How well the simulator predicts measured step times, before and after calibration,
and which cost is wrong where it does not.

For each zoo model on `--devices`: at least `--placements` candidates of five kinds
(every baseline's; random ones; "mixed": a baseline with a random share of its
groups moved; "split": a random contiguous cut of the group order; "pipelined": a
split or a baseline run with m > 1 micro-batches, where the profile allows it), all
repaired to keep colocation and memory. Each is measured through the measurement
protocol (placer.measurements: interleaved sessions of `--session` candidates, CI of
the median) on the dataflow runtime, and simulated. Every session also measures two
anchors (everything on the first device; the simulator's fastest multi-device
baseline), and each time is scaled by its session's anchor of its kind (one device
or several) to a common scale: the host drifts between sessions (`session_scale`).
The candidates are shuffled, so that no kind falls in one session. The calibration is
fitted on a random third of the candidates and judged on the other two thirds, against the
uncalibrated simulator on the same two thirds: Spearman rank correlation and median
absolute percentage error. Targets (issue 16): Spearman >= 0.9 and median error <= 10%.

Where the calibrated simulator still misses, `diagnose` says which cost is wrong: the
correlation of the log error (measured / simulated) with what each candidate costs in
crossings (values handed between devices), chunks (dispatches), devices busy at once
(virtual CPU devices share one memory bus) and micro-batches. A cost that the
simulator models wrongly shows as a strong correlation with its count; drift that
the anchors did not take out shows as a large share of the error between sessions.
`--rescore` scores a recorded run's measurements again with the current simulator.

    .venv/bin/python experiments/fidelity.py --size medium            # every zoo model, 36 candidates each
    .venv/bin/python experiments/fidelity.py --quick                  # nmt small, 6 candidates: a check it runs
    .venv/bin/python experiments/fidelity.py --rescore                # fidelity_medium.json scored by today's simulator
    flock /tmp/placer-heavy.lock .venv/bin/python experiments/fidelity.py --size medium --save

Writes experiments/results/fidelity_{size}.{json,md} (fidelity_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from _record import RESULTS, host_info, host_lines, record  # this folder is on sys.path when run as a script
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


def noise_ceiling(rows: list[dict], draws: int = 500, seed: int = 0) -> float:
    """The Spearman a perfect simulator could expect against these measurements: the
    median over `draws` of the rank correlation between the candidates' true times and
    those times measured again with each one's own noise (normal, sd = its 95% CI
    half-width / 1.96). The true times are estimated by the measured medians shrunk
    toward their mean by sqrt(1 - mean noise variance / variance of the medians): the
    medians' spread holds the noise once already, and re-drawing around the medians
    themselves counted it twice, overstating the ceiling where the candidates differ
    by little more than the noise (the 2026-12-01 transformer-medium run: 0.82 against
    0.62). Noise between sessions that the anchors leave is not counted."""
    rows = [r for r in rows if r.get("ci_ms")]
    if len(rows) < 3:
        return float("nan")
    measured = np.array([r["measured_ms"] for r in rows])
    sd = np.array([(r["ci_ms"][1] - r["ci_ms"][0]) / 2 / 1.96 for r in rows])
    spread = measured.var(ddof=1)
    shrink = math.sqrt(max(0.0, 1.0 - float(np.mean(sd ** 2)) / spread)) if spread > 0 else 0.0
    if shrink == 0.0:
        return 0.0  # the medians spread no more than their noise: nothing to rank
    true = measured.mean() + shrink * (measured - measured.mean())
    rng = np.random.default_rng(seed)
    return float(np.median([spearman(true, true + rng.normal(0.0, sd)) for _ in range(draws)]))


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
    """Spearman correlation of each cost count with the calibrated simulator's log error,
    and `session_share`: the share of that error's variance that lies between the
    measurement sessions (by chance about (sessions - 1) / (rows - 1); far above it, the
    anchors did not take the sessions' drift out, and no simulator cost can explain it)."""
    error = np.log([r["measured_ms"] / r["calibrated_ms"] for r in rows])
    counts = [cost_counts(problem, Candidate(tuple(r["placement"]), r["microbatches"])) for r in rows]
    out = {}
    for name in counts[0] if counts else ():
        values = np.array([c[name] for c in counts])
        out[name] = spearman(values, error) if values.std() > 0 else float("nan")
    sessions = np.array([r["session"] for r in rows])
    total = float(((error - error.mean()) ** 2).sum()) if len(rows) else 0.0
    between = sum((sessions == k).sum() * (error[sessions == k].mean() - error.mean()) ** 2 for k in set(sessions))
    out["session_share"] = float(between / total) if total > 0 else float("nan")
    return out


def evaluate_model(name: str, args: argparse.Namespace) -> dict:
    spec = f"zoo:{name}:{args.size}"
    problem = build_problem(spec, devices=args.devices, max_groups=args.max_groups)
    workload = load_workload(spec)
    rng = np.random.default_rng(args.seed)
    protocol = Protocol(target=args.target, cap_s=args.cap_s, warmup=args.warmup)
    measurer = Measurer(workload, problem, MeasurementBook({"fidelity": spec, "devices": args.devices}), protocol)
    chosen = candidates(problem, args.placements, rng)
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]  # no kind gathered in one session
    anchors = {"anchor": Candidate((0,) * problem.n_groups), "anchor2": spread_anchor(problem)}
    rows, anchor_ms = [], {label: [] for label in anchors}
    for start in range(0, len(chosen), args.session):
        batch = chosen[start:start + args.session]
        entries = [(str(i), c) for i, (_, c) in enumerate(batch)] + [(k, c) for k, c in anchors.items() if c]
        session = measurer.session(entries, "fidelity")
        for label in anchors:
            m = session.get(label)
            anchor_ms[label].append(m.median_ms if m is not None and m.feasible else float("nan"))
        for i, (kind, candidate) in enumerate(batch):
            m = session[str(i)]
            rows.append({"kind": kind, "placement": list(candidate.placement), "microbatches": candidate.microbatches,
                         "session": start // args.session, "feasible": bool(m.feasible),
                         "raw_ms": m.median_ms if m.feasible else None,
                         "raw_ci_ms": list(m.ci_ms) if m.feasible and m.ci_ms else None, "reason": m.reason or ""})
            outcome = f"{m.median_ms:8.2f} ms" if m.feasible else f"infeasible: {m.reason}"
            print(f"  {spec} {len(rows):3d} {kind:9s} m={candidate.microbatches} {outcome}", flush=True)
        print(f"  {spec} anchors: all on {problem.cluster.names[0]} {anchor_ms['anchor'][-1]:8.2f} ms, "
              f"spread {anchor_ms['anchor2'][-1]:8.2f} ms", flush=True)
    for r in rows:
        spread = len(set(r["placement"])) > 1 and anchors["anchor2"] is not None
        scale = session_scale(anchor_ms["anchor2" if spread else "anchor"], r["session"])
        r["measured_ms"] = r["raw_ms"] * scale if r["feasible"] else None
        r["ci_ms"] = [x * scale for x in r["raw_ci_ms"]] if r["raw_ci_ms"] else None
    measured_rows = [r for r in rows if r["feasible"]]
    order = rng.permutation(len(measured_rows))
    for i in order[:max(3, len(order) // 3)]:
        measured_rows[i]["fit"] = True
    scores = score(problem, rows)
    if args.save and len(measured_rows) >= 3:
        singles = [r for r in measured_rows if r["microbatches"] == 1]
        path = save_calibration(problem, fit_calibration(problem, [r["placement"] for r in singles],
                                                         [r["measured_ms"] for r in singles]))
        print(f"  saved the calibration fitted on all {len(singles)} one-micro-batch measurements to {path}")
    return {"workload": spec, "groups": problem.n_groups, "max_groups": args.max_groups, "placements": len(rows),
            "anchor_ms": anchor_ms["anchor"], "anchor2_ms": anchor_ms["anchor2"],
            "anchor2": list(anchors["anchor2"].placement) if anchors["anchor2"] else None, **scores, "rows": rows}


def spread_anchor(problem: PlacementProblem) -> Candidate | None:
    """The second anchor: of the baselines that use more than one device, the one the
    simulator finds fastest; None where there is none."""
    spread = [tuple(p) for p in run_baselines(problem).values()
              if not isinstance(p, InfeasibleError) and len(set(p)) > 1]
    sim = Simulator(problem)
    return Candidate(min(spread, key=lambda p: sim.simulate(p).step_ms)) if spread else None


def session_scale(anchor_ms: list[float], session: int) -> float:
    """The factor that puts a time of `session` on the common scale: the anchors'
    median over sessions / this session's anchor (1 where either is unknown).

    Drift between sessions (this host's speed wanders by 10-20% over minutes) would
    set candidates of different sessions apart, so each time is scaled by an anchor
    measured interleaved with it. Two anchors: everything on the first device for
    one-device candidates, and a multi-device baseline (`spread_anchor`) for the rest.
    One anchor was not enough: when another process takes a core, a plan whose
    workers are pinned to both cores loses more than one on a single thread, and the
    2026-12-01 run's inception_v3 plans of several devices then measured 6-19% above
    their session's one-device anchor in two sessions and -2% to +3% in two others (76%
    of the calibrated error's variance lay between sessions)."""
    known = [a for a in anchor_ms if np.isfinite(a)]
    factor = float(np.median(known)) / anchor_ms[session] if known else math.nan
    return factor if math.isfinite(factor) else 1.0


def score(problem: PlacementProblem, rows: list[dict]) -> dict:
    """Simulate the measured rows (dicts with "placement", "microbatches", "feasible",
    "measured_ms", and "fit": True on the calibration third) before and after a
    calibration fitted on the fit third's one-micro-batch rows, with the current
    simulator; writes each row's "simulated_ms" and "calibrated_ms" and returns the
    model's counts, the judged third's Spearman and median error before and after,
    the diagnosis and both calibrations."""
    measured_rows = [r for r in rows if r["feasible"]]
    measured = np.array([r["measured_ms"] for r in measured_rows])
    pairs = [Candidate(tuple(r["placement"]), r["microbatches"]) for r in measured_rows]
    fit_idx = [i for i, r in enumerate(measured_rows) if r.get("fit")]
    test_idx = [i for i, r in enumerate(measured_rows) if not r.get("fit")]
    plain = [i for i in fit_idx if pairs[i].microbatches == 1]  # the fit takes one-micro-batch placements
    before = Simulator(problem)
    calibration = fit_calibration(problem, [pairs[i].placement for i in plain], measured[plain])
    after = Simulator(problem, calibration)
    for r, c in zip(measured_rows, pairs):
        r["simulated_ms"] = before.simulate(c.placement, c.microbatches).step_ms
        r["calibrated_ms"] = after.simulate(c.placement, c.microbatches).step_ms
    sim_before = np.array([r["simulated_ms"] for r in measured_rows])
    sim_after = np.array([r["calibrated_ms"] for r in measured_rows])
    noise = [(r["ci_ms"][1] - r["ci_ms"][0]) / 2 / r["measured_ms"] for r in measured_rows if r["ci_ms"]]
    return {
        "measured": len(measured_rows), "pipelined": sum(1 for c in pairs if c.microbatches > 1),
        "fit_on": len(fit_idx), "evaluated_on": len(test_idx),
        "median_ci_halfwidth": float(np.median(noise)) if noise else None,
        "before": {"spearman": spearman(sim_before[test_idx], measured[test_idx]),
                   "median_abs_error": median_error(sim_before[test_idx], measured[test_idx])},
        "after": {"spearman": spearman(sim_after[test_idx], measured[test_idx]),
                  "median_abs_error": median_error(sim_after[test_idx], measured[test_idx])},
        "diagnosis": diagnose(problem, [measured_rows[i] for i in test_idx]),
        "calibration": {"initial": Calibration.default(problem.cluster).to_json(), "fitted": calibration.to_json()},
    }


def rescore(results: dict) -> dict:
    """`results` (a fidelity JSON) with every model scored again by `score`: the same
    measurements and fit/judge split, the current simulator and calibration fit. The
    problems are built again from the spec, devices and max_groups (256 where a run
    did not record it); the profile comes from the cache, so it is the run's own only
    where the cache still holds it (each row's "simulated_ms" is kept as
    "recorded_simulated_ms" so that a changed profile shows)."""
    models = []
    for model in results["models"]:
        problem = build_problem(model["workload"], devices=results["devices"], max_groups=model.get("max_groups", 256))
        rows = [dict(r) for r in model["rows"]]
        for r in rows:
            if r["feasible"]:
                r.setdefault("recorded_simulated_ms", r["simulated_ms"])
        models.append({**model, **score(problem, rows), "rows": rows})
    return {**results, "models": models, "rescored": host_info()["date"]}


def markdown(results: dict) -> str:
    host = results["host"]
    two = any(m.get("anchor2") for m in results["models"])
    rescored = (f" Scored again ({results['rescored']}, `--rescore`) by the simulator and calibration fit of that "
                "date: same measurements, same split." if results.get("rescored") else "")
    anchors = ("two anchors (all on the first device, for one-device candidates; the simulator's fastest "
               "multi-device baseline, for the others)" if two else "an anchor (all on the first device)")
    lines = [f"# Simulator fidelity ({host['date']})", "",
             f"Devices `{results['devices']}`; each candidate measured by the protocol (interleaved "
             f"sessions of {results['session']} candidates and {anchors}, by which every time is put "
             f"on one scale, CI half-width target {100 * results['target']:.0f}%, at most "
             f"{results['cap_s']:.0f} s of timed rounds per session). Calibration fitted on a random third of each "
             "model's candidates; both columns judged on the other two thirds. Targets: Spearman >= 0.9, median "
             "error <= 10%. Noise ceiling: the Spearman a perfect simulator could expect against measurements "
             f"this noisy (`noise_ceiling`).{rescored}", "",
             "| model | groups | candidates (measured, pipelined) | fit / judged | noise (CI half-width) | "
             "Spearman before | after | noise ceiling | median error before | after | after, pipelined only |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        b, a = m["before"], m["after"]
        noise = f"{100 * m['median_ci_halfwidth']:.1f}%" if m["median_ci_halfwidth"] is not None else "-"
        judged = [r for r in m["rows"] if r["feasible"] and not r.get("fit")]
        piped = [abs(r["calibrated_ms"] / r["measured_ms"] - 1) for r in judged if r["microbatches"] > 1]
        piped_error = f"{100 * float(np.median(piped)):.1f}% ({len(piped)})" if piped else "-"
        lines.append(f"| {m['workload']} | {m['groups']} | {m['placements']} ({m['measured']}, {m['pipelined']}) | "
                     f"{m['fit_on']} / {m['evaluated_on']} | {noise} | {b['spearman']:.2f} | {a['spearman']:.2f} | "
                     f"{noise_ceiling(judged):.2f} | {100 * b['median_abs_error']:.1f}% | "
                     f"{100 * a['median_abs_error']:.1f}% | {piped_error} |")
    counts = list(results["models"][0]["diagnosis"]) if results["models"] else []
    lines += ["", "What the calibrated simulator's remaining error follows (Spearman of log(measured / simulated) "
              "with each count, over the judged candidates; session_share: the share of its variance between "
              "measurement sessions, about (sessions - 1) / (candidates - 1) by chance):", "",
              "| model | " + " | ".join(counts) + " |", "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for m in results["models"]:
        lines.append(f"| {m['workload']} | " + " | ".join("-" if m["diagnosis"][c] is None else f"{m['diagnosis'][c]:.2f}" for c in counts) + " |")
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
    parser.add_argument("--name", help="results file stem (default fidelity_SIZE, fidelity_quick with --quick)")
    parser.add_argument("--rewrite", action="store_true", help="measure nothing: rewrite NAME.md from NAME.json")
    parser.add_argument("--rescore", action="store_true",
                        help="measure nothing: score NAME.json's measurements again with the current simulator and "
                             "calibration fit (same fit/judge split), into NAME_rescored.{json,md}")
    args = parser.parse_args()
    if args.rewrite or args.rescore:
        stem = args.name or f"fidelity_{args.size}"
        results = json.loads((RESULTS / f"{stem}.json").read_text())
        if args.rescore:
            results, stem = rescore(results), f"{stem}_rescored"
        print(f"wrote {record(stem, results, markdown(results))[1]}")
        return
    if args.quick:
        args.models, args.size, args.placements, args.session, args.cap_s = ["nmt"], "small", 6, 3, 5.0

    torch.manual_seed(args.seed)
    host = host_info()  # the load as the run starts: is it quiet enough to record?
    started = time.perf_counter()
    stem = args.name or ("fidelity_quick" if args.quick else f"fidelity_{args.size}")
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
        paths = record(stem, results, markdown(results))  # after each model: a cut run keeps what it measured
        print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
