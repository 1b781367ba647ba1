"""Draw the figures of docs from experiments/table1.py's results:

  docs/img/table1_speedup.png   per model, measured with its confidence interval: the fastest placed
                                plan against unplaced, and RL against the fastest heuristic on the
                                same devices
  docs/img/search_curves.png    the RL search's best simulated and best measured step time
                                against search seconds, one line per model, each relative
                                to that model's best heuristic (below 1: RL is ahead)

    .venv/bin/python experiments/plot_speedups.py            # reads results/table1.json
    .venv/bin/python experiments/plot_speedups.py --quick    # reads table1_quick.json, writes under results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from placer.report import save_figure
from placer.results import Ratio, Results
from table1 import column_title  # this folder is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


def plot_speedups(rows: list[dict], runs: dict[str, Results], path: Path) -> Path | None:
    """Two panels of bars, one bar per model, each a measured ratio with its confidence
    interval (a tie, the interval holding 1, in grey): left, the fastest placed plan
    against unplaced (the model run without placer); right, RL against the fastest
    heuristic on the same devices."""
    left = []
    for r in rows:
        results = runs.get(f"{r['model']} ({r['size']})")
        placed = [m for m in results.methods if m.kind != "unplaced" and m.measured and m.vs_unplaced] if results else []
        if placed:
            best = min(placed, key=lambda m: m.measured_ms)
            left.append((r, best.vs_unplaced, column_title(best.method)))
    right = [(r, Ratio.from_json(r["rl_vs_best_heuristic"]), None) for r in rows if r.get("rl_vs_best_heuristic")]
    if not left and not right:
        return None
    fig = Figure(figsize=(max(9.0, 2.4 * len(rows) + 3), 4.2))
    for ax, bars, title, ylabel in zip(
            fig.subplots(1, 2), (left, right),
            ("Fastest placed plan vs unplaced", "RL vs the fastest heuristic"),
            ("speedup over unplaced (measured)", "speedup over best heuristic (measured)")):
        _bars(ax, bars)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    fig.suptitle("Measured speedups per model, with 95% CI whiskers (grey: tie)")
    return save_figure(fig, path)


def _bars(ax, bars: list[tuple[dict, Ratio, str | None]]) -> None:
    if not bars:
        ax.set_axis_off()
        return
    x = np.arange(len(bars))
    ratios = [q for _, q, _ in bars]
    values = np.array([q.value for q in ratios])
    low, high = np.array([q.ci[0] for q in ratios]), np.array([q.ci[1] for q in ratios])
    ax.bar(x, values, yerr=[values - low, high - values], capsize=4,
           color=["#C44E52" if q.verdict == "faster" else "#7A8BA6" if q.verdict == "slower" else "#BBBBBB"
                  for q in ratios])
    ax.axhline(1.0, color="black", linewidth=1)
    for xi, (_, q, name) in zip(x, bars):
        label = f"{q.value:.2f}x{' tie' if q.verdict == 'tie' else ''}\n{name or 'vs ' + column_title(q.reference)}"
        ax.annotate(label, (xi, q.ci[1]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{r['model']}\n({r['size']})" for r, _, _ in bars])
    ax.set_ylim(0, max(1.0, max(high)) * 1.3)


def plot_search_curves(runs: dict[str, Results], path: Path) -> Path | None:
    """Best simulated and best measured step time vs search seconds, one line per model,
    divided by the model's best heuristic measured time so that models share an axis."""
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    drawn = False
    for i, (label, results) in enumerate(runs.items()):
        heuristic = results.best_heuristic
        reference = heuristic.measured_ms if heuristic is not None else None
        curve = [p for p in results.curve if p.get("method", "rl") == "rl"]
        if reference is None or not curve:
            continue
        for ax, key in zip(axes, ("best_sim_ms", "best_measured_ms")):
            points = [(p["elapsed_s"], p[key] / reference) for p in curve
                      if p.get("elapsed_s") is not None and p.get(key) is not None]
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", label=label, marker="." if len(points) < 20 else None)
                drawn = True
    if not drawn:
        return None
    for ax, title in zip(axes, ("best simulated", "best measured")):
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("search time (s)")
        if ax.get_legend_handles_labels()[0]:  # e.g. no candidate was measured within the budget
            ax.legend(fontsize=8)
    axes[0].set_ylabel("step time / best heuristic's measured")
    fig.suptitle("RL search progress per model (below 1: faster than the best heuristic)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=None, help="table1.json (default: results/table1.json)")
    parser.add_argument("--out", type=Path, default=None, help="image folder (default: docs/img)")
    parser.add_argument("--quick", action="store_true",
                        help="read table1_quick.json and write under results/quick_img, leaving docs alone")
    args = parser.parse_args(argv)
    table_path = args.table or RESULTS / ("table1_quick.json" if args.quick else "table1.json")
    out = args.out or (RESULTS / "quick_img" if args.quick else DOCS_IMG)

    table = json.loads(table_path.read_text())
    rows = [r for r in table["rows"] if "error" not in r]
    runs = {f"{r['model']} ({r['size']})": Results.load(table_path.parent / r["results"])
            for r in rows if (table_path.parent / r["results"]).is_file()}
    for path in (plot_speedups(rows, runs, out / "table1_speedup.png"),
                 plot_search_curves(runs, out / "search_curves.png")):
        print(path or "skipped: no data for this figure")


if __name__ == "__main__":
    main()
