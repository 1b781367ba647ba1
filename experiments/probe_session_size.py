"""Does the size of an interleaved session change how its steps time? The same three
heuristic placements and unplaced are measured in a small session (those four alone) and
in a big one (with --extra random placements alive and interleaved beside them), in the
order small, big, big, small, each to the same number of steps; per session: each of the
four's median, IQR and CI half-width (as shares of the median), and the process's minor
page faults per timed step.

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/probe_session_size.py

Writes experiments/results/probe_session_size.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from ablation import heuristics
from graphs.problem import Candidate, build_problem
from graphs.workload import load_workload
from placer.book import MeasurementBook
from placer.measurements import UNPLACED, Measurer, Protocol

WATCHED = (UNPLACED, "h0", "h1", "h2")  # measured in every session


def session(loaded, problem, candidates: dict[str, Candidate | None], steps: int) -> dict:
    """One interleaved session of `candidates` (label -> candidate, None: unplaced), each to `steps` timed steps."""
    measurer = Measurer(loaded, problem, MeasurementBook({"probe": "session_size"}),
                        Protocol(cap_s=600.0, target=1e-6, min_runs=steps, max_runs=steps))
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    measured = measurer.session(list(candidates.items()), f"{len(candidates)} candidates")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    timed = sum(m.runs for m in measured.values() if m.feasible)
    return {"candidates": len(candidates), "seconds": time.perf_counter() - start,
            "faults_per_step": faults / max(timed, 1),
            "watched": {label: {"median_ms": m.median_ms, "iqr": m.iqr_ms / m.median_ms,
                                "ci_halfwidth": m.ci_halfwidth, "runs": m.runs}
                        for label, m in measured.items() if label in WATCHED}}


def markdown(results: dict) -> str:
    lines = [f"# Session size ({results['workload']}, {results['steps']} steps a candidate)", "",
             "| session | candidates | s | minor faults / step | "
             + " | ".join(f"{label}: median ms, IQR, CI" for label in WATCHED) + " |",
             "| --- | ---: | ---: | ---: |" + " --- |" * len(WATCHED)]
    for i, s in enumerate(results["sessions"]):
        cells = [f"{w['median_ms']:.1f}, {100 * w['iqr']:.0f}%, {100 * w['ci_halfwidth']:.1f}%"
                 for w in (s["watched"][label] for label in WATCHED)]
        lines.append(f"| {i + 1} | {s['candidates']} | {s['seconds']:.0f} | {s['faults_per_step']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *host_lines(results["host"])]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="zoo:transformer:medium")
    parser.add_argument("--extra", type=int, default=28, help="random placements beside the four in a big session")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of every candidate in every session")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the ablation: the placed trials set their own devices' threads
    host = host_info()
    loaded = load_workload(args.workload)
    problem = build_problem(loaded, devices="cpu:0,cpu:1")
    placed = list(dict.fromkeys(heuristics(problem).values()))[:3]
    small = {UNPLACED: None, **{f"h{i}": c for i, c in enumerate(placed)}}
    rng = random.Random(0)
    big = {**small, **{f"r{i}": Candidate(tuple(rng.randrange(2) for _ in range(problem.n_groups)))
                       for i in range(args.extra)}}
    sessions = []
    for candidates in (small, big, big, small):
        sessions.append(session(loaded, problem, candidates, args.steps))
        print(f"session {len(sessions)}: {len(candidates)} candidates, {sessions[-1]['seconds']:.0f} s", flush=True)
    results = {"host": host, "workload": args.workload, "steps": args.steps, "sessions": sessions}
    record("probe_session_size", results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
