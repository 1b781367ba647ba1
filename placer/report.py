"""Reports: a results dict (what `optimize` and `compare` return and save as
results.json) in, `report.md` + a self-contained `report.html` with plots out.

The report answers one question: how much faster is each placement than a single
device and than the best heuristic, measured on the real runtime? Everything here
reads the results dict only, and tolerates missing optional keys and None values:
`placer compare` has no learning curve, a run without a simulator has no timeline.

Plots are drawn on `matplotlib.figure.Figure` objects saved as PNG by the Agg
renderer, never through pyplot's global state, so no display is ever needed.
The report content is built once as a list of blocks and rendered twice
(Markdown, HTML), so the two files cannot drift apart.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

METHOD_NAMES = {
    "single": "single device",
    "round_robin": "round robin",
    "expert": "expert",
    "balanced": "balanced",
    "sequential_fill": "sequential fill",
    "metis": "METIS",
    "kernighan_lin": "Kernighan-Lin",
    "etf": "ETF",
    "sct": "SCT",
    "rl": "RL",
}
# Timeline colours: compute phases in blue/orange/green, transfers in grey.
PHASE_COLOURS = {"fwd": "#4C72B0", "bwd": "#DD8452", "opt": "#55A868", "xfer": "#8C8C8C"}
OTHER_COLOURS = ("#B07AA1", "#937860", "#DA8BC3")  # event kinds a newer simulator may add
RL_COLOUR, BASELINE_COLOUR = "#C44E52", "#7A8BA6"
PLOT_FILES = ("step_times.png", "learning_curve.png", "timeline.png", "graph.png")
MISSING = "-"


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


# ----------------------------------------------------------------------------- table

def _kind(entry: dict) -> str:
    return entry.get("kind") or ("rl" if entry.get("method") == "rl" else "baseline")


def _feasible(entry: dict) -> bool:
    return entry.get("feasible") is not False  # missing or None: nothing says otherwise


def _measured(entry: dict) -> float | None:
    """The measured median of a feasible entry, else None: only those are compared."""
    return entry.get("measured_ms") if _feasible(entry) else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def comparison_rows(results: dict) -> list[dict]:
    """One row per method, fastest measured first, unmeasured next, infeasible last.

    Speedups compare measured medians: over a single device (single's / this) and
    over the best heuristic (best feasible measured baseline / this), so a value
    above 1 means this method is faster.
    """
    entries = [e for e in results.get("methods") or [] if e.get("method")]
    single = next((_measured(e) for e in entries if e["method"] == "single"), None)
    baselines = [_measured(e) for e in entries if _kind(e) == "baseline"]
    best_heuristic = min((t for t in baselines if t is not None), default=None)
    lower_bound = (results.get("bounds") or {}).get("lower_bound_ms")

    rows = []
    for e in entries:
        measured = _measured(e)
        ratio = e.get("ratio_to_lower_bound")
        if ratio is None:
            ratio = _ratio(measured, lower_bound)
        rows.append({
            "method": e["method"],
            "kind": _kind(e),
            "feasible": _feasible(e),
            "reason": e.get("reason"),
            "measured_ms": measured,
            "iqr_ms": e.get("iqr_ms"),
            "simulated_ms": e.get("simulated_ms"),
            "speedup_vs_single": _ratio(single, measured),
            "speedup_vs_best_heuristic": _ratio(best_heuristic, measured),
            "ratio_to_lower_bound": ratio,
            "peak_bytes": e.get("peak_bytes") or {},
            "search_s": e.get("search_s"),
        })

    def order(row: dict) -> tuple:
        time = row["measured_ms"] if row["measured_ms"] is not None else row["simulated_ms"]
        return (not row["feasible"], row["measured_ms"] is None, math.inf if time is None else time)

    return sorted(rows, key=order)


def _num(x: float | None, fmt: str) -> str:
    return MISSING if x is None else format(x, fmt)


def _speedup(x: float | None) -> str:
    return MISSING if x is None else f"{x:.2f}x"


def format_bytes(n: float | None) -> str:
    if n is None:
        return MISSING
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n:.0f} B" if power == 0 else f"{n / 1024**power:.1f} {units[power]}"


TABLE_HEADERS = (
    "method", "measured ms", "IQR ms", "simulated ms", "vs single", "vs best heuristic",
    "x lower bound", "peak memory", "search s", "status",
)


def table_cells(results: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    """The comparison table as strings: the one source of both the text and Markdown tables."""
    cells = []
    for r in comparison_rows(results):
        memory = ", ".join(f"{d} {format_bytes(b)}" for d, b in r["peak_bytes"].items())
        status = "ok" if r["feasible"] else f"infeasible: {r['reason'] or 'no reason given'}"
        cells.append([
            method_name(r["method"]),
            _num(r["measured_ms"], ".2f"),
            _num(r["iqr_ms"], ".2f"),
            _num(r["simulated_ms"], ".2f"),
            _speedup(r["speedup_vs_single"]),
            _speedup(r["speedup_vs_best_heuristic"]),
            _num(r["ratio_to_lower_bound"], ".2f"),
            memory or MISSING,
            _num(r["search_s"], ".1f"),
            status,
        ])
    return TABLE_HEADERS, cells


def format_table(results: dict) -> str:
    """The comparison table as aligned plain text, for the console."""
    headers, cells = table_cells(results)
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, cells)])


def format_markdown_table(results: dict) -> str:
    """The comparison table in Markdown, as used in report.md."""
    return _markdown_table(*table_cells(results))


# ----------------------------------------------------------------------------- plots

def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_step_times(methods: Sequence[dict] | None, bounds: dict | None, path: Path) -> Path | None:
    """Bars of each feasible method's measured median with IQR whiskers (half each side
    of the median: only the IQR's width is recorded), RL highlighted, the lower bound
    as a dashed line. None when no method was measured."""
    rows = [r for r in comparison_rows({"methods": methods or []}) if r["measured_ms"] is not None]
    if not rows:
        return None
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4))
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x, [r["measured_ms"] for r in rows],
           yerr=[(r["iqr_ms"] or 0) / 2 for r in rows], capsize=4,
           color=[RL_COLOUR if r["kind"] == "rl" else BASELINE_COLOUR for r in rows])
    lower_bound = (bounds or {}).get("lower_bound_ms")
    if lower_bound is not None:
        ax.axhline(lower_bound, color="black", linestyle="--", linewidth=1,
                   label=f"lower bound {lower_bound:.2f} ms")
        ax.legend(loc="upper left")
    ax.set_xticks(x, [method_name(r["method"]) for r in rows], rotation=30, ha="right")
    ax.set_ylabel("measured step time (ms)")
    ax.set_title("Training step time per placement (median, IQR)")
    return save_figure(fig, path)


def _series(curve: Sequence[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    points = [(p.get(x_key), p.get(y_key)) for p in curve]
    points = [(x, y) for x, y in points if x is not None and y is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_learning_curve(curve: Sequence[dict] | None, path: Path,
                        lower_bound_ms: float | None = None) -> Path | None:
    """The RL search's progress against wall-clock seconds and against samples:
    best simulated and best measured step time so far, and the batch mean.
    None when there is no curve (e.g. `placer compare`)."""
    if not curve:
        return None
    fig = Figure(figsize=(11, 4))
    for ax, (x_key, x_label) in zip(fig.subplots(1, 2), [("elapsed_s", "search time (s)"),
                                                          ("samples", "placements sampled")]):
        ax.plot(*_series(curve, x_key, "mean_ms"), color="#BBBBBB", label="batch mean (simulated)")
        ax.plot(*_series(curve, x_key, "best_sim_ms"), color="#4C72B0", label="best simulated")
        ax.plot(*_series(curve, x_key, "best_measured_ms"), color=RL_COLOUR, marker="o",
                markersize=3, label="best measured")
        if lower_bound_ms is not None:
            ax.axhline(lower_bound_ms, color="black", linestyle="--", linewidth=1, label="lower bound")
        ax.set_xlabel(x_label)
        ax.set_ylabel("step time (ms)")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("RL search progress")
    return save_figure(fig, path)


def plot_timeline(timeline: Sequence[dict] | None, devices: Sequence[str] | None,
                  path: Path) -> Path | None:
    """A Gantt chart of one simulated training step: one row per device, forward,
    backward, optimizer and transfer intervals (and any other event kind) in their
    own colours."""
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
    ax.legend(handles=[Patch(color=colours[k], label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=len(kinds), frameon=False)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("time within one training step (ms, simulated)")
    ax.set_title("Per-device timeline of the chosen placement", loc="left")
    return save_figure(fig, path)


def layered_layout(graph: nx.DiGraph) -> dict[Any, np.ndarray]:
    """Positions for a DAG drawing: x = topological depth (longest path from a source),
    y spread evenly within each depth."""
    for depth, nodes in enumerate(nx.topological_generations(graph)):
        for node in nodes:
            graph.nodes[node]["depth"] = depth
    return nx.multipartite_layout(graph, subset_key="depth")


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
    devices = list(devices or [])
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((u, v) for u, v in groups.get("edges") or [])
    pos = layered_layout(graph)

    fig = Figure(figsize=(12, 6))
    ax = fig.subplots()
    # Area by compute, the largest node as wide as the spacing of the most crowded axis
    # (in points: the axes span about 860 x 360 of them).
    widest = max(Counter(nx.get_node_attributes(graph, "depth").values()).values())
    depths = max(nx.get_node_attributes(graph, "depth").values()) + 1
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


def draw_plots(results: dict, plot_dir: Path) -> dict[str, Path]:
    """Every plot whose data is present, as {file name: path}; missing data skips a plot."""
    bounds = results.get("bounds") or {}
    drawn = {
        "step_times.png": plot_step_times(results.get("methods"), bounds, plot_dir / "step_times.png"),
        "learning_curve.png": plot_learning_curve(results.get("curve"), plot_dir / "learning_curve.png",
                                                  bounds.get("lower_bound_ms")),
        "timeline.png": plot_timeline(results.get("timeline"), results.get("devices"),
                                      plot_dir / "timeline.png"),
        "graph.png": plot_grouped_graph(results.get("groups"), results.get("devices"),
                                        plot_dir / "graph.png"),
    }
    return {name: path for name, path in drawn.items() if path is not None}


# ----------------------------------------------------------------------------- document

PLOT_CAPTIONS = {
    "step_times.png": "Measured step time per method",
    "learning_curve.png": "Learning curve of the RL search",
    "timeline.png": "Simulated per-device timeline of the chosen placement",
    "graph.png": "Grouped graph coloured by device",
}
NOTES = [
    "Measured times are the median of whole training steps (forward, loss, backward, "
    "optimizer step) after warm-up; the spread is the interquartile range.",
    "Speedups are ratios of measured medians: above 1 means faster than a single device "
    "(vs single) or than the fastest feasible heuristic (vs best heuristic).",
    "The lower bound is max(critical path, total work / number of devices) from profiled "
    "costs on the fastest device: no placement can beat it if the profile is right.",
    "Simulated times come from the calibrated simulator that the RL search optimizes.",
]


def _summary(results: dict, rows: list[dict]) -> str:
    """Two sentences: the chosen placement against a single device, and RL against
    the best heuristic (the paper's headline comparison)."""
    measured = [r for r in rows if r["measured_ms"] is not None]
    if not measured:
        return "No placement was measured."
    chosen = next((r for r in measured if r["method"] == results.get("best")), measured[0])
    text = f"Chosen placement: {method_name(chosen['method'])}, {chosen['measured_ms']:.2f} ms per training step"
    if chosen["speedup_vs_single"] is not None:
        text += f", {chosen['speedup_vs_single']:.2f}x the speed of a single device"
    text += "."
    rl = next((r for r in measured if r["kind"] == "rl"), None)
    heuristic = next((r for r in measured if r["kind"] == "baseline"), None)
    if rl and heuristic:
        text += (f" RL against the best heuristic ({method_name(heuristic['method'])}, "
                 f"{heuristic['measured_ms']:.2f} ms): {rl['speedup_vs_best_heuristic']:.2f}x.")
    return text


def _environment(results: dict) -> list[list[str]]:
    memory = results.get("memory") or {}
    caps = ", ".join(f"{d}={format_bytes(b)}" for d, b in memory.items() if b is not None)
    bounds = results.get("bounds") or {}
    items = [
        ("workload", results.get("workload")),
        ("devices", ", ".join(results.get("devices") or [])),
        ("memory caps", caps or "none"),
        ("seed", results.get("seed")),
        ("search budget (s)", results.get("budget_s")),
        ("reward", results.get("reward")),
        ("lower bound (ms)", _num(bounds.get("lower_bound_ms"), ".2f")),
        ("critical path (ms)", _num(bounds.get("critical_path_ms"), ".2f")),
        ("total work (ms)", _num(bounds.get("work_ms"), ".2f")),
        *(results.get("environment") or {}).items(),
    ]
    return [[str(k), str(v)] for k, v in items if v is not None and v != ""]


def _notes(results: dict) -> list[str]:
    """The run's own notes (e.g. what a small zoo size shrank) before the standing ones."""
    notes = [str(note) for note in results.get("notes") or []]
    if results.get("interrupted"):
        notes.insert(0, "The search was interrupted: this is the best placement found until then.")
    return notes + NOTES


def report_blocks(results: dict, plots: dict[str, Path], plan_exists: bool) -> list[tuple]:
    """The report's content, independent of format: ("h1"|"h2"|"p", text),
    ("table", headers, cells), ("image", caption, relative path), ("link", text, path)."""
    rows = comparison_rows(results)
    blocks: list[tuple] = [
        ("h1", f"placer report: {results.get('workload') or 'unknown workload'}"),
        ("p", _summary(results, rows)),
    ]
    if plan_exists:
        blocks.append(("link", "Chosen plan", results["plan"]))
    blocks += [("h2", "Comparison"), ("table", *table_cells(results))]
    for name in PLOT_FILES:
        if name in plots:
            blocks.append(("image", PLOT_CAPTIONS[name], f"plots/{name}"))
    blocks += [("h2", "Environment"), ("table", ("item", "value"), _environment(results)),
               ("h2", "Notes"), *(("p", note) for note in _notes(results))]
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *args in blocks:
        if kind == "h1":
            out.append(f"# {args[0]}")
        elif kind == "h2":
            out.append(f"## {args[0]}")
        elif kind == "p":
            out.append(args[0])
        elif kind == "table":
            out.append(_markdown_table(*args))
        elif kind == "image":
            out.append(f"### {args[0]}\n\n![{args[0]}]({args[1]})")
        elif kind == "link":
            out.append(f"{args[0]}: [{args[1]}]({args[1]})")
    return "\n\n".join(out) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; }
figure { margin: 1.5em 0; }
figcaption { color: #555; font-size: 0.9em; }
"""


def render_html(blocks: list[tuple], base: Path) -> str:
    """Self-contained HTML: every image is read from `base` and embedded as a data URI."""
    esc = html.escape
    out = []
    for kind, *args in blocks:
        if kind == "h1":
            out.append(f"<h1>{esc(args[0])}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{esc(args[0])}</h2>")
        elif kind == "p":
            out.append(f"<p>{esc(args[0])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in args[0])
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in args[1])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "image":
            data = base64.b64encode((base / args[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{esc(args[0])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(args[0])}</figcaption></figure>")
        elif kind == "link":
            out.append(f'<p>{esc(args[0])}: <a href="{esc(args[1])}">{esc(args[1])}</a></p>')
    title = next((args[0] for kind, *args in blocks if kind == "h1"), "placer report")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
            + "\n".join(out) + "\n</body></html>\n")


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/plots/*.png.

    Everything is rendered into a staging folder inside out_dir first and moved into
    place with os.replace only when all of it succeeded, so a failure leaves the
    previous report (or none) untouched, never a half-written one. Returns
    {"markdown": path, "html": path, <plot file name>: path, ...}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        plots = draw_plots(results, staging / "plots")
        plan = results.get("plan")
        blocks = report_blocks(results, plots, plan_exists=bool(plan) and (out_dir / plan).is_file())
        (staging / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
        (staging / "report.html").write_text(render_html(blocks, staging), encoding="utf-8")

        # Commit: plots first, so that a report never links a plot that is not there yet.
        (out_dir / "plots").mkdir(exist_ok=True)
        written = {}
        for name in PLOT_FILES:
            target = out_dir / "plots" / name
            if name in plots:
                os.replace(plots[name], target)
                written[name] = target
        for key, name in (("markdown", "report.md"), ("html", "report.html")):
            os.replace(staging / name, out_dir / name)
            written[key] = out_dir / name
        for name in set(PLOT_FILES) - set(plots):  # left over from an earlier report
            (out_dir / "plots" / name).unlink(missing_ok=True)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
