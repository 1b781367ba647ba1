"""How noisy is the measurement protocol on this host? (issue 14)

For each workload, R independent interleaved sessions (placer.measurements.run_session)
each time the same four candidates together:

  unplaced        the eager model on the whole host (what a user runs without placer)
  placed          a two-device placement (the workload's expert placement)
  placed (copy)   the same placement again: any difference from `placed` is position or drift
  single          everything on cpu:0 through placer's runtime

and records, per candidate: the median step time, IQR/median, the CI half-width the
protocol reached (relative to the median, target 3%), the timed steps it took, and
across the R sessions the spread of the medians ((max - min) / mean). The ratio of
`placed` over its copy, with its CI, says whether two identical placements tie: paired
by their session (placer.measurements.compare, as every comparison of one session is),
and unpaired (each sample resampled on its own, as before 2026-12-02).

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_noise.py      # the record: quiet host only
    .venv/bin/python experiments/bench_noise.py --quick                           # a check that it runs

Writes experiments/results/NAME.{json,md} (`--name`, default noise; noise_quick.* with --quick); the host's
load at the start is recorded, and a run that did not start quiet says so.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from _record import RESULTS, host_info, host_lines, record  # this folder is on sys.path when run as a script

WORKLOADS = ("zoo:nmt:medium", "zoo:transformer:medium", "zoo:inception_v3:medium")
DEVICES = "cpu:0,cpu:1"
CANDIDATES = ("unplaced", "placed", "placed (copy)", "single")


def measure_workload(spec: str, sessions: int, protocol) -> dict:
    """R sessions of the four candidates of one workload; per-session rows and the summary."""
    from graphs.problem import Candidate, build_problem
    from graphs.workload import load_workload
    from placer.baselines import run_baselines
    from placer.book import MeasurementBook
    from placer.measurements import Measurer, compare, run_session

    loaded = load_workload(spec)
    problem = build_problem(loaded, DEVICES)
    expert = run_baselines(problem, ["expert"])["expert"]
    measurer = Measurer(loaded, problem, MeasurementBook({}), protocol)
    runs = []
    for s in range(sessions):
        trials = [measurer.trial(None, "unplaced"), measurer.trial(Candidate(tuple(expert)), "placed"),
                  measurer.trial(Candidate(tuple(expert)), "placed (copy)"),
                  measurer.trial(Candidate((0,) * problem.n_groups), "single")]
        if s % 2:  # alternate which copy goes first, so that neither always leads a round
            trials[1], trials[2] = trials[2], trials[1]
        measured = {t.label: m for t, m in zip(trials, run_session(trials, protocol))}
        copy = compare(measured["placed"], measured["placed (copy)"], "placed (copy)")
        apart = compare(replace(measured["placed"], session=None), measured["placed (copy)"], "placed (copy)")
        runs.append({"session": s, "copy_ratio": copy.to_json() if copy else None,
                     "copy_ratio_unpaired": apart.to_json() if apart else None,
                     **{label: {"median_ms": m.median_ms, "iqr_rel": m.iqr_ms / m.median_ms if m.feasible else None,
                                "ci_halfwidth_rel": m.ci_halfwidth, "runs": m.runs, "feasible": m.feasible,
                                "reason": m.reason} for label, m in measured.items()}})
        print(f"[noise] {spec} session {s + 1}/{sessions}: " + ", ".join(
            f"{label} {runs[-1][label]['median_ms']:.1f} ms" for label in CANDIDATES
            if runs[-1][label]["median_ms"] is not None), flush=True)
    summary = {}
    for label in CANDIDATES:
        rows = [r[label] for r in runs if r[label]["feasible"]]
        medians = [r["median_ms"] for r in rows]
        summary[label] = {
            "median_ms": statistics.median(medians) if medians else None,
            "iqr_rel": statistics.median(r["iqr_rel"] for r in rows) if rows else None,
            "ci_halfwidth_rel": statistics.median(r["ci_halfwidth_rel"] for r in rows) if rows else None,
            "runs": statistics.median(r["runs"] for r in rows) if rows else None,
            "spread_of_medians": (max(medians) - min(medians)) / statistics.mean(medians) if len(medians) > 1 else None,
        }
    ties = {key: sum(1 for r in runs if r[key] and r[key]["verdict"] == "tie")
            for key in ("copy_ratio", "copy_ratio_unpaired")}
    return {"workload": spec, "groups": problem.n_groups, "sessions": runs, "summary": summary,
            "identical_placements_tie": f"{ties['copy_ratio']}/{len(runs)}",
            "identical_placements_tie_unpaired": f"{ties['copy_ratio_unpaired']}/{len(runs)}"}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def to_markdown(results: dict) -> str:
    protocol = results["protocol"]
    lines = ["# Noise of the measurement protocol", "",
             f"Each workload: {results['sessions']} independent sessions, each measuring unplaced (eager, the whole "
             f"host), a two-device placement ({DEVICES}, the expert placement), the same placement again, and "
             "everything on cpu:0, interleaved by the protocol (placer.measurements.run_session) until each "
             "median's confidence interval was "
             f"within {protocol['target']:.0%} (at least {protocol['min_runs']} steps, at most "
             f"{protocol['cap_per_candidate_s']:g} s per candidate a session). Columns are medians over the "
             "sessions; spread is (max - min) / mean of the sessions' medians.", "",
             "| workload | candidate | median ms | IQR / median | CI half-width | steps | spread of medians |",
             "|---|---|---|---|---|---|---|"]
    for w in results["workloads"]:
        for label in CANDIDATES:
            s = w["summary"][label]
            median = "-" if s["median_ms"] is None else f"{s['median_ms']:.1f}"
            steps = "-" if s["runs"] is None else f"{s['runs']:.0f}"
            lines.append(f"| {w['workload']} | {label} | {median} | {pct(s['iqr_rel'])} | "
                         f"{pct(s['ci_halfwidth_rel'])} | {steps} | {pct(s['spread_of_medians'])} |")
    lines += ["", "Identical placements measured in one session tie (their ratio's CI holds 1) in: "
              + ", ".join(f"{w['workload']} {w['identical_placements_tie']}" for w in results["workloads"]) + ".",
              "", "The ratio of `placed` over its copy, per session: paired by rounds (what placer reports) and "
              "unpaired (each sample resampled on its own):", "",
              "| workload | session | paired ratio (95% CI) | unpaired ratio (95% CI) |", "|---|---|---|---|"]
    for w in results["workloads"]:
        for r in w["sessions"]:
            cells = [f"{x['value']:.3f} ({x['ci'][0]:.3f}-{x['ci'][1]:.3f}) {x['verdict']}" if x else "-"
                     for x in (r["copy_ratio"], r.get("copy_ratio_unpaired"))]
            lines.append(f"| {w['workload']} | {r['session']} | {cells[0]} | {cells[1]} |")
    lines += ["", "Host:", "", *host_lines(results["host"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--sessions", type=int, default=3, help="independent sessions per workload")
    parser.add_argument("--target", type=float, default=0.03, help="CI half-width target (fraction of the median)")
    parser.add_argument("--cap", type=float, default=10.0, help="seconds per candidate in a session")
    parser.add_argument("--name", default="noise", help="results file stem")
    parser.add_argument("--quick", action="store_true",
                        help="a check that it runs: transformer small, 2 sessions, 2 s sessions; noise_quick.*")
    args = parser.parse_args(argv)
    name = args.name
    if args.quick:
        name, args.workloads, args.sessions, args.cap = "noise_quick", ["zoo:transformer:small"], 2, 0.5
    from placer.measurements import Protocol  # the heavy import, after argument errors

    protocol = Protocol(target=args.target, min_runs=5, max_runs=400, cap_per_candidate_s=args.cap)
    host = host_info()
    results = {"host": host, "protocol": protocol.to_json(), "sessions": args.sessions, "workloads": []}
    for spec in args.workloads:
        results["workloads"].append(measure_workload(spec, args.sessions, protocol))
        record(name, results, to_markdown(results), RESULTS)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
