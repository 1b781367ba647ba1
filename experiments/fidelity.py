"""How well the simulator predicts measured step times, before and after calibration,
and which cost is wrong where it does not.

For each zoo model on `--devices`: `--placements` candidates that span what a search
sees (`candidates`), all repaired to keep colocation and memory, each measured through
the measurement protocol (placer.measurements: interleaved rounds, CI of the median)
on the dataflow runtime, and simulated. `--design one` (the default) measures all of
a model's candidates in ONE interleaved session, each timed in every round, for the
time its sessions of `--session` would have had (`--cap-s` each): a drift of the host
slows every candidate alike, so it cannot reorder them, and no anchor is needed.
`--design sessions` (the runs recorded before 2026-12-01 06:00) measures sessions of
`--session` shuffled candidates, each with two anchors (all on the first device; the
simulator's fastest multi-device baseline) that scale its times to a common scale
(`session_scale`). The calibration is fitted on a random third of the candidates and
judged on the other two thirds, against the uncalibrated simulator on the same two
thirds: Spearman rank correlation and median absolute percentage error, on the whole
judged set and on its near-optimal subset (`near_optimal`). Targets (issue 16):
Spearman >= 0.9 and median error <= 10%. `diagnose` says which cost is wrong where
the calibrated simulator misses: the correlation of the log error with each
candidate's crossings, chunks, devices busy at once and micro-batches, and the share
of the error between sessions. `--rescore` scores a recorded run's measurements again
with the current simulator (`--rescale`: how its sessions are put on one scale).
`--estimate blocked` takes each candidate's time relative to the others in the same
rounds (`blocked`) instead of the protocol's median: the host's drift from round to
round, which moves every candidate of a round alike, is taken out of the ranking.
Every row keeps its timed steps (`times_ms`), so a run can be scored either way.

    .venv/bin/python experiments/fidelity.py --size medium            # every zoo model, 36 candidates each
    .venv/bin/python experiments/fidelity.py --quick                  # nmt small, 6 candidates: a check it runs
    .venv/bin/python experiments/fidelity.py --rescore                # fidelity_medium.json scored by today's simulator
    flock /tmp/placer-heavy.lock .venv/bin/python experiments/fidelity.py --size medium --save

Writes experiments/results/fidelity_{size}.{json,md} (fidelity_quick.* with --quick).
One session holds all of a model's candidates at once (each a fresh copy of the model
with its optimizer state: about 3 GB for 36 medium models).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
from placer.book import MeasurementBook
from placer.measurements import Measurer, Protocol
from placer.microbatch_policy import microbatches_off
from placer.rl.starts import interleaved_candidates
from placer.search import microbatch_options

KINDS = ("baseline", "fraction", "near", "crossing", "random", "mixed", "split", "pipelined", "interleaved")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)  # the first device's share of the compute in the "fraction" splits
NEAR = 0.10  # the near-optimal subset: measured within this fraction of the fastest candidate
EVERY_ROUND = 1e-9  # one session's CI target: none is this narrow, so a candidate's steps span the whole session


def candidates(problem: PlacementProblem, count: int, rng: np.random.Generator,
               pipelined: int = 0, interleaved: int = 0) -> list[tuple[str, Candidate]]:
    """`count` distinct (kind, candidate) pairs that span what a search sees, then
    `pipelined` more of kind "pipelined" and `interleaved` more of kind "interleaved"
    where the profile allows: every
    baseline (at most a third of `count`); contiguous splits that give the first
    device FRACTIONS of the compute (the rest shared evenly); then, in turn, "near"
    (the simulator's fastest baseline with 2-10% of its groups moved: what a search
    sees near its end), "crossing" (blocks of 1-4 groups dealt to the devices in
    turn: crossing-heavy), "random", "mixed" (a baseline with 10-50% moved), "split"
    (random contiguous cuts) and "pipelined" (a split or baseline with m > 1, where
    the profile allows); "interleaved": the interleaved stages RL's first round scores
    (placer.rl.starts.interleaved_candidates: several stages a device, m > 1), then
    those with 2-10% of their groups moved, what RL's searches pick from them (s25-s27).
    All repaired to keep colocation and memory."""
    chosen: dict[Candidate, str] = {}
    baselines = list(dict.fromkeys(tuple(p) for p in run_baselines(problem).values()
                                   if not isinstance(p, InfeasibleError)))
    n, k = problem.n_groups, problem.n_devices
    sim = Simulator(problem)
    best = np.asarray(min(baselines, key=lambda p: sim.simulate(p).step_ms))
    piped = [m for m in microbatch_options(problem) if m > 1]
    compute = problem.costs.compute_ms[:, 0]  # on the first device
    middle = (np.cumsum(compute) - compute / 2) / max(float(compute.sum()), 1e-12)  # [groups] share of work before

    def split() -> np.ndarray:
        return np.searchsorted(np.sort(rng.integers(0, n + 1, k - 1)), np.arange(n), side="right")

    def moved(base: np.ndarray, low: float, high: float) -> np.ndarray:
        return np.where(rng.random(n) < rng.uniform(low, high), rng.integers(0, k, n), base)

    fixed = [("baseline", np.asarray(p), 1) for p in baselines[:max(1, count // 3)]]
    if k > 1:
        fixed += [("fraction", np.searchsorted(f + (1 - f) * np.arange(k - 1) / (k - 1), middle, side="right"), 1)
                  for f in FRACTIONS]
    makers = {
        "near": lambda: (moved(best, 0.02, 0.1), 1),
        "crossing": lambda: ((np.arange(n) // rng.integers(1, 5) + rng.integers(k)) % k, 1),
        "random": lambda: (rng.integers(0, k, n), 1),
        "mixed": lambda: (moved(np.asarray(baselines[rng.integers(len(baselines))]), 0.1, 0.5), 1),
        "split": lambda: (split(), 1),
        "pipelined": lambda: (split() if rng.random() < 0.7 else np.asarray(baselines[rng.integers(len(baselines))]),
                              int(rng.choice(piped))),
    }
    kinds = [kind for kind in makers if kind != "pipelined" or piped]

    def draw(i: int) -> tuple[str, np.ndarray, int]:
        if len(chosen) >= count:
            return ("pipelined", *makers["pipelined"]())
        if i < len(fixed):
            return fixed[i]
        return (kind := kinds[(i - len(fixed)) % len(kinds)], *makers[kind]())

    def add(kind: str, placement: np.ndarray, m: int) -> None:
        with contextlib.suppress(InfeasibleError):
            candidate = Candidate(repair(problem, placement), m)
            if not problem.violations(candidate.placement, m):  # m micro-batches in flight need more memory
                chosen.setdefault(candidate, kind)

    total = count + (pipelined if piped else 0)
    for attempt in itertools.takewhile(lambda _: len(chosen) < total, range(50 * total)):
        add(*draw(attempt))
    stages = interleaved_candidates(problem, microbatch_options(problem)) if interleaved else []
    total = len(chosen) + (interleaved if stages else 0)
    for attempt in itertools.takewhile(lambda _: len(chosen) < total, range(50 * max(interleaved, 1))):
        start = stages[attempt % len(stages)]
        placement = np.asarray(start.placement)
        add("interleaved", placement if attempt < len(stages) else moved(placement, 0.02, 0.1), start.microbatches)
    return [(kind, c) for c, kind in chosen.items()]


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
    """Measure and score one zoo model's candidates (module doc); the model's results dict."""
    spec = f"zoo:{name}:{args.size}"
    problem = build_problem(spec, devices=args.devices, max_groups=args.max_groups)
    workload = load_workload(spec)
    microbatches_off(workload, problem)  # batch norm: no pipelined candidates, which the runtime would refuse
    rng = np.random.default_rng(args.seed)
    chosen = candidates(problem, args.placements, rng, args.pipelined, args.interleaved)
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]  # no kind gathered in one session
    one = args.design == "one"
    blocks = math.ceil(len(chosen) / args.session)  # the sessions design's count: one session has their time
    protocol = Protocol(target=EVERY_ROUND if one else args.target, cap_s=args.cap_s * (blocks if one else 1),
                        warmup=args.warmup)
    measurer = Measurer(workload, problem, MeasurementBook({"fidelity": spec, "devices": args.devices}), protocol)
    anchors = {} if one else {"anchor": Candidate((0,) * problem.n_groups), "anchor2": spread_anchor(problem)}
    size = len(chosen) if one else args.session
    rows, anchor_ms = [], {label: [] for label in anchors}
    for start in range(0, len(chosen), size):
        batch = chosen[start:start + size]
        entries = [(str(i), c) for i, (_, c) in enumerate(batch)] + [(k, c) for k, c in anchors.items() if c]
        session = measurer.session(entries, "fidelity")
        for label in anchors:
            m = session.get(label)
            anchor_ms[label].append(m.median_ms if m is not None and m.feasible else float("nan"))
        for i, (kind, candidate) in enumerate(batch):
            m = session[str(i)]
            rows.append({"kind": kind, "placement": list(candidate.placement), "microbatches": candidate.microbatches,
                         "session": start // size, "feasible": bool(m.feasible),
                         "raw_ms": m.median_ms if m.feasible else None,
                         "raw_ci_ms": list(m.ci_ms) if m.feasible and m.ci_ms else None, "reason": m.reason or "",
                         "times_ms": list(m.times_ms) if m.feasible else None})
            outcome = f"{m.median_ms:8.2f} ms" if m.feasible else f"infeasible: {m.reason}"
            print(f"  {spec} {len(rows):3d} {kind:9s} m={candidate.microbatches} {outcome}", flush=True)
        if anchors:
            print(f"  {spec} anchors: all on {problem.cluster.names[0]} {anchor_ms['anchor'][-1]:8.2f} ms, "
                  f"spread {anchor_ms['anchor2'][-1]:8.2f} ms", flush=True)
    for r in rows:
        spread = len(set(r["placement"])) > 1 and anchors.get("anchor2") is not None
        scale = session_scale(anchor_ms["anchor2" if spread else "anchor"], r["session"]) if anchors else 1.0
        r["measured_ms"] = r["raw_ms"] * scale if r["feasible"] else None
        r["ci_ms"] = [x * scale for x in r["raw_ci_ms"]] if r["raw_ci_ms"] else None
    if args.estimate == "blocked":
        blocked(rows)
    measured_rows = [r for r in rows if r["feasible"]]
    order = rng.permutation(len(measured_rows))
    for i in order[:max(3, len(order) // 3)]:
        measured_rows[i]["fit"] = True
    scores = score(problem, rows)
    if args.save and len(measured_rows) >= 3:
        fitted = fit_calibration(problem, [Candidate(tuple(r["placement"]), r["microbatches"]) for r in measured_rows],
                                 [r["measured_ms"] for r in measured_rows])
        print(f"  saved the calibration fitted on all {len(measured_rows)} measurements to "
              f"{save_calibration(problem, fitted)}")
    return {"workload": spec, "groups": problem.n_groups, "max_groups": args.max_groups, "placements": len(rows),
            "anchor_ms": anchor_ms.get("anchor", []), "anchor2_ms": anchor_ms.get("anchor2", []),
            "anchor2": list(anchors["anchor2"].placement) if anchors.get("anchor2") else None, "cap_s": protocol.cap_s,
            **scores, "rows": rows}


def spread_anchor(problem: PlacementProblem) -> Candidate | None:
    """The second anchor: of the baselines that use more than one device, the one the
    simulator finds fastest; None where there is none."""
    spread = [tuple(p) for p in run_baselines(problem).values()
              if not isinstance(p, InfeasibleError) and len(set(p)) > 1]
    sim = Simulator(problem)
    return Candidate(min(spread, key=lambda p: sim.simulate(p).step_ms)) if spread else None


def blocked(rows: list[dict], draws: int = 1000, seed: int = 0) -> None:
    """Set each feasible row's "measured_ms" and "ci_ms" (ms) to its step time with the
    host's drift between rounds taken out (`--estimate blocked`). The rows of each session
    hold "times_ms", one step a round, in the order of the rounds (the one design times
    every candidate in every round); rounds that some row lacks are left out.

    The rounds are the blocks of a randomized complete block design (R. A. Fisher, The
    Design of Experiments, 1935; D. C. Montgomery, Design and Analysis of Experiments,
    ch. 4): log t[c, r] minus the mean over the candidates of log t[., r] is candidate c's
    time relative to round r, free of whatever slowed or sped the host for that whole
    round (this host's speed wanders by 10-20% over minutes). A candidate's estimate is
    the median of those over the rounds, put back in ms at the session's geometric mean
    step. Its CI (95%, percentile) resamples whole rounds (`draws` times, seeded) with the
    level held: it says how well the candidates are told apart, not how fast the host ran.
    """
    rng = np.random.default_rng(seed)
    for session in {r["session"] for r in rows if r["feasible"]}:
        mine = [r for r in rows if r["feasible"] and r["session"] == session]
        rounds = min(len(r["times_ms"]) for r in mine)
        log_t = np.log([r["times_ms"][:rounds] for r in mine])  # [candidates, rounds]
        level = float(log_t.mean())
        relative = log_t - log_t.mean(axis=0)
        estimate = np.median(relative, axis=1)
        again = np.median(relative[:, rng.integers(0, rounds, (draws, rounds))], axis=2)  # [candidates, draws]
        low, high = np.percentile(again, [2.5, 97.5], axis=1)
        for r, e, lo, hi in zip(mine, estimate, low, high):
            r["measured_ms"] = math.exp(level + e)
            r["ci_ms"] = [math.exp(level + lo), math.exp(level + hi)]


def session_scale(anchor_ms: list[float], session: int) -> float:
    """The factor that puts a time of `session` on the common scale: the anchors'
    median over sessions / this session's anchor (1 where either is unknown).

    Drift between sessions (this host's speed wanders by 10-20% over minutes) would
    set candidates of different sessions apart (the sessions design only). Each time is
    scaled by one anchor measured with it, whose own noise (5-10%) it then carries: on
    the 04:31 run the second anchor's made inception_v3's ranking (`rescore`)."""
    known = [a for a in anchor_ms if np.isfinite(a)]
    factor = float(np.median(known)) / anchor_ms[session] if known else math.nan
    return factor if math.isfinite(factor) else 1.0


def score(problem: PlacementProblem, rows: list[dict]) -> dict:
    """Simulate the measured rows (dicts with "placement", "microbatches", "feasible",
    "measured_ms", and "fit": True on the calibration third) before and after a
    calibration fitted on the fit third's rows (pipelined ones included), with the current
    simulator; writes each row's "simulated_ms" and "calibrated_ms" and returns the
    model's counts, the judged third's Spearman and median error before and after,
    the diagnosis and both calibrations."""
    measured_rows = [r for r in rows if r["feasible"]]
    measured = np.array([r["measured_ms"] for r in measured_rows])
    pairs = [Candidate(tuple(r["placement"]), r["microbatches"]) for r in measured_rows]
    fit_idx = [i for i, r in enumerate(measured_rows) if r.get("fit")]
    test_idx = [i for i, r in enumerate(measured_rows) if not r.get("fit")]
    before = Simulator(problem)
    calibration = fit_calibration(problem, [pairs[i] for i in fit_idx], measured[fit_idx])
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
        "span": {"measured": float(measured.max() / measured.min()) if len(measured) else None,
                 "simulated": float(sim_before.max() / sim_before.min()) if len(measured) else None},
        "near_optimal": near_optimal([measured_rows[i] for i in test_idx], float(measured.min(initial=math.inf))),
        "diagnosis": diagnose(problem, [measured_rows[i] for i in test_idx]),
        "calibration": {"initial": Calibration.default(problem.cluster).to_json(), "fitted": calibration.to_json()},
    }


def near_optimal(judged: list[dict], best_ms: float) -> dict:
    """The judged rows measured within NEAR of `best_ms` (the fastest measured candidate,
    judged or not): how many, the calibrated simulator's Spearman on them and their noise
    ceiling. What a search needs at its end is the order among good plans, which a set
    spanning slow ones can hide."""
    near = [r for r in judged if r["measured_ms"] <= (1 + NEAR) * best_ms]
    calibrated, measured = (np.array([r[k] for r in near]) for k in ("calibrated_ms", "measured_ms"))
    return {"judged": len(near), "spearman": spearman(calibrated, measured), "noise_ceiling": noise_ceiling(near)}


def rescore(results: dict, rescale: str = "recorded", estimate: str = "median") -> dict:
    """`results` (a fidelity JSON) with every model scored again by `score`: the same
    measurements and fit/judge split, the current simulator and calibration fit. The
    problems are built again from the spec, devices and max_groups (256 where a run
    did not record it); the profile comes from the cache, so it is the run's own only
    where the cache still holds it (each row's "simulated_ms" is kept as
    "recorded_simulated_ms" so that a changed profile shows).

    `rescale` puts the sessions' raw medians on one scale again: "recorded" keeps the
    run's scaling, "first" scales every row by its session's one-device anchor alone,
    "none" takes the raw medians. (On the 04:31 run one noisy measurement of the second
    anchor scaled all of its session's multi-device plans: inception_v3's Spearman
    0.08 with both anchors, 0.67 with the first alone, 0.53 unscaled.)

    `estimate` "blocked" replaces the medians by `blocked`'s estimates from each row's
    "times_ms" (runs recorded before 2026-12-02 08:00 UTC kept no steps: ValueError)."""
    models = []
    for model in results["models"]:
        problem = build_problem(model["workload"], devices=results["devices"], max_groups=model.get("max_groups", 256))
        rows = [dict(r) for r in model["rows"]]
        for r in rows:
            if r["feasible"]:
                r.setdefault("recorded_simulated_ms", r["simulated_ms"])
                if rescale != "recorded":
                    factor = session_scale(model["anchor_ms"], r["session"]) if rescale == "first" else 1.0
                    r["measured_ms"] = r["raw_ms"] * factor
                    r["ci_ms"] = [x * factor for x in r["raw_ci_ms"]] if r["raw_ci_ms"] else None
        if estimate == "blocked":
            if results.get("design") != "one":
                raise ValueError(f"{model['workload']}: the run is of the sessions design, whose anchors put the "
                                 "sessions on one scale; --estimate blocked needs one session of every candidate")
            if any(r["feasible"] and not r.get("times_ms") for r in rows):
                raise ValueError(f"{model['workload']}: the run kept no timed steps (times_ms); --estimate blocked "
                                 "needs a run recorded since 2026-12-02")
            blocked(rows)
        models.append({**model, **score(problem, rows), "rows": rows})
    return {**results, "models": models, "rescored": host_info()["date"], "rescale": rescale, "estimate": estimate}


def cell(value: float | None) -> str:
    """A table cell of a number that JSON may have turned into None (NaN): "-"."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def markdown(results: dict) -> str:
    host = results["host"]
    rescale = {"first": " Every session's times scaled by its one-device anchor alone (`--rescale first`).",
               "none": " The sessions' raw medians, unscaled (`--rescale none`)."}.get(results.get("rescale"), "")
    rescored = (f" Scored again ({results['rescored']}, `--rescore`) by the simulator and calibration fit of that "
                f"date: same measurements, same split.{rescale}" if results.get("rescored") else "")
    anchors = ("two anchors (all on the first device, for one-device candidates; the simulator's fastest "
               "multi-device baseline, for the others)" if any(m.get("anchor2") for m in results["models"])
               else "an anchor (all on the first device)")
    design = (f"all of a model's candidates in one interleaved session, which the host's drift between sessions cannot "
              f"reorder, each timed in every round, {results['cap_s']:.0f} s of timed rounds per {results['session']} "
              "candidates" if results.get("design") == "one" else
              f"interleaved sessions of {results['session']} candidates and {anchors}, by which every time is put on "
              f"one scale, CI half-width target {100 * results['target']:.0f}%, at most {results['cap_s']:.0f} s of "
              "timed rounds per session")
    estimate = (" Each candidate's time is its median relative to the others timed in the same rounds (`--estimate "
                "blocked`: the host's drift between rounds taken out), its CI from resampled rounds."
                if results.get("estimate") == "blocked" else "")
    lines = [f"# Simulator fidelity ({host['date']})", "",
             f"Devices `{results['devices']}`; each candidate measured by the protocol ({design}). Calibration "
             "fitted on a random third of each "
             "model's candidates; both columns judged on the other two thirds. Targets: Spearman >= 0.9, median "
             "error <= 10%. Noise ceiling: the Spearman a perfect simulator could expect against measurements "
             f"this noisy (`noise_ceiling`).{estimate}{rescored}", "",
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
    lines += ["", f"The candidates' spread (slowest / fastest) and the near-optimal subset: judged candidates "
              f"measured within {100 * NEAR:.0f}% of the fastest:", "",
              "| model | measured spread | simulated spread | near-optimal judged | Spearman after | noise ceiling |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in results["models"]:
        span, near = m.get("span"), m.get("near_optimal")
        if span and near:
            lines.append(f"| {m['workload']} | {cell(span['measured'])} | {cell(span['simulated'])} | {near['judged']} | "
                         f"{cell(near['spearman'])} | {cell(near['noise_ceiling'])} |")
    counts = list(results["models"][0]["diagnosis"]) if results["models"] else []
    lines += ["", "What the calibrated simulator's remaining error follows (Spearman of log(measured / simulated) "
              "with each count, over the judged candidates; session_share: the share of its variance between "
              "measurement sessions, about (sessions - 1) / (candidates - 1) by chance):", "",
              "| model | " + " | ".join(counts) + " |", "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for m in results["models"]:
        lines.append(f"| {m['workload']} | " + " | ".join(cell(m["diagnosis"][c]) for c in counts) + " |")
    lines += ["", "Each kind of judged candidate: bias, the median of log(measured / calibrated) (positive: "
              "the simulator was too fast on these), and median error:", "",
              "| model | kind | judged | bias | median error |", "| --- | --- | ---: | ---: | ---: |"]
    for m in results["models"]:
        judged = [r for r in m["rows"] if r["feasible"] and not r.get("fit")]
        for kind in (k for k in KINDS if any(r.get("kind") == k for r in judged)):
            ratios = np.array([r["measured_ms"] / r["calibrated_ms"] for r in judged if r.get("kind") == kind])
            lines.append(f"| {m['workload']} | {kind} | {len(ratios)} | {float(np.median(np.log(ratios))):+.3f} | "
                         f"{100 * float(np.median(np.abs(1 / ratios - 1))):.1f}% |")
    return "\n".join(lines + ["", *host_lines(host)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--size", default="medium", choices=["small", "medium"], help="zoo size")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--placements", type=int, default=36)
    parser.add_argument("--pipelined", type=int, default=0,
                        help="this many pipelined candidates more (where the model may run micro-batches)")
    parser.add_argument("--interleaved", type=int, default=0,
                        help="this many interleaved-stage candidates more, and near them (where it may)")
    parser.add_argument("--session", type=int, default=6, help="candidates measured together, interleaved")
    parser.add_argument("--target", type=float, default=0.03, help="CI half-width target, relative (sessions)")
    parser.add_argument("--cap-s", type=float, default=60.0, help="seconds of timed rounds per session")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-groups", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="save each model's calibration (fit on all candidates)")
    parser.add_argument("--quick", action="store_true", help="nmt small, 6 candidates, short sessions: a check it runs")
    parser.add_argument("--name", help="results file stem (default fidelity_SIZE, fidelity_quick with --quick)")
    parser.add_argument("--rewrite", action="store_true", help="measure nothing: rewrite NAME.md from NAME.json")
    parser.add_argument("--design", default="one", choices=["one", "sessions"],
                        help="one: all of a model's candidates in one interleaved session with the time of the "
                             "sessions it replaces (cap-s per SESSION candidates); sessions: sessions of SESSION "
                             "candidates put on one scale by their anchors")
    parser.add_argument("--rescale", default="recorded", choices=["recorded", "first", "none"],
                        help="with --rescore: the recorded sessions' scaling, the first anchor's alone, or none")
    parser.add_argument("--estimate", default="median", choices=["median", "blocked"],
                        help="a candidate's time: the protocol's median, or its median relative to the others in the "
                             "same rounds (the one design only; with --rescore, runs that kept their steps)")
    parser.add_argument("--rescore", action="store_true",
                        help="measure nothing: score NAME.json's measurements again with the current simulator and "
                             "calibration fit (same fit/judge split), into NAME_rescored.{json,md}")
    args = parser.parse_args()
    if args.estimate == "blocked" and args.design != "one" and not args.rescore:
        parser.error("--estimate blocked needs --design one: its rounds must hold every candidate")
    if args.rewrite or args.rescore:
        stem = args.name or f"fidelity_{args.size}"
        results = json.loads((RESULTS / f"{stem}.json").read_text())
        if args.rescore:
            suffix = ("" if args.rescale == "recorded" else f"_{args.rescale}") + (
                "_blocked" if args.estimate == "blocked" else "")
            results, stem = rescore(results, args.rescale, args.estimate), f"{stem}_rescored{suffix}"
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
        results = {"host": host, "devices": args.devices, "size": args.size, "design": args.design,
                   "session": args.session, "estimate": args.estimate,
                   "target": args.target, "cap_s": args.cap_s, "seed": args.seed,
                   "seconds": time.perf_counter() - started, "models": models}
        paths = record(stem, results, markdown(results))  # after each model: a cut run keeps what it measured
        print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
