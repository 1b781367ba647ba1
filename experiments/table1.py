"""Reproduce the layout of Table 1 of Mirhoseini et al., "Device Placement
Optimization with Reinforcement Learning" (ICML 2017), on this host.

Rows are zoo models; columns are measured training-step times (median, ms, with the
confidence interval of each median) of
  unplaced        the model as you run it without placer: the whole host (the paper's single CPU)
  single device   everything on the first placement device (e.g. cpu:0),
  METIS           the graph partitioner (the paper's Scotch column),
  expert          the hand-written placement,
  RL              the learned placement,
  our other baselines; then RL's speedup over the best heuristic and the chosen plan's
over unplaced, each a ratio with its confidence interval from one interleaved session
("tie" where the interval holds 1). Each model is one `placer.optimize.optimize` run,
whose results.json and report stay under experiments/results/table1/ for
experiments/plot_speedups.py.

    .venv/bin/python experiments/table1.py --size medium                # the record (quiet host)
    .venv/bin/python experiments/table1.py --size paper --models rnnlm nmt:small
    .venv/bin/python experiments/table1.py --quick                      # a check that it runs

A model whose paper size does not fit (or fails to load) becomes a row with its
error, and the others still run; table1.json is rewritten after every model, so an
interrupted run keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _record import RESULTS, host_info, host_lines, record  # this folder is on sys.path when run as a script
from graphs.errors import PlacerError
from placer.results import Ratio, Results, method_name

MODELS = ("rnnlm", "nmt", "inception_v3", "transformer")
# The paper's columns first, then every other method the results hold, so that a new
# baseline gets a column without a change here.
PAPER_COLUMNS = ("unplaced", "single", "metis", "expert", "rl")
COLUMN_TITLES = {"unplaced": "unplaced (whole host)", "single": "single device", "metis": "METIS (Scotch)"}


def column_title(column: str) -> str:
    return COLUMN_TITLES.get(column, method_name(column))


def ratio_json(ratio: Ratio | None) -> dict | None:
    return ratio.to_json() if ratio is not None else None


def row_of(model: str, size: str, results: Results, results_path: str) -> dict:
    """One table row from a run's Results."""
    cells = {r.method: {"measured_ms": r.measured_ms, "ci_ms": list(r.ci_ms) if r.ci_ms else None,
                        "runs": r.runs, "session": r.session, "feasible": r.feasible, "reason": r.reason}
             for r in results.methods}
    rl = results.row("rl")
    return {"model": model, "size": size, "workload": results.workload, "devices": results.devices, "cells": cells,
            "chosen": results.best, "verdict": results.choice.verdict,
            "chosen_vs_unplaced": ratio_json(results.choice.vs_unplaced),
            "rl_vs_best_heuristic": ratio_json(rl.vs_best_heuristic if rl is not None else None),
            "rl_session": rl.session if rl is not None else None,
            "lower_bound_ms": results.bounds.get("lower_bound_ms"), "results": results_path}


def run_model(model: str, size: str, args: argparse.Namespace, optimize, protocol, search) -> dict:
    """One table row: the full optimize run of one model (unplaced measured beside it)."""
    workload = f"zoo:{model}:{size}"
    run_dir = args.out / args.name / f"{model}-{size}"
    print(f"[table1] {workload}: unplaced, baselines and RL, budget {args.budget:g} s", flush=True)
    results = optimize(workload, devices=args.devices, memory=args.memory, budget_s=args.budget, seed=args.seed,
                       out_dir=run_dir, protocol=protocol, search=search)
    # Relative to the folder of table1.json, for plot_speedups.py.
    return row_of(model, size, results, str((run_dir / "results.json").relative_to(args.out)))


def format_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    if not c.get("feasible", True):
        return "infeasible"
    if c.get("measured_ms") is None:
        return "-"
    ci = c.get("ci_ms")
    return f"{c['measured_ms']:.1f}" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else "")


def format_ratio(data: dict | None, against: str = "") -> str:
    if not data:
        return "-"
    ratio = Ratio.from_json(data)
    return ratio.describe() + (f" vs {column_title(against)}" if against else "")


def to_markdown(table: dict) -> str:
    found = [method for row in table["rows"] for method in row.get("cells", {})]
    columns = list(dict.fromkeys([*PAPER_COLUMNS, *found]))
    header = ["model", *map(column_title, columns), "RL vs best heuristic", "chosen plan vs unplaced"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in table["rows"]:
        name = f"{row['model']} ({row['size']})"
        if "error" in row:
            lines.append(f"| {name} | " + " | ".join(["-"] * (len(header) - 1)) + " |")
            notes.append(f"- {name}: {row['error']}")
            continue
        heuristic = (row.get("rl_vs_best_heuristic") or {}).get("reference", "")
        chosen = f"{column_title(row['chosen'])}: {format_ratio(row.get('chosen_vs_unplaced'))}" \
            if row.get("chosen") != "unplaced" else "unplaced (no plan measurably faster)"
        lines.append(f"| {name} | " + " | ".join(format_cell(row["cells"].get(c)) for c in columns)
                     + f" | {format_ratio(row.get('rl_vs_best_heuristic'), heuristic)} | {chosen} |")
        notes += [f"- {name}, {column_title(c)}: {cell['reason']}"
                  for c, cell in row["cells"].items() if cell and not cell.get("feasible", True)]
    devices = ", ".join(table["rows"][0].get("devices") or []) if table["rows"] else "-"
    return "\n".join([
        "# Table 1 on this host",
        "",
        "Measured training-step time, median in milliseconds with its confidence interval (lower is better), "
        "in the layout of Table 1 of Mirhoseini et al. (ICML 2017). unplaced is the model run without placer on "
        f"the whole host (the paper's single CPU); the other columns place the model on {devices}. Candidates "
        "were measured interleaved (placer.measurements.run_session) until each median's CI was within "
        f"{table['protocol']['target']:.0%} or {table['protocol']['cap_per_candidate_s']:g} s per candidate a "
        "session. The speedups are "
        "ratios with their confidence interval from one interleaved session (RL's from the final or confirm "
        "session, never from the search's measurements that picked it); tie: the interval holds 1. "
        f"Search budget {table['budget_s']:g} s per model, seed {table['seed']}.",
        "",
        *lines,
        "",
        *(["Infeasible placements and failed models:", "", *notes, ""] if notes else []),
        "Host:",
        "",
        *host_lines(table["host"]),
        "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help="zoo models, each optionally MODEL:SIZE to override --size (default: all four)")
    parser.add_argument("--size", default="small", choices=["small", "medium", "paper"],
                        help="zoo size of models given without one (default: small)")
    parser.add_argument("--budget", type=float, default=120.0, help="RL search seconds per model")
    parser.add_argument("--devices", default=None, help="placement devices (default: placer's default)")
    parser.add_argument("--memory", default=None, help="memory caps, e.g. cpu:0=2GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per candidate at least")
    parser.add_argument("--measure-cap", type=float, default=6.0, help="seconds per candidate in a measurement session")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--render", action="store_true",
                        help="re-derive table1.md from the recorded runs' results.json, run nothing")
    parser.add_argument("--quick", action="store_true",
                        help="a fast check that the script works: rnnlm only, 5 s budget, short sessions, "
                             "written as table1_quick.*")
    args = parser.parse_args(argv)
    args.name = "table1"
    if args.quick:
        args.name = "table1_quick"
        args.budget, args.iters, args.measure_cap = 5.0, 2, 1.0
        if args.models == list(MODELS):
            args.models = ["rnnlm"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:  # re-derive every row from the recorded results.json files
        table = json.loads((args.out / f"{args.name}.json").read_text())
        table["rows"] = [row_of(row["model"], row["size"], Results.load(args.out / row["results"]), row["results"])
                         if "results" in row else row for row in table["rows"]]
        record(args.name, table, to_markdown(table), args.out)
        print(to_markdown(table))
        return
    from placer.measurements import Protocol  # the heavy imports, after argument errors
    from placer.optimize import optimize
    from placer.search_stage import SearchOptions

    protocol = Protocol(min_runs=args.iters, max_runs=max(args.iters, 200), cap_per_candidate_s=args.measure_cap)
    table = {"host": host_info(), "budget_s": args.budget, "seed": args.seed, "protocol": protocol.to_json(),
             "rows": []}
    for spec in args.models:
        model, _, size = spec.partition(":")
        size = size or args.size
        try:
            row = run_model(model, size, args, optimize, protocol, SearchOptions())
        except (PlacerError, MemoryError, torch.cuda.OutOfMemoryError) as e:  # e.g. a paper size too big
            print(f"[table1] {model}:{size} failed: {e}", flush=True)
            row = {"model": model, "size": size, "error": f"{type(e).__name__}: {e}"}
        table["rows"].append(row)
        record(args.name, table, to_markdown(table), args.out)
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
