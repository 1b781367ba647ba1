"""Do the speedups a run claims hold up when measured again afterwards? (issue 14)

For each results.json (default: every run under results/table1/), rebuild the run's
problem and re-measure, in R fresh interleaved sessions, the plan the run judged
(choice.contender: the chosen plan, or the one unplaced beat), the best heuristic,
RL's placement and unplaced. Each claim (the contender's speedup over unplaced and
over the best heuristic, RL's over the best heuristic) passes when the re-measured
ratio (median over the sessions) is within 0.10 of it.

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/recheck.py        # after table1.py, quiet host
    .venv/bin/python experiments/recheck.py --results DIR/results.json --sessions 1 --cap 0.5

Writes experiments/results/recheck.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _record import RESULTS, host_info, host_lines, record  # this folder is on sys.path when run as a script

TOLERANCE = 0.10


def recheck(path: Path, sessions: int, protocol) -> dict:
    """Claims of one results.json against `sessions` fresh interleaved re-measurements."""
    from graphs.problem import Candidate, build_problem
    from graphs.workload import load_workload
    from placer.book import MeasurementBook
    from placer.measurements import Measurer, compare
    from placer.results import Results

    results = Results.load(path)
    loaded = load_workload(results.workload, seed=results.seed or 0)
    memory = ",".join(f"{d}={b}" for d, b in results.memory.items() if b is not None) or None
    problem = build_problem(loaded, ",".join(results.devices), memory)
    measurer = Measurer(loaded, problem, MeasurementBook({}), protocol)
    heuristic = results.best_heuristic
    rows = {"contender": results.row(results.choice.contender or results.best or ""), "heuristic": heuristic,
            "rl": results.row("rl")}
    claims = [("contender vs unplaced", "contender", "unplaced"),
              ("contender vs best heuristic", "contender", "heuristic"), ("RL vs best heuristic", "rl", "heuristic")]
    entries = [("unplaced", None)] + [(role, Candidate(tuple(row.placement), row.microbatches))
                                      for role, row in rows.items() if row is not None and row.placement is not None]
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in claims}
    for _ in range(sessions):
        measured = measurer.session(entries, "recheck")
        for name, role, reference in claims:
            if role in measured and reference in measured and rows[role] is not rows.get(reference):
                ratio = compare(measured[role], measured[reference], reference)
                if ratio is not None:
                    ratios[name].append(ratio.value)
    report = []
    for name, role, reference in claims:
        row = rows[role]
        claimed = None if row is None else (row.vs_unplaced if reference == "unplaced" else row.vs_best_heuristic)
        again = statistics.median(ratios[name]) if ratios[name] else None
        ok = None if claimed is None or again is None else abs(claimed.value - again) <= TOLERANCE
        report.append({"claim": name, "method": row.method if row is not None else None,
                       "claimed": claimed.to_json() if claimed is not None else None, "remeasured": again,
                       "remeasured_each": ratios[name], "within_tolerance": ok})
    return {"results": str(path), "workload": results.workload, "chosen": results.best, "claims": report}


def to_markdown(data: dict) -> str:
    lines = ["# Claims re-measured afterwards", "",
             f"Each run's claimed speedups against a re-measurement in {data['sessions']} fresh interleaved "
             f"session(s) (median of the sessions' ratios); a claim holds when they differ by at most {TOLERANCE}.",
             "", "| run | claim | method | claimed | re-measured | holds |", "|---|---|---|---|---|---|"]
    for run in data["runs"]:
        for c in run["claims"]:
            claimed = "-" if c["claimed"] is None else f"{c['claimed']['value']:.2f}x ({c['claimed']['verdict']})"
            again = "-" if c["remeasured"] is None else f"{c['remeasured']:.2f}x"
            holds = {True: "yes", False: "NO", None: "-"}[c["within_tolerance"]]
            lines.append(f"| {run['workload']} | {c['claim']} | {c['method'] or '-'} | {claimed} | {again} | {holds} |")
    return "\n".join([*lines, "", "Host:", "", *host_lines(data["host"]), ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", type=Path, default=None,
                        help="results.json files (default: results/table1/*/results.json)")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--cap", type=float, default=15.0, help="seconds per candidate in a session")
    parser.add_argument("--name", default="recheck", help="output name under experiments/results/")
    args = parser.parse_args(argv)
    paths = args.results or sorted((RESULTS / "table1").glob("*/results.json"))
    from placer.measurements import Protocol  # the heavy import, after argument errors

    protocol = Protocol(min_runs=5, max_runs=400, cap_per_candidate_s=args.cap)
    data = {"host": host_info(), "sessions": args.sessions, "protocol": protocol.to_json(), "runs": []}
    for path in paths:
        print(f"[recheck] {path}", flush=True)
        data["runs"].append(recheck(path, args.sessions, protocol))
        record(args.name, data, to_markdown(data), RESULTS)
    print(to_markdown(data))


if __name__ == "__main__":
    main()
