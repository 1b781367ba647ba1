"""Ablation: RL against RL with lr=0, random_search and local_search, at equal samples.

For each problem (a workload on a device list) every method starts from the same warm
start (the best heuristic by simulated step time, the pipeline heuristic among them, as
`placer optimize` starts from the best one measured) and gets the same TrainConfig: the
same number of sampled candidates in rounds of the same size (but RL's first round,
TrainConfig.first_round batches of starts), the same seeds. The
searches score on the simulator and measure nothing while they run, so the only
difference is how each proposes candidates; with --measure-during they measure as
`placer optimize`'s do (TrainConfig.measure_top_k best every measure_every rounds, then a
refit to every measurement so far, the heuristics' included; the same cadence for every
method, placer.search.state), each search on its own copy of the heuristics'
measurements, and their choice is the fastest of their closing session (placer.search.state).
The simulator's calibration: with --calibrate, fitted first to the heuristics' candidates
measured together (the pipeline heuristic's with its micro-batches, as `placer optimize`
does); else the one saved for the model and devices (e.g. by `fidelity.py --save` or an optimize run); for NAME@k the
one of NAME; else nominal.

- `rl`: the seq2seq policy with its graph encoder, trained as it samples (TrainConfig's
  algorithm, PPO by default), with an incumbent per micro-batch count (placer.rl.trainer);
- `rl_lr0`: the same search with the policy never updated (lr=0): its first round (the
  warm start at the other counts, interleaved stages, random stage-like candidates) and the imitation
  of each count's best are the same, then it samples around those: what the search finds without learning;
- `random_search`: uniformly random candidates;
- `local_search`: simulated annealing over single-group moves from the warm start.

With --interleaved-start the warm start is the best of the heuristics and the interleaved stages
RL's first round scores, so that every search starts where RL's best start is.

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
   measurement budget), its own choice (with --measure-during, the fastest of its closing session)
   and the warm start, with `unplaced`, in an interleaved session of their own
   (placer.measurements, CI of the median), one per method and seed: in one session
   of 30+ candidates the same plans ran slower and several times as spread as in one
   of four (probe_session_size.py), and the pick is made within the method's pool
   anyway. Identical candidates (same placement and micro-batch count) share a label.
   The warm start is in every method's pool because every search starts there and
   `placer optimize`'s closing round always measures it: the product never chooses,
   by measurement, a plan slower than the warm start;
2. confirm: each method's pick of each seed, the warm start and `unplaced` in --confirms
   fresh sessions (2; --confirm-cap-s each), each in the reverse order of the one before
   (A B B A). A pick is the fastest measured candidate of the method's
   pool, or the warm start where it ties that one (the CI of their ratio holds 1):
   `placer optimize` keeps the simpler plan of a tie, a heuristic before a search
   (placer.choose rule 2), and a selection of a few noisy steps each would otherwise
   pick by noise alone (ablation_measured_s14: 370.4 against 370.6 ms). The verdicts
   come from the confirm sessions alone: the selection's minimum over K noisy
   measurements is biased low (the winner's curse).
   RL's pick of each seed is compared with local_search's and random_search's of the
   same seed in each confirm session (bootstrap CI of the ratio): faster or slower where
   every session says so, else a tie ("same candidate" when both picked the very same
   one). One session's CI holds only the noise within it: at s22 a pick confirmed 7%
   slower against unplaced than its selection session had measured it, a gap no CI of
   either session allowed for.

`--reconfirm RESULTS.json` confirms an earlier run's picks again, and nothing else.

    .venv/bin/python experiments/ablation.py                    # every problem, 1,500 samples, 3 seeds
    .venv/bin/python experiments/ablation.py --quick            # two small problems, 64 samples, 1 seed
    flock /tmp/placer-heavy.lock .venv/bin/python experiments/ablation.py --calibrate --measure

Writes experiments/results/ablation.{json,md} (`--name` another name; ablation_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from _record import host_info, record  # this folder is on sys.path when run as a script
from ablation_report import YARDSTICKS, markdown
from envs.calibrate import fit_calibration, load_calibration, save_calibration
from graphs.devices import host_cores
from graphs.problem import Candidate, PlacementProblem, build_problem
from graphs.workload import load_workload
from placer.baselines import HEURISTICS
from placer.book import MeasurementBook
from placer.measurements import UNPLACED, Measurer, Protocol, compare
from placer.microbatch_policy import microbatches_off
from placer.optimize import baseline_rows, bounds_of
from placer.rl import TrainConfig
from placer.rl.starts import interleaved_candidates
from placer.search import overrides, run
from placer.search.config import microbatch_options
from placer.search.exhaustive import LIMIT, optimum
from placer.scorer import Scorer
from placer.search.scorer import SimulatedScorer

WORKLOADS = Path(__file__).resolve().parent / "workloads"
METHODS = ("rl", "rl_lr0", "random_search", "local_search")


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


def warm_start(problem: PlacementProblem, scorer: SimulatedScorer, interleaved: bool = False
               ) -> tuple[str, Candidate, float]:
    """The best heuristic by simulated step time: (method, candidate, ms). With `interleaved`, the best
    of them and the interleaved stages RL's first round scores (placer.rl.starts.interleaved_candidates),
    method "interleaved": every search then starts where RL's best start is."""
    starts = list(heuristics(problem).items())
    if interleaved:
        starts += [("interleaved", c) for c in interleaved_candidates(problem, microbatch_options(problem))]
    scored = [(scorer.score([c])[0], name, c) for name, c in starts]
    ms, name, candidate = min(scored, key=lambda s: s[0])
    return name, candidate, ms


def search(problem: PlacementProblem, scorer: Scorer, method: str, config: TrainConfig, warm: Candidate,
           top_k: int) -> dict:
    """One method's run: its choice (`candidate`: the fastest of its closing session where it
    measured, else the best simulated), its `top_k` best distinct simulated candidates
    ([placement, micro-batches, simulated ms], fastest first, under its last refit), what it
    measured and what its closing session measured again (`measured`, `final`: [placement,
    micro-batches, ms]) and how long it took."""
    if method == "rl_lr0":
        method, config = "rl", replace(config, lr=0.0)
    start = time.perf_counter()
    result = run(method, problem, scorer, config, warm)
    return {"best_ms": result.best_sim_ms, "candidate": [list(result.best.placement), result.best.microbatches],
            "top": [[list(c.placement), c.microbatches, ms] for c, ms in result.top[:top_k]],
            "measured": [[list(c.placement), c.microbatches, ms] for c, ms in result.measured],
            "final": [[list(c.placement), c.microbatches, ms] for c, ms in result.final],
            "samples": result.samples, "enumerated": result.enumerated, "seconds": time.perf_counter() - start,
            # the calibration `top`'s simulated times are under (its last refit where it measured)
            "calibration": scorer.simulator.calibration.to_json(),
            "curve": [[row["samples"], row["best_sim_ms"]] for row in result.curve]}


def measurable(problem: PlacementProblem) -> bool:
    """Virtual CPU devices this host can run side by side: at most one per core."""
    return all(d.is_virtual_cpu for d in problem.cluster.devices) and problem.n_devices <= host_cores()


def calibration_for(name: str, loaded, problem: PlacementProblem, args: argparse.Namespace):
    """The simulator's calibration and the book of what it was fitted to: with --calibrate
    (or --measure-during) and a host that can run the devices, fitted now to the
    heuristics' candidates, measured together; else the one saved for this model and
    devices; else, for NAME@k, the one saved for its workload on two devices (virtual
    CPU devices of one thread each cost alike); else None (nominal). The book is None
    unless measured now."""
    book = fit_baselines(name, loaded, problem, args) if calibrating(problem, args) else None
    calibration = load_calibration(problem)
    if calibration is None and "@" in name:
        calibration = load_calibration(build_problem(PROBLEMS[name][0], devices=devices(2), max_groups=args.max_groups))
    return calibration, book


def calibrating(problem: PlacementProblem, args: argparse.Namespace) -> bool:
    return (args.calibrate or args.measure_during) and measurable(problem)


def fit_baselines(name: str, loaded, problem: PlacementProblem, args: argparse.Namespace) -> MeasurementBook:
    """Measure every heuristic's candidate (the pipeline heuristic's with its micro-batches) in one
    session and save the calibration fitted to them, as `placer optimize` calibrates. Returns
    the book of those measurements."""
    unique = list(dict.fromkeys(heuristics(problem).values()))
    book = MeasurementBook({"ablation": name})
    Measurer(loaded, problem, book, Protocol(cap_s=args.cap_s)).measure(unique, stage=f"calibrating {name}")
    pairs = [(c, m.median_ms) for c, m in book.feasible()]
    if len(pairs) >= 2:
        save_calibration(problem, fit_calibration(problem, [c for c, _ in pairs], [ms for _, ms in pairs]))
    return book


def measuring_scorer(loaded, problem: PlacementProblem, calibration, book: MeasurementBook,
                     args: argparse.Namespace) -> Scorer:
    """A Scorer that measures as `placer optimize`'s searches do (the search's measure_top_k best
    every measure_every rounds, in sessions of at most --search-cap-s seconds a candidate, then a
    refit to every measurement so far), on a copy of `book` (the heuristics' measurements): every
    search starts from the same calibration and measurements."""
    own = MeasurementBook(book.identity)
    own.entries = dict(book.entries)
    measurer = Measurer(loaded, problem, own, Protocol(cap_per_candidate_s=args.search_cap_s))
    return Scorer(problem, measurer, calibration, warn=lambda line: print(f"  warning: {line}", flush=True))


def ablate(name: str, spec: str, device_list: str, args: argparse.Namespace) -> dict:
    loaded = load_workload(spec)
    problem = build_problem(loaded, devices=device_list, max_groups=args.max_groups)
    # As placer optimize does: no micro-batches where they would change the model (batch norm).
    refusal = microbatches_off(loaded, problem)
    calibration, book = calibration_for(name, loaded, problem, args)
    scorer = SimulatedScorer(problem, calibration)
    warm_name, warm, warm_ms = warm_start(problem, scorer, args.interleaved_start)
    # The bound optimize's results.json gives; a cluster the host cannot run is bounded as simulated.
    bound_ms = bounds_of(problem, calibration, on_host=measurable(problem))["lower_bound_ms"]
    exact = optimum(problem, scorer, limit=args.optimum_limit)
    if exact is not None:
        print(f"  {name:20s} optimum        {exact.ms:9.2f} ms of {exact.candidates} candidates", flush=True)
    during = args.measure_during and book is not None
    base = overrides(TrainConfig(budget_s=None, max_samples=args.samples, **({} if during else {"measure_top_k": 0})),
                     args.set)

    def scorer() -> SimulatedScorer | Scorer:
        return measuring_scorer(loaded, problem, calibration, book, args) if during else SimulatedScorer(
            problem, calibration)
    runs = {method: [search(problem, scorer(), method, replace(base, seed=seed), warm, args.measure_top_k)
                     for seed in range(args.seed, args.seed + args.seeds)] for method in args.methods}
    if during:  # each search's refits were cached (as optimize's are): leave the one every search started from
        save_calibration(problem, calibration)
    for method, rows in runs.items():
        times = [r["best_ms"] for r in rows]
        print(f"  {name:20s} {method:14s} best {statistics.mean(times):9.2f} ms (warm {warm_ms:.2f}, "
              f"{', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return {"name": name, "workload": spec, "devices": device_list, "groups": problem.n_groups,
            "calibrated": calibration is not None, "measured_during": during,
            # what every search started from (None: nominal); the profile it applies to is this host's cache
            "calibration": None if calibration is None else calibration.to_json(),
            "warm_start": {"method": warm_name, "ms": warm_ms, "candidate": [list(warm.placement), warm.microbatches]},
            "lower_bound_ms": bound_ms,
            "optimum": None if exact is None else {"ms": exact.ms, "candidates": exact.candidates, "candidate":
                                                    [list(exact.best.placement), exact.best.microbatches]},
            "measurable": measurable(problem), "microbatches_off": refusal, "fingerprint": problem.fingerprint,
            "runs": runs, "problem": problem}


def distinct(shortlists: dict[str, Sequence[Candidate]]) -> tuple[dict[str, Candidate], dict[str, list[str]]]:
    """Each distinct candidate under one label: identical picks are confirmed once and judged "same candidate".

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
    candidates (the run's `top`), then its own choice (the fastest of its closing session, with
    --measure-during) and the warm start, each unless among them; and owner "warm_start"
    -> the warm start alone.

    >>> run = {"top": [[[0, 1], 2, 9.0]], "candidate": [[0, 1], 2]}
    >>> pools({"warm_start": {"candidate": [[0, 0], 1]}, "runs": {"rl": [run]}})["rl/0"]
    [Candidate(placement=(0, 1), microbatches=2), Candidate(placement=(0, 0), microbatches=1)]
    """
    placement, microbatches = entry["warm_start"]["candidate"]
    warm = Candidate(tuple(placement), microbatches)
    shortlists = {"warm_start": [warm]}
    for method, rows in entry["runs"].items():
        for i, row in enumerate(rows):
            chosen = Candidate(tuple(row["candidate"][0]), row["candidate"][1])
            top = [Candidate(tuple(p), m) for p, m, _ in row["top"]]
            shortlists[f"{method}/{i}"] = list(dict.fromkeys([*top, chosen, warm]))
    return shortlists


def pick(labels: Sequence[str], measured: dict, warm: str) -> str | None:
    """The label of `labels` with the lowest feasible median in `measured` (label ->
    Measurement), or `warm` (the warm start's label) where it is among them and not
    measurably slower than that one (placer.choose rule 2: the simpler plan of a tie);
    None when none is feasible."""
    feasible = [label for label in labels if measured[label].feasible]
    best = min(feasible, key=lambda label: measured[label].median_ms, default=None)
    if best is None or best == warm or warm not in feasible:
        return best
    ratio = compare(measured[warm], measured[best], best)
    return warm if ratio is not None and ratio.verdict != "slower" else best


def measure(entry: dict, args: argparse.Namespace) -> None:
    """Measure one problem's shortlists, then confirm each owner's pick (module docstring)."""
    problem, workload = entry.pop("problem"), load_workload(entry["workload"])
    candidates, owners = distinct(pools(entry))
    warm, pooled = owners["warm_start"][0], {owner: listed for owner, listed in owners.items() if owner != "warm_start"}
    selection = {owner: session(entry["name"], workload, problem, f"selection {owner}", args.cap_s,
                                [(label, candidates[label]) for label in listed]) for owner, listed in pooled.items()}
    picks = {"warm_start": warm, **{owner: pick(listed, selection[owner], warm) for owner, listed in pooled.items()}}
    entry["measured"] = {"top_k": args.measure_top_k,
                         "candidates": {label: [list(c.placement), c.microbatches] for label, c in candidates.items()},
                         "shortlists": owners, "picks": picks,
                         "selection": {owner: {label: m.to_json() for label, m in measured.items()}
                                       for owner, measured in selection.items()}}
    confirm(entry, workload, problem, args)


def session(name: str, workload, problem: PlacementProblem, stage: str, cap_s: float,
            entries: Sequence[tuple[str, Candidate]]) -> dict:
    """A fresh interleaved session of unplaced and the (label, candidate) `entries`: label -> Measurement."""
    measurer = Measurer(workload, problem, MeasurementBook({"ablation": name}), Protocol(cap_s=cap_s))
    return measurer.session([(UNPLACED, None), *entries], f"{stage}: {name}")


def confirm(entry: dict, workload, problem: PlacementProblem, args: argparse.Namespace) -> None:
    """Measure each owner's pick, the warm start and unplaced in --confirms fresh sessions,
    each in the reverse order of the one before, and judge RL's picks against the yardsticks'
    of the same seed in every session (`verdict`). Sets entry["measured"]["confirms"] and
    entry["rl_vs"]."""
    measured, seeds = entry["measured"], len(entry["runs"]["rl"]) if "rl" in entry["runs"] else 0
    picks = measured["picks"]
    labels = list(dict.fromkeys(p for p in picks.values() if p is not None))
    entries = [(label, Candidate(tuple(measured["candidates"][label][0]), measured["candidates"][label][1]))
               for label in labels]
    confirms = [session(entry["name"], workload, problem, f"confirm {n + 1}", args.confirm_cap_s,
                        entries if n % 2 == 0 else entries[::-1]) for n in range(args.confirms)]
    measured["confirms"] = [{label: m.to_json() for label, m in c.items()} for c in confirms]
    entry["rl_vs"] = {other: [verdict(confirms, picks[f"rl/{i}"], picks[f"{other}/{i}"], other)
                              for i in range(seeds)]
                      for other in YARDSTICKS if "rl" in entry["runs"] and other in entry["runs"]}


def verdict(confirms: Sequence[dict], mine: str | None, theirs: str | None, name: str) -> dict | None:
    """RL's pick `mine` against a yardstick's pick `theirs` (labels) over the confirm sessions
    (label -> Measurement each): the speedup (geometric mean of the sessions'), the hull of the
    sessions' CIs, and a verdict of "faster" or "slower" only where every session's says so,
    else "tie" (a difference one session sees and another does not is the host's, not the
    plans'); "same candidate" where both picked the same; None where either is infeasible.

    >>> from placer.runtime.timing import Measurement
    >>> fast, slow = Measurement(True, 90.0, times_ms=[90.0] * 9), Measurement(True, 100.0, times_ms=[100.0] * 9)
    >>> verdict([{"a": fast, "b": slow}, {"a": slow, "b": fast}], "a", "b", "b")["verdict"]
    'tie'
    """
    if mine is not None and mine == theirs:
        return {"speedup": 1.0, "ci": None, "verdict": "same candidate"}
    ratios = [None if mine is None or theirs is None else compare(c[mine], c[theirs], name) for c in confirms]
    if not ratios or any(r is None for r in ratios):
        return None
    verdicts = {r.verdict for r in ratios}
    return {"speedup": math.exp(statistics.fmean(math.log(r.value) for r in ratios)),
            "ci": [min(r.ci[0] for r in ratios), max(r.ci[1] for r in ratios)],
            "verdict": verdicts.pop() if len(verdicts) == 1 else "tie",
            "sessions": [{"speedup": r.value, "ci": list(r.ci), "verdict": r.verdict} for r in ratios]}


def reconfirm(path: Path, args: argparse.Namespace, host: dict) -> dict:
    """The results of an earlier measured ablation (`path`, its JSON) with each measured
    problem's picks confirmed again (`confirm`): its `rl_vs` are the new sessions' verdicts,
    the earlier ones kept as `earlier_rl_vs`, the earlier host as `earlier_host`; `host`:
    host_info() as this run started.

    Raises SystemExit when a problem no longer builds as it did (another group count, or
    fingerprint where recorded): its picks would place other groups."""
    started, results = time.perf_counter(), json.loads(path.read_text())
    for entry in results["problems"]:
        if not entry.get("rl_vs"):
            continue
        print(f"{entry['name']}:", flush=True)
        workload = load_workload(entry["workload"])
        problem = build_problem(workload, devices=entry["devices"], max_groups=args.max_groups)
        if problem.n_groups != entry["groups"] or entry.get("fingerprint", problem.fingerprint) != problem.fingerprint:
            raise SystemExit(f"{path}: {entry['name']} builds {problem.n_groups} groups of a model of fingerprint "
                             f"{problem.fingerprint!r} at --max-groups {args.max_groups}; its picks place "
                             f"{entry['groups']} of {entry.get('fingerprint', 'an unrecorded fingerprint')!r}: give "
                             f"the run's --max-groups, and its workload unchanged")
        entry["earlier_rl_vs"] = entry.pop("rl_vs")
        entry["measured"].pop("confirm", None)  # the earlier session (kept in `path`)
        confirm(entry, workload, problem, args)
    return {**results, "host": host, "earlier_host": results["host"], "reconfirmed": str(path),
            "seconds": time.perf_counter() - started}


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
    parser.add_argument("--measure-during", action="store_true",
                        help="the searches measure and refit as placer optimize's do (implies --calibrate; "
                             "quiet host only)")
    parser.add_argument("--search-cap-s", type=float, default=6.0,
                        help="with --measure-during: seconds per candidate of each measurement round "
                             "(placer optimize's --measure-cap)")
    parser.add_argument("--measure-top-k", type=int, default=3,
                        help="with --measure: distinct best simulated candidates measured per method and seed")
    parser.add_argument("--cap-s", type=float, default=120.0,
                        help="seconds of timed rounds of the calibration session and of each selection session "
                             "(one per method and seed)")
    parser.add_argument("--confirm-cap-s", type=float, default=120.0,
                        help="seconds of timed rounds of each confirm session")
    parser.add_argument("--confirms", type=int, default=2,
                        help="confirm sessions, each in the reverse order of the one before; a verdict of faster or "
                             "slower needs every one of them")
    parser.add_argument("--reconfirm", type=Path, metavar="JSON",
                        help="confirm the picks of an earlier measured ablation (its results JSON) again, "
                             "nothing else: writes experiments/results/NAME.{json,md}")
    parser.add_argument("--interleaved-start", action="store_true",
                        help="every search starts from the best of the heuristics and RL's interleaved starts "
                             "(a yardstick given RL's start: is the rest of RL's lead its learning?)")
    parser.add_argument("--quick", action="store_true",
                        help="two small problems, 64 samples, one seed, optima of at most 2^16 candidates")
    parser.add_argument("--name", default="ablation", help="results file name (experiments/results/NAME.{json,md})")
    args = parser.parse_args()
    if args.confirms < 1:
        parser.error(f"--confirms {args.confirms}: give at least 1 (the default 2: verdicts both sessions agree on)")
    if args.reconfirm is not None and not args.reconfirm.is_file():
        parser.error(f"--reconfirm {args.reconfirm}: no such file; give the results JSON of an earlier measured "
                     f"ablation (experiments/results/NAME.json)")
    if args.quick:
        args.problems, args.samples, args.seeds = list(QUICK), 64, 1
        args.optimum_limit = min(args.optimum_limit, QUICK_OPTIMUM_LIMIT)
    torch.set_num_threads(1)  # the policy's tensors are small: more threads only contend
    host = host_info()  # the load as the run starts: is it quiet enough to record?
    if args.reconfirm is not None:
        results = reconfirm(args.reconfirm, args, host)
        record(args.name, results, markdown(results))
        print(markdown(results))
        return

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
