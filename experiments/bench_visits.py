"""Is a step right after another model's step noisier than the next one of the same model?

The protocol (placer.measurements.run_session) times one step of each candidate per
round, so every timed step follows another model's step. A user's training loop runs
one model's steps back to back. This times unplaced and a workload's distinct
baselines in rounds where each candidate runs `--visit` steps in a row, and reports by
the step's position in its visit (1: right after another model): the median time
relative to the candidate's median, and the spread of the steps around their
candidate's median (sd of the log), over every candidate.

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_visits.py --workload zoo:nmt:medium

Writes experiments/results/visits.{json,md}; quiet host only (the load at the start is recorded).
"""

from __future__ import annotations

import argparse

import numpy as np

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="zoo:nmt:medium")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--candidates", type=int, default=5, help="distinct baselines (unplaced is added)")
    parser.add_argument("--visit", type=int, default=3, help="steps of a candidate in a row, per round")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    from graphs.errors import InfeasibleError
    from graphs.problem import Candidate, build_problem
    from graphs.workload import load_workload
    from placer.baselines import run_baselines
    from placer.book import MeasurementBook
    from placer.measurements import Measurer, Protocol

    host = host_info()
    workload = load_workload(args.workload)
    problem = build_problem(workload, args.devices)
    baselines = {}
    for name, p in run_baselines(problem).items():
        if not isinstance(p, InfeasibleError) and tuple(p) not in baselines.values():
            baselines[name] = tuple(p)
    measurer = Measurer(workload, problem, MeasurementBook({}), Protocol())
    trials = [measurer.trial(None, "unplaced")] + [measurer.trial(Candidate(p), name) for name, p in
                                                    list(baselines.items())[:args.candidates]]
    trials = [t for t in trials if t.open() is None]
    times = np.full((len(trials), args.rounds, args.visit), np.nan)  # [candidate, round, position] ms
    for r in range(args.rounds):
        for i in (range(len(trials)) if r % 2 == 0 else reversed(range(len(trials)))):
            for k in range(args.visit):
                times[i, r, k] = trials[i].step()
        print(f"round {r + 1}/{args.rounds}", flush=True)
    for t in trials:
        t.close()
    log_rel = np.log(times) - np.log(np.nanmedian(times, axis=(1, 2)))[:, None, None]
    positions = [{"position": k + 1, "median_rel": float(np.exp(np.nanmedian(log_rel[:, :, k]))),
                  "sd_log": float(np.nanstd(log_rel[:, :, k] - np.nanmedian(log_rel[:, :, k], axis=1)[:, None]))}
                 for k in range(args.visit)]
    results = {"host": host, "workload": args.workload, "devices": args.devices, "visit": args.visit,
               "rounds": args.rounds, "candidates": [t.label for t in trials], "positions": positions,
               "times_ms": times.tolist()}
    lines = [f"# Steps by their position in a visit ({host['date']})", "",
             f"`{args.workload}` on `{args.devices}`: {', '.join(results['candidates'])}; {args.rounds} rounds in "
             f"alternating order, each candidate {args.visit} steps in a row per round. Position 1 follows another "
             "model's step.", "", "| position | median / candidate's median | sd of log(step / position's median) |",
             "| ---: | ---: | ---: |"]
    lines += [f"| {p['position']} | {p['median_rel']:.3f} | {p['sd_log']:.3f} |" for p in positions]
    print(f"wrote {record('visits', results, chr(10).join(lines + ['', *host_lines(host)]))[1]}")


if __name__ == "__main__":
    main()
