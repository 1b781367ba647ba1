"""Ablation: RL against RL with lr=0, random_search and local_search, at equal samples.

For each problem (a workload on a device list) every method starts from the same warm
start (the best heuristic by simulated step time, the pipeline heuristic among them, as
`placer optimize` starts from the best one measured) and gets the same TrainConfig: the
same number of sampled candidates in rounds of the same size (but RL's first round,
TrainConfig.first_round batches of starts), the same seeds. The
searches score on the simulator and measure nothing while they run, so the only
difference is how each proposes candidates. The simulator's calibration: with
--calibrate, fitted first to the heuristics' candidates measured together (the pipeline
heuristic's with its micro-batches, as `placer optimize` does); else the one saved for
the model and devices (e.g. by `fidelity.py --save` or an optimize run); for NAME@k the
one of NAME; else nominal.

- `rl`: the seq2seq policy with its graph encoder, trained as it samples (TrainConfig's
  algorithm, PPO by default), with an incumbent per micro-batch count (placer.rl.trainer);
- `rl_lr0`: the same search with the policy never updated (lr=0): its first round (the
  warm start at the other counts, random stage-like candidates) and the imitation of each count's
  best are the same, then it samples around those: what the search finds without learning;
- `random_search`: uniformly random candidates;
- `local_search`: simulated annealing over single-group moves from the warm start.

Table 1 (always): per problem and method, the best simulated step time, mean and
spread over the seeds, and its ratio to the warm start's. Beside the lower bound, the
exact simulated optimum where the problem has at most --optimum-limit candidates
(placer.search.exhaustive: every device of every colocation set at every micro-batch
count, scored), and each method's gap to it: a method that ties the warm start where
the warm start is the optimum had nothing left to find.

With `--measure` (a quiet host: run it under `flock /tmp/placer-heavy.lock` with load
< 1), for each problem whose devices the host can really run side by side (virtual
CPU devices: at most one per core; larger clusters are reported simulated only), in
two sessions, as `placer optimize` chooses (a shortlist, then a confirm session):

1. selection: every method measures its --measure-top-k best distinct simulated
   candidates of each seed (SearchResult.top: the same K for every method, an equal
   measurement budget) and the warm start, all in one interleaved session
   (placer.measurements, CI of the median) with `unplaced`; identical candidates (same
   placement and micro-batch count, across methods and seeds) are measured once and
   shared. The warm start is in every method's pool because every search starts there
   and `placer optimize`'s closing round always measures it: the product never
   chooses, by measurement, a plan slower than the warm start;
2. confirm: each method's pick of each seed, the warm start and `unplaced` in a fresh
   session (--confirm-cap-s). A pick is the fastest measured candidate of the method's
   pool, or the warm start where it ties that one (the CI of their ratio holds 1):
   `placer optimize` keeps the simpler plan of a tie, a heuristic before a search
   (placer.choose rule 2), and a selection of a few noisy steps each would otherwise
   pick by noise alone (ablation_measured_s14: 370.4 against 370.6 ms). The verdicts
   come from the confirm session alone: the selection's minimum over K noisy
   measurements is biased low (the winner's curse).
   RL's pick of each seed is compared with local_search's and random_search's of the
   same seed (bootstrap CI of the ratio): faster, tie or slower ("same candidate" when
   both picked the very same one).

    .venv/bin/python experiments/ablation.py                    # every problem, 1,500 samples, 3 seeds
    .venv/bin/python experiments/ablation.py --quick            # two small problems, 64 samples, 1 seed
    flock /tmp/placer-heavy.lock .venv/bin/python experiments/ablation.py --calibrate --measure

Writes experiments/results/ablation.{json,md} (`--name` another name; ablation_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from envs.calibrate import fit_calibration, load_calibration, save_calibration
from graphs.devices import host_cores
from graphs.problem import Candidate, PlacementProblem, build_problem
from placer.baselines import HEURISTICS
from placer.microbatch_policy import microbatches_off
from placer.optimize import baseline_rows, bounds_of
from placer.rl import TrainConfig
from placer.search import overrides, run
from placer.search.exhaustive import LIMIT, optimum
from placer.search.scorer import SimulatedScorer

WORKLOADS = Path(__file__).resolve().parent / "workloads"
METHODS = ("rl", "rl_lr0", "random_search", "local_search")
YARDSTICKS = ("local_search", "random_search")  # what RL is judged against


def devices(n: int) -> str:
    return ",".join(f"cpu:{i}" for i in range(n))


# name -> (workload, devices): the zoo's medium models, branchy models of our own, larger clusters
PROBLEMS = {
    "rnnlm": ("zoo:rnnlm:medium", devices(2)),
    "nmt": ("zoo:nmt:medium", devices(2)),
    "inception_v3": ("zoo:inception_v3:medium", devices(2)),
    "transformer": ("zoo:transformer:medium", devices(2)),
    "gpt": ("zoo:gpt:medium", devices(2)),
    "mlp": ("zoo:mlp:medium", devices(2)),
    "towers": (str(WORKLOADS / "towers.py"), devices(2)),
    "embeddings": (str(WORKLOADS / "embeddings.py"), devices(2)),
    "inception_blocks": (str(WORKLOADS / "inception_blocks.py"), devices(2)),
    "nmt@4": ("zoo:nmt:medium", devices(4)),
    "gpt@4": ("zoo:gpt:medium", devices(4)),
    "transformer@4": ("zoo:transformer:medium", devices(4)),
    "mlp@4": ("zoo:mlp:medium", devices(4)),
    "rnnlm@4": ("zoo:rnnlm:medium", devices(4)),
    "inception_v3@4": ("zoo:inception_v3:medium", devices(4)),
    "towers@4": (str(WORKLOADS / "towers.py"), devices(4)),
    "nmt@8": ("zoo:nmt:medium", devices(8)),
    "gpt@8": ("zoo:gpt:medium", devices(8)),
    "inception_v3@8": ("zoo:inception_v3:medium", devices(8)),
    "inception_blocks@8": (str(WORKLOADS / "inception_blocks.py"), devices(8)),
}
QUICK = ("towers", "embeddings")
QUICK_OPTIMUM_LIMIT = 2 ** 16  # --quick enumerates no more (embeddings' 2^20 candidates take minutes)


def heuristics(problem: PlacementProblem) -> dict[str, Candidate]:
    """Each feasible heuristic's candidate, by method (the pipeline heuristic's with its
    micro-batches), as `placer optimize` runs them."""
    return baseline_rows(problem, list(HEURISTICS), seed=0)[1]


def warm_start(problem: PlacementProblem, scorer: SimulatedScorer) -> tuple[str, Candidate, float]:
    """The best heuristic by simulated step time: (method, candidate, ms)."""
    scored = [(scorer.score([c])[0], name, c) for name, c in heuristics(problem).items()]
    ms, name, candidate = min(scored, key=lambda s: s[0])
    return name, candidate, ms


def search(problem: PlacementProblem, calibration, method: str, config: TrainConfig, warm: Candidate,
           top_k: int) -> dict:
    """One method's run on the simulator: its best candidate, its `top_k` best distinct
    ones ([placement, micro-batches, simulated ms], fastest first) and how long it took."""
    if method == "rl_lr0":
        method, config = "rl", replace(config, lr=0.0)
    start = time.perf_counter()
    result = run(method, problem, SimulatedScorer(problem, calibration), config, warm)
    return {"best_ms": result.best_sim_ms, "candidate": [list(result.best.placement), result.best.microbatches],
            "top": [[list(c.placement), c.microbatches, ms] for c, ms in result.top[:top_k]],
            "samples": result.samples, "seconds": time.perf_counter() - start,
            "curve": [[row["samples"], row["best_sim_ms"]] for row in result.curve]}


def measurable(problem: PlacementProblem) -> bool:
    """Virtual CPU devices this host can run side by side: at most one per core."""
    return all(d.is_virtual_cpu for d in problem.cluster.devices) and problem.n_devices <= host_cores()


def calibration_for(name: str, problem: PlacementProblem, args: argparse.Namespace):
    """The simulator's calibration: with --calibrate (and a host that can run the devices)
    fitted now to the heuristics' candidates, measured together; else the one saved for
    this model and devices; else, for NAME@k, the one saved for its workload on two
    devices (virtual CPU devices of one thread each cost alike); else None (nominal)."""
    if args.calibrate and measurable(problem):
        fit_baselines(name, problem, args)
    calibration = load_calibration(problem)
    if calibration is None and "@" in name:
        calibration = load_calibration(build_problem(PROBLEMS[name][0], devices=devices(2), max_groups=args.max_groups))
    return calibration


def fit_baselines(name: str, problem: PlacementProblem, args: argparse.Namespace) -> None:
    """Measure every heuristic's candidate (the pipeline heuristic's with its micro-batches) in one
    session and save the calibration fitted to them, as `placer optimize` calibrates."""
    from graphs.workload import load_workload
    from placer.book import MeasurementBook
    from placer.measurements import Measurer, Protocol

    unique = list(dict.fromkeys(heuristics(problem).values()))
    measurer = Measurer(load_workload(PROBLEMS[name][0]), problem, MeasurementBook({"calibrate": name}),
                        Protocol(cap_s=args.cap_s))
    measured = measurer.session([(str(i), c) for i, c in enumerate(unique)], f"calibrating {name}")
    pairs = [(c, m.median_ms) for c, m in zip(unique, measured.values()) if m.feasible]
    if len(pairs) >= 2:
        save_calibration(problem, fit_calibration(problem, [c for c, _ in pairs], [ms for _, ms in pairs]))


def ablate(name: str, spec: str, device_list: str, args: argparse.Namespace) -> dict:
    from graphs.workload import load_workload

    loaded = load_workload(spec)
    problem = build_problem(loaded, devices=device_list, max_groups=args.max_groups)
    # As placer optimize does: no micro-batches where they would change the model (batch norm).
    refusal = microbatches_off(loaded, problem)
    calibration = calibration_for(name, problem, args)
    scorer = SimulatedScorer(problem, calibration)
    warm_name, warm, warm_ms = warm_start(problem, scorer)
    # The bound optimize's results.json gives; a cluster the host cannot run is bounded as simulated.
    bound_ms = bounds_of(problem, calibration, on_host=measurable(problem))["lower_bound_ms"]
    exact = optimum(problem, scorer, limit=args.optimum_limit)
    if exact is not None:
        print(f"  {name:20s} optimum        {exact.ms:9.2f} ms of {exact.candidates} candidates", flush=True)
    base = overrides(TrainConfig(budget_s=None, max_samples=args.samples, measure_top_k=0), args.set)
    runs = {method: [search(problem, calibration, method, replace(base, seed=seed), warm, args.measure_top_k)
                     for seed in range(args.seed, args.seed + args.seeds)] for method in args.methods}
    for method, rows in runs.items():
        times = [r["best_ms"] for r in rows]
        print(f"  {name:20s} {method:14s} best {statistics.mean(times):9.2f} ms (warm {warm_ms:.2f}, "
              f"{', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return {"name": name, "workload": spec, "devices": device_list, "groups": problem.n_groups,
            "calibrated": calibration is not None,
            "warm_start": {"method": warm_name, "ms": warm_ms, "candidate": [list(warm.placement), warm.microbatches]},
            "lower_bound_ms": bound_ms,
            "optimum": None if exact is None else {"ms": exact.ms, "candidates": exact.candidates, "candidate":
                                                    [list(exact.best.placement), exact.best.microbatches]},
            "measurable": measurable(problem), "microbatches_off": refusal,
            "runs": runs, "problem": problem}


def distinct(shortlists: dict[str, Sequence[Candidate]]) -> tuple[dict[str, Candidate], dict[str, list[str]]]:
    """Each distinct candidate once, for measuring identical ones once and sharing the measurement.

    Returns (label -> candidate: every distinct candidate of the shortlists, labelled
    "OWNER#RANK" after the first owner that lists it; owner -> the labels of its list, in order).

    >>> same, other = Candidate((0, 1)), Candidate((1, 1), 2)
    >>> distinct({"rl/0": [same, other], "local_search/0": [Candidate((0, 1))]})[1]
    {'rl/0': ['rl/0#0', 'rl/0#1'], 'local_search/0': ['rl/0#0']}
    """
    labels: dict[Candidate, str] = {}
    owners = {owner: [labels.setdefault(c, f"{owner}#{rank}") for rank, c in enumerate(candidates)]
              for owner, candidates in shortlists.items()}
    return {label: c for c, label in labels.items()}, owners


def pools(entry: dict) -> dict[str, list[Candidate]]:
    """What each method measures per seed: owner "METHOD/SEED" -> its best distinct simulated
    candidates (the run's `top`) and then the warm start, unless among them; and owner
    "warm_start" -> the warm start alone.

    >>> pools({"warm_start": {"candidate": [[0, 0], 1]}, "runs": {"rl": [{"top": [[[0, 1], 2, 9.0]]}]}})["rl/0"]
    [Candidate(placement=(0, 1), microbatches=2), Candidate(placement=(0, 0), microbatches=1)]
    """
    placement, microbatches = entry["warm_start"]["candidate"]
    warm = Candidate(tuple(placement), microbatches)
    shortlists = {"warm_start": [warm]}
    for method, rows in entry["runs"].items():
        for i, row in enumerate(rows):
            top = [Candidate(tuple(p), m) for p, m, _ in row["top"]]
            shortlists[f"{method}/{i}"] = top + ([warm] if warm not in top else [])
    return shortlists


def pick(labels: Sequence[str], measured: dict, warm: str) -> str | None:
    """The label of `labels` with the lowest feasible median in `measured` (label ->
    Measurement), or `warm` (the warm start's label) where it is among them and not
    measurably slower than that one (placer.choose rule 2: the simpler plan of a tie);
    None when none is feasible."""
    from placer.measurements import compare

    feasible = [label for label in labels if measured[label].feasible]
    best = min(feasible, key=lambda label: measured[label].median_ms, default=None)
    if best is None or best == warm or warm not in feasible:
        return best
    ratio = compare(measured[warm], measured[best], best)
    return warm if ratio is not None and ratio.verdict != "slower" else best


def measure(entry: dict, args: argparse.Namespace) -> None:
    """Measure one problem's shortlists, then confirm each owner's pick (module docstring)."""
    from graphs.workload import load_workload
    from placer.book import MeasurementBook
    from placer.measurements import UNPLACED, Measurer, Protocol, compare

    problem, workload = entry.pop("problem"), load_workload(entry["workload"])
    candidates, owners = distinct(pools(entry))

    def session(stage: str, cap_s: float, labels: Sequence[str]) -> dict:
        """A fresh interleaved session of unplaced and the candidates of `labels`: label -> Measurement."""
        measurer = Measurer(workload, problem, MeasurementBook({"ablation": entry["name"]}), Protocol(cap_s=cap_s))
        return measurer.session([(UNPLACED, None), *((label, candidates[label]) for label in labels)],
                                f"{stage}: {entry['name']}")

    selection = session("selection", args.cap_s, list(candidates))
    picks = {owner: pick(listed, selection, owners["warm_start"][0]) for owner, listed in owners.items()}
    confirm = session("confirm", args.confirm_cap_s, list(dict.fromkeys(p for p in picks.values() if p is not None)))

    def verdict(mine: str | None, theirs: str | None, name: str) -> dict | None:
        if mine is not None and mine == theirs:
            return {"speedup": 1.0, "ci": None, "verdict": "same candidate"}
        ratio = None if mine is None or theirs is None else compare(confirm[mine], confirm[theirs], name)
        return None if ratio is None else {"speedup": ratio.value, "ci": list(ratio.ci), "verdict": ratio.verdict}

    entry["measured"] = {"top_k": args.measure_top_k,
                         "candidates": {label: [list(c.placement), c.microbatches] for label, c in candidates.items()},
                         "shortlists": owners, "picks": picks,
                         "selection": {label: m.to_json() for label, m in selection.items()},
                         "confirm": {label: m.to_json() for label, m in confirm.items()}}
    entry["rl_vs"] = {other: [verdict(picks[f"rl/{i}"], picks[f"{other}/{i}"], other) for i in range(args.seeds)]
                      for other in YARDSTICKS if "rl" in entry["runs"] and other in entry["runs"]}


def markdown(results: dict) -> str:
    host = results["host"]
    lines = [f"# Ablation ({host['date']})", "",
             f"{results['samples']} sampled candidates per method, seeds {results['seeds']}; every method starts "
             "from the best heuristic (warm start) and scores on the simulator; best simulated step time, mean "
             "(and spread) over the seeds. Lower is better.", "",
             "| problem | groups | warm start (ms) | lower bound (ms) | optimum (ms) | "
             + " | ".join(results["methods"]) + " |", "| --- | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in results["methods"]) + " |"]
    for p in results["problems"]:
        exact = p.get("optimum")
        cells = []
        for method in results["methods"]:
            times = [r["best_ms"] for r in p["runs"][method]]
            mean, spread = statistics.mean(times), max(times) - min(times)
            gap = "" if exact is None else f", {100 * (mean / exact['ms'] - 1):+.1f}% over the optimum"
            cells.append(f"{mean:.2f} ({spread:.2f}, {p['warm_start']['ms'] / mean:.3f}x{gap})")
        optimum_cell = "-" if exact is None else f"{exact['ms']:.2f}"
        lines.append(f"| {p['name']} | {p['groups']} | {p['warm_start']['ms']:.2f} ({p['warm_start']['method']}) | "
                     f"{p['lower_bound_ms']:.2f} | {optimum_cell} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean ms (max - min over seeds, speedup over the warm start, and where the problem is small "
              "enough to enumerate, the mean's gap to the exact simulated optimum). Optimum: the fastest of every "
              "candidate, scored (\"-\": more than --optimum-limit candidates). Simulated with the calibration "
              "saved for each model and devices where there is one (`calibrated` in the JSON), else the nominal one."]
    return "\n".join(lines + leads(results) + measured_lines(results) + optimism_lines(results)
                     + ["", *host_lines(host)]) + "\n"


def leads(results: dict) -> list[str]:
    """Markdown: RL's simulated lead over each yardstick, seed by seed (its best ms / RL's best ms - 1)."""
    others = [m for m in YARDSTICKS if m in results["methods"]]
    if "rl" not in results["methods"] or not others:
        return []
    lines = ["", "RL's simulated lead over each yardstick per seed (the yardstick's best / RL's best - 1; "
             "positive: RL found a faster candidate):", "",
             "| problem | " + " | ".join(f"vs {m}" for m in others) + " |", "| --- |" + " --- |" * len(others)]
    for p in results["problems"]:
        cells = ["; ".join(f"{100 * (theirs['best_ms'] / mine['best_ms'] - 1):+.1f}%"
                           for mine, theirs in zip(p["runs"]["rl"], p["runs"][m])) for m in others]
        lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    return lines


def measured_lines(results: dict) -> list[str]:
    """Markdown: the confirm session's medians of every pick, and RL's verdicts against the yardsticks."""
    measured = [p for p in results["problems"] if p.get("rl_vs")]
    if not measured:
        return []
    k = measured[0]["measured"]["top_k"]
    lines = ["", f"## Measured: each method's fastest of its {k} best simulated candidates and the warm start, "
             "confirmed", "",
             f"Selection: every method's {k} best distinct simulated candidates of each seed and the warm start (in "
             "every method's pool: each starts there, and placer optimize always measures it), with unplaced, in one "
             "interleaved session (identical candidates measured once). Confirm: each method's "
             "fastest of them per seed, the warm start and unplaced in a fresh session; the medians and verdicts "
             "below are the confirm session's only.", "",
             "| problem | unplaced (ms) | warm start (ms) | " + " | ".join(results["methods"]) + " |",
             "| --- | ---: | ---: |" + " ---: |" * len(results["methods"])]
    for p in measured:
        confirm, picks = p["measured"]["confirm"], p["measured"]["picks"]
        cells = [", ".join(_median(confirm, picks[f"{m}/{i}"]) for i in range(len(p["runs"][m])))
                 for m in results["methods"]]
        lines.append(f"| {p['name']} | {_median(confirm, 'unplaced')} | {_median(confirm, picks['warm_start'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| problem | RL vs | speedup (95% CI), verdict, per seed |", "| --- | --- | --- |"]
    for p in measured:
        for other, ratios in p["rl_vs"].items():
            cells = ["infeasible" if r is None else "same candidate" if r["ci"] is None
                     else f"{r['speedup']:.3f}x ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) {r['verdict']}" for r in ratios]
            lines.append(f"| {p['name']} | {other} | {'; '.join(cells)} |")
    return lines


def optimism_lines(results: dict) -> list[str]:
    """Markdown: the simulator's optimism about each method's shortlist relative to the warm start (below). A
    search finds where the simulator errs in its favour: a shortlist that reads high won less when measured."""
    if not (measured := [p for p in results["problems"] if p.get("measured")]):
        return []
    lines = ["", "The simulator's optimism about each shortlist, relative to the warm start: the selection session's "
             "median of log(measured / simulated) over the method's candidates minus the warm start's (+0.10: they "
             "ran about 10% slower against the warm start than simulated):", "",
             "| problem | " + " | ".join(results["methods"]) + " |", "| --- |" + " ---: |" * len(results["methods"])]
    for p in measured:
        selection, labels = p["measured"]["selection"], p["measured"]["candidates"]
        simulated = {(tuple(c), m): ms for runs in p["runs"].values() for run in runs for c, m, ms in run["top"]}
        simulated[tuple(p["warm_start"]["candidate"][0]), p["warm_start"]["candidate"][1]] = p["warm_start"]["ms"]

        def error(label: str) -> float:
            return math.log(selection[label]["median_ms"] / simulated[tuple(labels[label][0]), labels[label][1]])
        warm = error(p["measured"]["picks"]["warm_start"])
        shortlists = [{label for i in range(len(p["runs"][method])) for label in p["measured"]["shortlists"][
            f"{method}/{i}"] if not label.startswith("warm_start") and selection[label]["feasible"]}
            for method in results["methods"]]
        cells = [f"{statistics.median(error(label) for label in mine) - warm:+.3f}" if mine else "-"
                 for mine in shortlists]
        lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    return lines


def _median(session: dict, label: str | None) -> str:
    """A markdown cell: the median (ms) of `label`'s measurement in `session` (JSON), or "infeasible"."""
    measurement = None if label is None else session[label]
    return f"{measurement['median_ms']:.1f}" if measurement and measurement["feasible"] else "infeasible"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=1500, help="sampled candidates per method and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    parser.add_argument("--optimum-limit", type=int, default=LIMIT,
                        help="enumerate the exact optimum of problems with at most this many candidates (0: none)")
    parser.add_argument("--measure", action="store_true", help="measure the best candidates (quiet host only)")
    parser.add_argument("--calibrate", action="store_true",
                        help="first fit the simulator to the heuristics' measured placements (quiet host only)")
    parser.add_argument("--measure-top-k", type=int, default=3,
                        help="with --measure: distinct best simulated candidates measured per method and seed")
    parser.add_argument("--cap-s", type=float, default=120.0,
                        help="seconds of timed rounds of each calibration and selection session")
    parser.add_argument("--confirm-cap-s", type=float, default=120.0,
                        help="seconds of timed rounds of each confirm session")
    parser.add_argument("--quick", action="store_true",
                        help="two small problems, 64 samples, one seed, optima of at most 2^16 candidates")
    parser.add_argument("--name", default="ablation", help="results file name (experiments/results/NAME.{json,md})")
    args = parser.parse_args()
    if args.quick:
        args.problems, args.samples, args.seeds = list(QUICK), 64, 1
        args.optimum_limit = min(args.optimum_limit, QUICK_OPTIMUM_LIMIT)
    torch.set_num_threads(1)  # the policy's tensors are small: more threads only contend

    host = host_info()  # the load as the run starts: is it quiet enough to record?
    started = time.perf_counter()
    problems = []
    for name in args.problems:
        print(f"{name}:", flush=True)
        entry = ablate(name, *PROBLEMS[name], args)
        if args.measure and entry["measurable"]:
            measure(entry, args)
        entry.pop("problem", None)
        problems.append(entry)
    results = {"host": host, "samples": args.samples, "seeds": list(range(args.seed, args.seed + args.seeds)),
               "methods": args.methods, "config": asdict(overrides(TrainConfig(), args.set)),
               "seconds": time.perf_counter() - started, "problems": problems}
    record(f"{args.name}_quick" if args.quick else args.name, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
