"""How much does a step slow the step timed right after it, and how long a pause undoes that?

The eager model (`unplaced`) runs torch's intra-op threads on every core; after its step
they keep spinning for a while. A placed candidate timed right after it shares the cores
with them. This times a two-device placement (the workload's expert placement) right
after a step of `unplaced` and right after a step of everything on cpu:0 (one thread),
with an untimed pause of each of `--pauses` milliseconds between the two steps, all
interleaved (predecessors and pauses in turn, `--reps` times), and reports per pause the
ratio of the placement's median step after unplaced over its median after the one-thread
step, with a bootstrap CI (placer.measurements.compare). 1.00: no carry-over.
placer.measurements.Protocol.pause_ms is chosen from this.

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_carryover.py

Writes experiments/results/carryover.{json,md}; quiet host only (the load at the start is recorded).
"""

from __future__ import annotations

import argparse
import time

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="zoo:transformer:small")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.0, 2.0, 5.0, 10.0, 20.0], help="ms")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    from graphs.problem import Candidate, build_problem
    from graphs.workload import load_workload
    from placer.baselines import run_baselines
    from placer.book import MeasurementBook
    from placer.measurements import Measurer, Protocol, compare
    from placer.runtime.stats import summarize

    host = host_info()
    workload = load_workload(args.workload)
    problem = build_problem(workload, args.devices)
    measurer = Measurer(workload, problem, MeasurementBook({}), Protocol())
    before = {"unplaced": measurer.trial(None, "unplaced"),
              "one thread": measurer.trial(Candidate((0,) * problem.n_groups), "one thread")}
    placed = measurer.trial(Candidate(tuple(run_baselines(problem, ["expert"])["expert"])), "placed")
    trials = [*before.values(), placed]
    failed = [t.label for t in trials if t.open() is not None]
    if failed:
        raise SystemExit(f"could not run: {', '.join(failed)}")
    times = {(p, name): [] for p in args.pauses for name in before}  # the placement's step (ms)
    for rep in range(args.reps):
        for p in args.pauses if rep % 2 == 0 else args.pauses[::-1]:
            for name in (before if rep % 2 == 0 else list(before)[::-1]):
                before[name].step()
                time.sleep(p / 1e3)
                times[p, name].append(placed.step())
    for t in trials:
        t.close()
    rows = []
    for p in args.pauses:
        after_eager, after_one = (summarize(times[p, name]) for name in before)
        ratio = compare(after_one, after_eager, "after unplaced")  # > 1: slower after unplaced
        rows.append({"pause_ms": p, "after_unplaced_ms": after_eager.median_ms, "after_one_thread_ms": after_one.median_ms,
                     "slowdown": ratio.to_json()})
    results = {"host": host, "workload": args.workload, "devices": args.devices, "reps": args.reps, "rows": rows,
               "times_ms": [{"pause_ms": p, "before": name, "times_ms": t} for (p, name), t in times.items()]}
    lines = [f"# Carry-over from the step before ({host['date']})", "",
             f"`{args.workload}`, its expert placement on `{args.devices}`, timed right after a step of unplaced "
             f"(every core's intra-op threads) or of everything on cpu:0 (one thread), with an untimed pause between; "
             f"{args.reps} steps each, interleaved.", "",
             "| pause (ms) | after unplaced (ms) | after one thread (ms) | slowdown after unplaced (95% CI) |",
             "| ---: | ---: | ---: | --- |"]
    for r in rows:
        s = r["slowdown"]
        lines.append(f"| {r['pause_ms']:g} | {r['after_unplaced_ms']:.2f} | {r['after_one_thread_ms']:.2f} | "
                     f"{s['value']:.3f} ({s['ci'][0]:.3f}-{s['ci'][1]:.3f}) |")
    print(f"wrote {record('carryover', results, chr(10).join(lines + ['', *host_lines(host)]))[1]}")


if __name__ == "__main__":
    main()
