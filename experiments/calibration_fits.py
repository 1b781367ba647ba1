"""What the calibration's fit gains from pipelined measurements and the pipelined
slowdown (envs.sim, envs.calibrate), scored offline on recorded measurements; nothing
is timed.

Three fit rules on the same measurements:

- `one micro-batch`: fitted on the one-micro-batch measurements alone, no slowdown (the
  rule until 2026-12-02);
- `all, no slowdown`: every feasible measurement, pipelined ones included, the slowdown
  held at 0;
- `all, slowdown`: every feasible measurement, the slowdown fitted (today's rule).

Each is fitted on one part of a model's candidates and judged on the rest: the recorded
fit/judge split of a `fidelity.py` run, and three random folds (each candidate judged
once); with `--fit-on OTHER`, fitted on all of OTHER's measurements of the model and
judged on all of NAME's (a calibration fitted on one set of plans, judged on the plans
of another run, e.g. a search's shortlist: what a search needs). Reported per rule, as
the mean over the splits: the judged candidates' Spearman and median absolute error,
the median signed error log(measured / simulated) of the judged pipelined and
one-micro-batch candidates apart (a rule that leaves pipelined plans faster in
simulation than measured shows a positive pipelined bias), the fitted slowdown and the
seconds a fit took.

    .venv/bin/python experiments/calibration_fits.py fidelity_medium_piped
    .venv/bin/python experiments/calibration_fits.py ablation_measured_s17 --fit-on fidelity_medium_piped

A `fidelity` results file gives its rows; an `ablation` one the selection session's
measured candidates (the warm start and every method's shortlist). The problems are
rebuilt from the profile cache: where the cached profile is not the one the run had,
the uncalibrated simulator does not reproduce the run's simulated times, and the rows
are indicative (the report says so). Writes experiments/results/NAME_fits.{json,md}.
With `--save`, also saves each model's calibration fitted by today's rule on all of its
measurements where `placer optimize` and `ablation.py` find it (envs.calibrate).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from envs.calibrate import fit_calibration, save_calibration
from envs.sim import Simulator
from fidelity import median_error, spearman
from graphs.problem import Candidate, build_problem

RESULTS = Path(__file__).parent / "results"
# rule -> (pipelined measurements in the fit, pipelined slowdown fitted)
RULES = {"one micro-batch": (False, False), "all, no slowdown": (True, False), "all, slowdown": (True, True)}
FOLDS = 3


def fidelity_sets(results: dict, models: list[str]) -> list[dict]:
    """Per model of a fidelity run: its problem, candidates, measured ms, recorded split
    and whether the cached profile reproduces the run's simulated times."""
    sets = []
    for model in results["models"]:
        if models and not any(m in model["workload"] for m in models):
            continue
        problem = build_problem(model["workload"], devices=results["devices"], max_groups=model["max_groups"])
        rows = [r for r in model["rows"] if r["feasible"] and r.get("measured_ms")]
        sim = Simulator(problem)
        same = all(math.isclose(sim.simulate(r["placement"], r["microbatches"]).step_ms, r["simulated_ms"],
                                rel_tol=1e-6) for r in rows if r.get("simulated_ms"))
        sets.append({"name": model["workload"], "workload": model["workload"], "problem": problem,
                     "candidates": [Candidate(tuple(r["placement"]), r["microbatches"]) for r in rows],
                     "measured": [r["measured_ms"] for r in rows],
                     "recorded_fit": [i for i, r in enumerate(rows) if r.get("fit")], "same_profile": same})
    return sets


def ablation_sets(results: dict, models: list[str]) -> list[dict]:
    """Per problem of a measured ablation run: the selection session's candidates."""
    sets = []
    for entry in results["problems"]:
        if models and entry["name"] not in models or not entry.get("measured"):
            continue
        problem = build_problem(entry["workload"], devices=entry["devices"])
        selection = entry["measured"]["selection"]
        placement, m = entry["warm_start"]["candidate"]
        labels = {"warm_start#0": Candidate(tuple(placement), m)}
        for method, runs in entry["runs"].items():
            for seed, run in enumerate(runs):
                for k, (placement, m, _) in enumerate(run["top"]):
                    labels[f"{method}/{seed}#{k}"] = Candidate(tuple(placement), m)
        measured = {c: selection[label]["median_ms"] for label, c in labels.items()
                    if label in selection and selection[label]["feasible"]}
        sets.append({"name": entry["name"], "workload": entry["workload"], "problem": problem,
                     "candidates": list(measured),
                     "measured": list(measured.values()), "recorded_fit": None,
                     "same_profile": problem.n_groups == entry["groups"]})
    return sets


def load_sets(name: str, models: list[str]) -> list[dict]:
    """The measured sets of results file `name` (fidelity or measured ablation), each marked with its source."""
    source = json.loads((RESULTS / f"{name}.json").read_text())
    sets = fidelity_sets(source, models) if "models" in source else ablation_sets(source, models)
    return [{**e, "source": name} for e in sets]


def splits(n: int, recorded_fit: list[int] | None, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(fit, judged) index lists: the recorded split where there is one, then FOLDS random folds."""
    order = np.random.default_rng(seed).permutation(n)
    folds = [sorted(order[f::FOLDS].tolist()) for f in range(FOLDS)]
    out = [([i for i in range(n) if i not in set(judged)], judged) for judged in folds]
    if recorded_fit:
        out.insert(0, (recorded_fit, [i for i in range(n) if i not in set(recorded_fit)]))
    return out


def judge(fitted: dict, fit: list[int], judged: dict, on: list[int], pipelined: bool, slowdown: bool) -> dict | None:
    """One rule, fitted on `fitted`'s candidates `fit` and judged on `judged`'s candidates `on` (one set's
    split, or two sets of one model); None where the rule has fewer than two measurements to fit."""
    used = [i for i in fit if pipelined or fitted["candidates"][i].microbatches == 1]
    if len(used) < 2:
        return None
    started = time.perf_counter()
    calibration = fit_calibration(fitted["problem"], [fitted["candidates"][i] for i in used],
                                  [fitted["measured"][i] for i in used], slowdown=slowdown)
    seconds = time.perf_counter() - started
    sim = Simulator(judged["problem"], calibration)
    candidates = [judged["candidates"][i] for i in on]
    measured = np.array([judged["measured"][i] for i in on], dtype=np.float64)
    simulated = np.array([sim.simulate(c.placement, c.microbatches).step_ms for c in candidates])
    error = np.log(measured / simulated)
    piped = np.array([c.microbatches > 1 for c in candidates])
    return {"spearman": spearman(simulated, measured), "median_abs_error": median_error(simulated, measured),
            "pipelined_bias": float(np.median(error[piped])) if piped.any() else math.nan,
            "pipelined_judged": int(piped.sum()),
            "single_bias": float(np.median(error[~piped])) if (~piped).any() else math.nan,
            "slowdown": calibration.pipelined_slowdown, "fit_s": seconds}


def score(entry: dict, fit_on: dict | None = None) -> dict:
    """Every rule on `entry`'s splits, or fitted on all of `fit_on` and judged on all of `entry`."""
    n = len(entry["measured"])
    pairs = ([(fit_on, list(range(len(fit_on["measured"]))), entry, list(range(n)))] if fit_on else
             [(entry, fit, entry, judged) for fit, judged in splits(n, entry["recorded_fit"])])
    out = {"name": entry["name"], "measured": n, "pipelined": sum(c.microbatches > 1 for c in entry["candidates"]),
           "same_profile": entry["same_profile"], "fit_on": fit_on["source"] if fit_on else None, "rules": {}}
    for rule, flags in RULES.items():
        rows = [r for pair in pairs if (r := judge(*pair, *flags))]
        out["rules"][rule] = {key: float(np.nanmean([r[key] for r in rows])) if rows else None
                              for key in ("spearman", "median_abs_error", "pipelined_bias", "pipelined_judged",
                                          "single_bias", "slowdown", "fit_s")}
        out["rules"][rule]["splits"] = len(rows)
        print(f"  {entry['name']:26s} {rule:18s} {out['rules'][rule]}", flush=True)
    return out


def markdown(results: dict) -> str:
    def cell(x, fmt):
        return "-" if x is None or not math.isfinite(x) else format(x, fmt)

    fitted = f", fitted on all of {results['fit_on']}" if results.get("fit_on") else ""
    lines = [f"# Calibration fits scored offline: {results['source']}{fitted} ({results['host']['date']})", "",
             "| model | measured (pipelined) | rule | splits | Spearman, judged | median error | bias, pipelined "
             "(judged n) | bias, one micro-batch | slowdown | fit (s) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        flag = "" if m["same_profile"] else " \\*"
        for rule, r in m["rules"].items():
            lines.append(f"| {m['name']}{flag} | {m['measured']} ({m['pipelined']}) | {rule} | {r['splits']} | "
                         f"{cell(r['spearman'], '.2f')} | {cell(r['median_abs_error'], '.1%')} | "
                         f"{cell(r['pipelined_bias'], '+.1%')} ({cell(r['pipelined_judged'], '.1f')}) | "
                         f"{cell(r['single_bias'], '+.1%')} | {cell(r['slowdown'], '.2f')} | "
                         f"{cell(r['fit_s'], '.1f')} |")
    lines += ["", "Bias: median of log(measured / simulated) over the judged candidates; positive: the simulator "
              "put them faster than they ran. \\* the cached profile is not the run's (the uncalibrated simulator "
              "does not reproduce its simulated times): indicative.", "", *host_lines(results["host"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a results file stem in experiments/results (fidelity or measured ablation)")
    parser.add_argument("--models", nargs="*", default=[], help="models or problems to score (default: all)")
    parser.add_argument("--fit-on", help="fit on all of this run's measurements of each model, judge on NAME's")
    parser.add_argument("--save", action="store_true", help="save each model's calibration fitted on all of it")
    args = parser.parse_args()
    sets = load_sets(args.name, args.models)
    for entry in sets if args.save else ():
        fitted = fit_calibration(entry["problem"], entry["candidates"], entry["measured"])
        print(f"  {entry['name']}: {fitted.to_json()} saved to {save_calibration(entry['problem'], fitted)}")
    fit_on = {e["workload"]: e for e in load_sets(args.fit_on, [])} if args.fit_on else None
    if fit_on is not None:
        sets = [e for e in sets if e["workload"] in fit_on]
    results = {"source": args.name, "fit_on": args.fit_on, "host": host_info(),
               "models": [score(e, fit_on[e["workload"]] if fit_on else None) for e in sets]}
    record(f"{args.name}_fits" + (f"_from_{args.fit_on}" if args.fit_on else ""), results, markdown(results))


if __name__ == "__main__":
    main()
