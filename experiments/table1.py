"""Reproduce the layout of Table 1 of Mirhoseini et al., "Device Placement
Optimization with Reinforcement Learning" (ICML 2017), on this host.

Rows are zoo models; columns are measured training-step times (median, ms) of
  single CPU      everything on the whole host (`cpu`, all cores in one worker),
  single device   everything on the first placement device (e.g. cpu:0),
  METIS           the graph partitioner (the paper's Scotch column),
  expert          the hand-written placement,
  RL              the learned placement,
  our other baselines, and the speedup of RL over the fastest of all the others,
as in the paper's last column. Each model is one `placer.optimize.optimize` run
(plus a single-method run on `cpu` for the first column), whose results.json and
report stay under experiments/results/table1/ for experiments/plot_speedups.py.

    .venv/bin/python experiments/table1.py                     # small sizes, 120 s each
    .venv/bin/python experiments/table1.py --size paper --models rnnlm nmt:small
    .venv/bin/python experiments/table1.py --quick             # a check that it runs

A model whose paper size does not fit (or fails to load) becomes a row with its
error, and the others still run; table1.json is rewritten after every model, so an
interrupted run keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from graphs.errors import PlacerError
from graphs.files import write_text_atomically
from placer.report import method_name

MODELS = ("rnnlm", "nmt", "inception_v3", "transformer")
# The paper's columns first (single_cpu: our run on the whole host), then every other
# method the results hold, so that a new baseline gets a column without a change here.
PAPER_COLUMNS = ("single_cpu", "single", "metis", "expert", "rl")
COLUMN_TITLES = {"single_cpu": "single CPU", "single": "single device", "metis": "METIS (Scotch)"}
RESULTS = Path(__file__).resolve().parent / "results"


def column_title(column: str) -> str:
    return COLUMN_TITLES.get(column, method_name(column))


def host_info(command: str) -> dict:
    return {
        "uname": " ".join(filter(None, platform.uname())),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


def cell(entry: dict | None) -> dict | None:
    """The part of a results.json method entry the table shows."""
    if entry is None:
        return None
    return {key: entry.get(key) for key in ("measured_ms", "iqr_ms", "simulated_ms", "feasible", "reason")}


def rl_speedup(cells: dict[str, dict | None], columns: set[str] | None = None) -> tuple[float | None, str | None]:
    """RL's speedup over the fastest feasible measured other column (among `columns`,
    default all), and that column."""
    def measured(c: dict | None) -> float | None:
        return c.get("measured_ms") if c and c.get("feasible", True) else None

    others = {col: measured(c) for col, c in cells.items()
              if col != "rl" and measured(c) is not None and (columns is None or col in columns)}
    rl = measured(cells.get("rl"))
    if rl is None or not others:
        return None, None
    best = min(others, key=others.get)
    return others[best] / rl, best


def speedups(row: dict) -> dict:
    """RL against the best heuristic on the same devices (the issue's target), and
    against the whole host as one device (a different device set: intra-op threads)."""
    heuristics = set(row["cells"]) - {"rl", "single_cpu"}
    speedup, best_other = rl_speedup(row["cells"], heuristics)
    vs_host, _ = rl_speedup(row["cells"], {"single_cpu"})
    return {"rl_speedup": speedup, "best_other": best_other, "rl_vs_single_cpu": vs_host}


def run_model(model: str, size: str, args: argparse.Namespace, optimize) -> dict:
    """One table row: the whole-host single run and the full optimize run of one model."""
    workload = f"zoo:{model}:{size}"
    run_dir = args.out / args.name / f"{model}-{size}"
    common = dict(workload=workload, seed=args.seed, measure_iters=args.measure_iters)
    print(f"[table1] {workload}: single CPU (whole host)", flush=True)
    # One device: every placement is the same, so the search needs no budget.
    host = optimize(**common, devices="cpu", methods=["single"], budget_s=1.0,
                    out_dir=run_dir / "single_cpu")
    print(f"[table1] {workload}: baselines and RL, budget {args.budget:g} s", flush=True)
    placed = optimize(**common, devices=args.devices, memory=args.memory, budget_s=args.budget,
                      out_dir=run_dir / "placed")

    host_single = next((e for e in host.get("methods") or [] if e["method"] == "single"), None)
    cells = {"single_cpu": cell(host_single), **{e["method"]: cell(e) for e in placed.get("methods") or []}}
    row = {"model": model, "size": size, "workload": workload, "devices": placed.get("devices"), "cells": cells}
    return {
        **row, **speedups(row),
        "lower_bound_ms": (placed.get("bounds") or {}).get("lower_bound_ms"),
        # Relative to the folder of table1.json, for plot_speedups.py.
        "results": str((run_dir / "placed" / "results.json").relative_to(args.out)),
    }


def format_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    if not c.get("feasible", True):
        return "infeasible"
    return "-" if c.get("measured_ms") is None else f"{c['measured_ms']:.1f}"


def to_markdown(table: dict) -> str:
    found = [method for row in table["rows"] for method in row.get("cells", {})]
    columns = list(dict.fromkeys([*PAPER_COLUMNS, *found]))
    header = ["model", *map(column_title, columns), "RL speedup", "RL vs single CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in table["rows"]:
        name = f"{row['model']} ({row['size']})"
        if "error" in row:
            lines.append(f"| {name} | " + " | ".join(["-"] * (len(header) - 1)) + " |")
            notes.append(f"- {name}: {row['error']}")
            continue
        speedup = "-" if row["rl_speedup"] is None else (
            f"{row['rl_speedup']:.2f}x (vs {column_title(row['best_other'])})")
        vs_host = "-" if row.get("rl_vs_single_cpu") is None else f"{row['rl_vs_single_cpu']:.2f}x"
        lines.append(f"| {name} | " + " | ".join(format_cell(row["cells"].get(c)) for c in columns)
                     + f" | {speedup} | {vs_host} |")
        notes += [f"- {name}, {column_title(c)}: {cell['reason']}"
                  for c, cell in row["cells"].items() if cell and not cell.get("feasible", True)]
    host = table["host"]
    devices = ", ".join(table["rows"][0].get("devices") or []) if table["rows"] else "-"
    return "\n".join([
        "# Table 1 on this host",
        "",
        "Measured training-step time, median in milliseconds (lower is better), in the layout of "
        "Table 1 of Mirhoseini et al. (ICML 2017). Single CPU runs everything on the whole host; "
        f"the other columns place the model on {devices}. RL speedup is the fastest heuristic's "
        f"time on those devices over RL's; RL vs single CPU compares with the whole host as one "
        f"device (a different device set: one worker using every core for each op). "
        f"Search budget {table['budget_s']:g} s per model, seed {table['seed']}.",
        "",
        *lines,
        "",
        *(["Infeasible placements and failed models:", "", *notes, ""] if notes else []),
        "Host:",
        "",
        f"- `uname -a`: {host['uname']}",
        f"- cores: {host['cores']}, torch {host['torch']}, Python {host['python']}",
        f"- date: {host['date']}",
        f"- command: `{host['command']}`",
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
    parser.add_argument("--measure-iters", type=int, default=10, help="timed training steps per placement")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--render", action="store_true",
                        help="re-derive the speedups and table1.md from the recorded table1.json, run nothing")
    parser.add_argument("--quick", action="store_true",
                        help="a fast check that the script works: rnnlm only, 5 s budget, 3 timed "
                             "steps, written as table1_quick.*")
    args = parser.parse_args(argv)
    args.name = "table1"
    if args.quick:
        args.name = "table1_quick"
        args.budget, args.measure_iters = 5.0, 3
        if args.models == list(MODELS):
            args.models = ["rnnlm"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:  # only re-derive the speedups and the Markdown from the recorded runs
        table = json.loads((args.out / f"{args.name}.json").read_text())
        table["rows"] = [{**row, **speedups(row)} if "cells" in row else row for row in table["rows"]]
        write_text_atomically(args.out / f"{args.name}.json", json.dumps(table, indent=2) + "\n")
        write_text_atomically(args.out / f"{args.name}.md", to_markdown(table))
        print(to_markdown(table))
        return
    from placer.optimize import optimize  # the heavy import, after argument errors

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    table = {"host": host_info(command), "budget_s": args.budget, "seed": args.seed, "rows": []}
    for spec in args.models:
        model, _, size = spec.partition(":")
        size = size or args.size
        try:
            row = run_model(model, size, args, optimize)
        except (PlacerError, MemoryError, torch.cuda.OutOfMemoryError) as e:  # e.g. a paper size too big
            print(f"[table1] {model}:{size} failed: {e}", flush=True)
            row = {"model": model, "size": size, "error": f"{type(e).__name__}: {e}"}
        table["rows"].append(row)
        write_text_atomically(args.out / f"{args.name}.json", json.dumps(table, indent=2) + "\n")
        write_text_atomically(args.out / f"{args.name}.md", to_markdown(table))
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
