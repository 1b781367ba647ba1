"""Interleaved stages against the pipeline heuristic's contiguous ones, simulated and measured.

The pipeline heuristic (placer.baselines.pipeline) cuts the groups, in topological order,
into one contiguous stage per device. Megatron-LM's interleaved schedule (Narayanan et
al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM") gives each device several smaller stages ("virtual stages") in round-robin
order, which shortens the pipeline's fill and drain (the bubble) at the cost of more
crossings. This probe builds such plans for a problem (the groups cut into chunks x
devices stages of equal forward + backward time, stage i on device i mod devices, each at
the micro-batch counts given) and measures them with the pipeline heuristic's plan and
`unplaced` in one interleaved session (placer.measurements): does the simulator rank them
as the runtime runs them?

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/probe_interleave.py --models gpt transformer

Writes experiments/results/probe_interleave.{json,md} (`--name` another name).
"""

from __future__ import annotations

import argparse

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from ablation import PROBLEMS, warm_start
from envs.calibrate import load_calibration
from graphs.problem import Candidate, PlacementProblem, build_problem
from graphs.workload import load_workload
from placer.baselines.pipeline import interleaved_stages
from placer.book import MeasurementBook
from placer.measurements import UNPLACED, Measurer, Protocol, compare
from placer.search.scorer import SimulatedScorer


def probe(name: str, args: argparse.Namespace) -> dict:
    """One problem's session: the warm start and each interleaved plan, simulated and measured, with unplaced."""
    spec, devices = PROBLEMS[name]
    problem = build_problem(spec, devices=devices, max_groups=256)
    scorer = SimulatedScorer(problem, load_calibration(problem))
    method, warm, _ = warm_start(problem, scorer)
    candidates = {f"{method} (warm start), m={warm.microbatches}": warm}
    for chunks in args.chunks:
        for m in args.microbatches:
            candidates[f"{chunks} stages a device, m={m}"] = interleaved_stages(problem, chunks, m)
    simulated = dict(zip(candidates, scorer.score(list(candidates.values()))))
    measurer = Measurer(load_workload(spec), problem, MeasurementBook({"probe_interleave": name}),
                        Protocol(cap_s=args.cap_s))
    measured = measurer.session([(UNPLACED, None), *candidates.items()], f"interleaved stages: {name}")
    reference = next(iter(candidates))
    rows = {}
    for label in candidates:
        ratio = compare(measured[label], measured[reference], label)
        if ratio is None:  # it or the warm start could not run (e.g. out of memory at this micro-batch count)
            print(f"  {name} {label}: not measured ({measured[label].reason or measured[reference].reason})")
            continue
        rows[label] = {"simulated_ms": simulated[label], "measured_ms": measured[label].median_ms,
                       "sim_speedup": simulated[reference] / simulated[label],
                       "speedup": ratio.value, "ci": list(ratio.ci), "verdict": ratio.verdict}
        print(f"  {name} {label}: simulated {simulated[label]:.1f} ms, measured {measured[label].median_ms:.1f} ms, "
              f"{ratio.value:.3f}x ({ratio.ci[0]:.3f}-{ratio.ci[1]:.3f}) {ratio.verdict}", flush=True)
    return {"unplaced_ms": measured[UNPLACED].median_ms, "rows": rows}


def markdown(results: dict) -> str:
    """The results as a Markdown table, one row per plan, and the host."""
    lines = [f"# Interleaved stages ({results['host']['date']})", "",
             "Each plan's simulated and measured step time, and its speedup over the warm start's "
             "(the best heuristic: simulated ratio; measured ratio of medians with its 95% CI, one session).", "",
             "| problem | plan | simulated ms | measured ms | simulated speedup | measured speedup (95% CI) |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, entry in results["problems"].items():
        for label, row in entry["rows"].items():
            lines.append(f"| {name} | {label} | {row['simulated_ms']:.1f} | {row['measured_ms']:.1f} | "
                         f"{row['sim_speedup']:.3f}x | {row['speedup']:.3f}x ({row['ci'][0]:.3f}-{row['ci'][1]:.3f}) "
                         f"{row['verdict']} |")
        lines.append(f"| {name} | unplaced | - | {entry['unplaced_ms']:.1f} | - | - |")
    return "\n".join(lines + ["", *host_lines(results["host"]), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gpt", "transformer"], choices=list(PROBLEMS))
    parser.add_argument("--chunks", nargs="*", type=int, default=[2, 3], help="stages a device")
    parser.add_argument("--microbatches", nargs="*", type=int, default=[2, 4])
    parser.add_argument("--cap-s", type=float, default=150.0, help="the session's cap, seconds")
    parser.add_argument("--name", default="probe_interleave")
    args = parser.parse_args()
    results = {"host": host_info(), "problems": {}}
    for name in args.models:
        results["problems"][name] = probe(name, args)
    record(args.name, results, markdown(results))


if __name__ == "__main__":
    main()
