"""The report's plots, drawn from a Results on `matplotlib.figure.Figure` objects
saved as PNG by the Agg renderer, never through pyplot's global state (no display
is ever needed). A plot whose data is missing is skipped (None).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from placer.report.table import comparison_rows
from placer.results import MethodResult, Results, method_name

__all__ = ["PLOT_FILES", "save_figure", "plot_step_times", "plot_learning_curve", "plot_timeline", "idle_fractions",
           "layered_layout", "plot_grouped_graph", "draw_plots"]

# Timeline colours: compute phases in blue/orange/green, transfers in grey.
PHASE_COLOURS = {"fwd": "#4C72B0", "bwd": "#DD8452", "opt": "#55A868", "xfer": "#8C8C8C"}
OTHER_COLOURS = ("#B07AA1", "#937860", "#DA8BC3")  # event kinds a newer simulator may add
SEARCH_COLOUR, BASELINE_COLOUR, UNPLACED_COLOUR = "#C44E52", "#7A8BA6", "#55A868"
PLOT_FILES = ("step_times.png", "learning_curve.png", "timeline.png", "graph.png")


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out `fig` and save it as a PNG at `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_step_times(rows: Sequence[MethodResult], bounds: dict | None, path: Path,
                    chosen: str | None = None) -> Path | None:
    """Bars of each measured method's median with its confidence interval as whiskers
    (each row from its own session), unplaced and searches in their own colours, the
    chosen plan's bar outlined, the lower bound as a dashed line. None when nothing
    was measured."""
    rows = [r for r in rows if r.measured]
    if not rows:
        return None
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4))
    ax = fig.subplots()
    x = np.arange(len(rows))
    medians = np.array([r.measured_ms for r in rows])
    low = np.array([r.ci_ms[0] if r.ci_ms else r.measured_ms for r in rows])
    high = np.array([r.ci_ms[1] if r.ci_ms else r.measured_ms for r in rows])
    colours = [UNPLACED_COLOUR if r.kind == "unplaced" else BASELINE_COLOUR if r.kind == "baseline" else SEARCH_COLOUR
               for r in rows]
    bars = ax.bar(x, medians, yerr=[medians - low, high - medians], capsize=4, color=colours)
    for bar, r in zip(bars, rows):
        if r.method == chosen:
            bar.set_edgecolor("black")
            bar.set_linewidth(2)
    lower_bound = (bounds or {}).get("lower_bound_ms")
    if lower_bound is not None:
        ax.axhline(lower_bound, color="black", linestyle="--", linewidth=1, label=f"lower bound {lower_bound:.2f} ms")
        ax.legend(loc="upper left")
    ax.set_xticks(x, [method_name(r.method) for r in rows], rotation=30, ha="right")
    ax.set_ylabel("measured step time (ms)")
    ax.set_title("Training step time per placement (median, confidence interval)")
    return save_figure(fig, path)


def _series(points: Sequence[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    pairs = [(p.get(x_key), p.get(y_key)) for p in points]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot_learning_curve(curve: Sequence[dict] | None, path: Path, lower_bound_ms: float | None = None,
                        recalibrations: Sequence[dict] = (), best_measured: Sequence[dict] = ()) -> Path | None:
    """Each search's progress against seconds and against samples: the batch mean and
    the best simulated step time, each under the calibration of its moment (dotted
    lines mark every recalibration), and the best measured one with its confidence
    interval (shaded; each improvement a point with its interval). None when there is
    no curve (e.g. `placer compare`)."""
    if not curve:
        return None
    methods = list(dict.fromkeys(p.get("method", "rl") for p in curve))
    fig = Figure(figsize=(11, 4))
    for ax, (x_key, x_label) in zip(fig.subplots(1, 2), [("elapsed_s", "search time (s)"),
                                                          ("samples", "placements sampled")]):
        for i, method in enumerate(methods):
            rows = [p for p in curve if p.get("method", "rl") == method]
            name = "" if len(methods) == 1 else f"{method_name(method)}: "
            colour = SEARCH_COLOUR if i == 0 else f"C{i % 10}"
            if len(methods) == 1:
                ax.plot(*_series(rows, x_key, "mean_ms"), color="#BBBBBB", label="batch mean (simulated)")
            ax.plot(*_series(rows, x_key, "best_sim_ms"), color=colour, linestyle="--",
                    label=f"{name}best simulated (calibration of the moment)")
            ax.plot(*_series(rows, x_key, "best_measured_ms"), color=colour, marker="o", markersize=3,
                    drawstyle="steps-post", label=f"{name}best measured")
            band = [(p[x_key], *p["best_measured_ci_ms"]) for p in rows
                    if p.get(x_key) is not None and p.get("best_measured_ci_ms")]
            if band:
                bx, lo, hi = zip(*band)
                ax.fill_between(bx, lo, hi, color=colour, alpha=0.15, step="post")
            points = [(m[x_key], m["median_ms"], m.get("ci_ms")) for m in best_measured
                      if m.get("method", "rl") == method and m.get(x_key) is not None and m.get("median_ms")]
            if points:
                px, py, cis = zip(*points)
                cis = [ci or (y, y) for y, ci in zip(py, cis)]
                err = [[y - ci[0] for y, ci in zip(py, cis)], [ci[1] - y for y, ci in zip(py, cis)]]
                ax.errorbar(px, py, yerr=err, fmt="o", color=colour, capsize=3, markersize=4,
                            label=f"{name}measured (median, CI)")
        marks = [m[x_key] for m in recalibrations if m.get(x_key) is not None]
        for j, at in enumerate(marks):
            ax.axvline(at, color="#999999", linestyle=":", linewidth=1, label="recalibration" if j == 0 else None)
        if lower_bound_ms is not None:
            ax.axhline(lower_bound_ms, color="black", linestyle="--", linewidth=1, label="lower bound")
        ax.set_xlabel(x_label)
        ax.set_ylabel("step time (ms)")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Search progress (shaded: the best measurement's confidence interval)")
    return save_figure(fig, path)


def idle_fractions(timeline: Sequence[dict], devices: Sequence[str]) -> dict[str, float]:
    """Each device's idle share of the step (0-1): the time between the step's first
    event and its last that none of the device's compute (fwd, bwd, opt) covers; over a
    pipeline, its bubbles (a device whose stage waits for micro-batches, or is done)."""
    begin, end = min(t["start_ms"] for t in timeline), max(t["end_ms"] for t in timeline)
    idle = {}
    for device in devices:
        busy, reach = 0.0, begin
        for start, stop in sorted((t["start_ms"], t["end_ms"]) for t in timeline
                                  if t["device"] == device and t.get("kind") != "xfer"):
            busy += max(0.0, stop - max(start, reach))
            reach = max(reach, stop)
        idle[device] = 1.0 - busy / (end - begin) if end > begin else 0.0
    return idle


def plot_timeline(timeline: Sequence[dict] | None, devices: Sequence[str] | None,
                  path: Path) -> Path | None:
    """A Gantt chart of one simulated training step: one row per device, forward,
    backward, optimizer and transfer intervals (and any other event kind) in their
    own colours; each row names the device's idle share of the step (`idle_fractions`:
    a pipeline's bubbles) and, with micro-batches, each forward and backward task its
    micro-batch."""
    if not timeline:
        return None
    rows = list(dict.fromkeys([*(devices or []), *(t["device"] for t in timeline)]))
    fig = Figure(figsize=(11, 1.0 + 0.6 * len(rows)))
    present = {str(t.get("kind")) for t in timeline}
    kinds = [k for k in PHASE_COLOURS if k in present] + sorted(present - set(PHASE_COLOURS))
    colours = {**{k: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, k in enumerate(kinds)}, **PHASE_COLOURS}
    ax = fig.subplots()
    for y, device in enumerate(rows):
        for kind in kinds:
            spans = [(t["start_ms"], t["end_ms"] - t["start_ms"]) for t in timeline
                     if t["device"] == device and str(t.get("kind")) == kind]
            ax.broken_barh(spans, (y - 0.35, 0.7), facecolors=colours[kind], linewidth=0)
    tasks: dict[tuple, list[float]] = {}  # (device, kind, chunk, micro-batch) -> [start, end]
    for t in timeline:
        if t.get("kind") in ("fwd", "bwd") and "microbatch" in t:
            span = tasks.setdefault((t["device"], t["kind"], t.get("chunk"), t["microbatch"]), [t["start_ms"], 0.0])
            span[0], span[1] = min(span[0], t["start_ms"]), max(span[1], t["end_ms"])
    if any(key[3] for key in tasks):  # micro-batches: number each task
        for (device, _, _, micro), (start, end) in tasks.items():
            ax.text((start + end) / 2, rows.index(device), str(micro), ha="center", va="center", fontsize=6,
                    color="white", clip_on=True)
    ax.legend(handles=[Patch(color=colours[k], label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=len(kinds), frameon=False)
    idle = idle_fractions(timeline, rows)
    ax.set_yticks(range(len(rows)), [f"{d}\nidle {idle[d]:.0%}" for d in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time within one training step (ms, simulated)")
    ax.set_title("Per-device timeline of the chosen placement", loc="left")
    return save_figure(fig, path)


def layered_layout(graph: nx.DiGraph) -> dict[Any, np.ndarray]:
    """Positions for a DAG drawing: x = topological depth (longest path from a source),
    y spread evenly within each depth. `graph` is left unchanged."""
    layered = nx.DiGraph()
    for depth, nodes in enumerate(nx.topological_generations(graph)):
        layered.add_nodes_from(nodes, depth=depth)
    return nx.multipartite_layout(layered, subset_key="depth")


def _device_colour(index: int) -> str:
    return f"C{index % 10}"  # matplotlib's default cycle


def plot_grouped_graph(groups: dict | None, devices: Sequence[str] | None, path: Path,
                       labelled: int = 8) -> Path | None:
    """The grouped graph coloured by assigned device, node area by compute time;
    only the `labelled` heaviest groups are named so that ~256 nodes stay legible."""
    names = (groups or {}).get("names")
    if not names:
        return None
    n = len(names)
    compute = np.asarray(groups.get("compute_ms") or [1.0] * n, dtype=float)
    placement = groups.get("placement")
    devices = list(groups.get("devices") or devices or [])
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((u, v) for u, v in groups.get("edges") or [])
    pos = layered_layout(graph)
    depth = {node: d for d, nodes in enumerate(nx.topological_generations(graph)) for node in nodes}

    fig = Figure(figsize=(12, 6))
    ax = fig.subplots()
    # Area by compute, the largest node as wide as the spacing of the most crowded axis
    # (in points: the axes span about 860 x 360 of them).
    widest = max(Counter(depth.values()).values())
    depths = max(depth.values()) + 1
    spacing = min(360 / widest, 860 / depths)
    sizes = min(400.0, (0.8 * spacing) ** 2) * (0.15 + 0.85 * compute / max(compute.max(), 1e-12))
    # Arrow patches are slow and cluttered past a few dozen nodes; depth already shows direction.
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.3, width=0.6, arrows=n <= 64,
                           node_size=sizes)
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=sizes,
                           node_color=["#999999"] * n if placement is None
                           else [_device_colour(d) for d in placement])
    if placement is not None:
        ax.legend(handles=[Patch(color=_device_colour(d),
                                 label=devices[d] if d < len(devices) else f"device {d}")
                           for d in sorted(set(placement))], loc="upper right", fontsize=8)
    heaviest = np.argsort(compute)[::-1][:labelled]
    nx.draw_networkx_labels(graph, pos, ax=ax, font_size=7,
                            labels={int(g): str(names[g])[:24] for g in heaviest})
    ax.set_title(f"Grouped graph ({n} groups) coloured by device; "
                 "left to right in topological order, area = compute time")
    ax.set_axis_off()
    return save_figure(fig, path)


def draw_plots(results: Results, plot_dir: Path) -> dict[str, Path]:
    """Every plot whose data is present, as {file name: path}; missing data skips a plot."""
    bounds = results.bounds or {}
    drawn = {
        "step_times.png": plot_step_times(comparison_rows(results), bounds, plot_dir / "step_times.png",
                                          results.best),
        "learning_curve.png": plot_learning_curve(results.curve, plot_dir / "learning_curve.png",
                                                  bounds.get("lower_bound_ms"), results.recalibrations,
                                                  results.best_measured),
        "timeline.png": plot_timeline(results.timeline, results.devices, plot_dir / "timeline.png"),
        "graph.png": plot_grouped_graph(results.groups, results.devices, plot_dir / "graph.png"),
    }
    return {name: path for name, path in drawn.items() if path is not None}
