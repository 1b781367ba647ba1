"""Does compute overlapped across devices cost more than the simulator says (contention
between virtual CPU devices on one memory bus, issue 16 item 4)? Offline, on a recorded
`fidelity.py` run: no timing.

For each feasible candidate of `--model`: the calibration fitted on ALL candidates
(in-sample, the best the simulator's own parameters can do), then one more term, c ms
added per ms during which both devices compute at once (from the simulated timeline),
fitted by least squares on the calibrated residual: in-sample and in 3 folds (fit on
two, judged on the third). Also the residual's spread against the measurements' CI.
Rebuilds the problem from the profile cache: run it where the recorded run's profile
is cached (its commit's cache version), else the model is profiled again and the
simulated times move.

    .venv/bin/python experiments/fidelity_overlap.py experiments/results/fidelity_medium_long.json --model inception
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import spearmanr

from envs.calibrate import fit_calibration
from envs.sim import Simulator
from graphs.problem import build_problem


def both_busy_ms(sim: Simulator, placement: list[int]) -> float:
    """Simulated ms during which the first two devices both compute (forward or backward)."""
    first_two = sim.problem.cluster.names[:2]
    spans: dict[str, list[list[float]]] = {name: [] for name in first_two}
    for event in sim.simulate(placement, timeline=True).timeline:
        if event["kind"] in ("fwd", "bwd") and event["device"] in spans:
            spans[event["device"]].append([event["start_ms"], event["end_ms"]])
    merged = []
    for device in first_two:
        out: list[list[float]] = []
        for start, end in sorted(spans[device]):
            if out and start <= out[-1][1]:
                out[-1][1] = max(out[-1][1], end)
            else:
                out.append([start, end])
        merged.append(out)
    a, b, i, j, total = merged[0], merged[1], 0, 0, 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        i, j = (i + 1, j) if a[i][1] < b[j][1] else (i, j + 1)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a fidelity.py results JSON")
    parser.add_argument("--model", default="inception", help="a part of the zoo spec, e.g. inception")
    args = parser.parse_args()
    run = json.load(open(args.results))
    record = next(m for m in run["models"] if args.model in m["workload"])
    problem = build_problem(record["workload"], devices=run["devices"], max_groups=record.get("max_groups", 256))
    rows = [r for r in record["rows"] if r["feasible"] and r["microbatches"] == 1]
    placements = [r["placement"] for r in rows]
    measured = np.array([r["measured_ms"] for r in rows])
    same = np.allclose([Simulator(problem).simulate(p).step_ms for p in placements], [r["simulated_ms"] for r in rows])
    calibrated = Simulator(problem, fit_calibration(problem, placements, measured))
    simulated = np.array([calibrated.simulate(p).step_ms for p in placements])
    overlap = np.array([both_busy_ms(calibrated, p) for p in placements])
    residual = measured - simulated
    c = float(overlap @ residual / (overlap @ overlap))
    halfwidth = np.median([(r["ci_ms"][1] - r["ci_ms"][0]) / 2 / r["measured_ms"] for r in rows])
    print(f"{record['workload']}: {len(rows)} candidates; recorded simulated times reproduced: {same}")
    print(f"in-sample Spearman, calibrated on all: {spearmanr(simulated, measured).statistic:.2f}; with "
          f"c = {c:.3f} ms per ms of overlap: {spearmanr(simulated + c * overlap, measured).statistic:.2f}")
    print(f"residual sd {np.log(measured / simulated).std():.1%} against a median CI half-width of {halfwidth:.1%}")
    folds = np.array_split(np.random.default_rng(0).permutation(len(rows)), 3)
    for k, judged in enumerate(folds):
        fit = np.concatenate([f for i, f in enumerate(folds) if i != k])
        ck = float(overlap[fit] @ residual[fit] / (overlap[fit] @ overlap[fit]))
        print(f"fold {k}: c {ck:.3f}; judged Spearman {spearmanr(simulated[judged], measured[judged]).statistic:.2f} "
              f"-> {spearmanr(simulated[judged] + ck * overlap[judged], measured[judged]).statistic:.2f}")


if __name__ == "__main__":
    main()
