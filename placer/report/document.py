"""The report document: a Results in, report.md and a self-contained report.html out.

The content is built once as a list of blocks (`report_blocks`) and rendered by two
small renderers (`MarkdownRenderer`, `HtmlRenderer`), so the two files cannot drift
apart. The first line of both is the run's headline (`Results.choice.headline`):
what plan.json holds and whether any plan is measurably faster than running the
model without placer.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from graphs.devices import is_virtual_cpu_name
from placer.choose import current, unmeasured
from placer.measurements import Protocol
from placer.report.plots import PLOT_FILES
from placer.report.table import MISSING, format_bytes, markdown_table, table_cells
from placer.results import Results, method_name

__all__ = ["PLOT_CAPTIONS", "NOTES", "headline", "report_blocks", "MarkdownRenderer", "HtmlRenderer"]

PLOT_CAPTIONS = {
    "step_times.png": "Measured step time per method (median and confidence interval, each from its session)",
    "learning_curve.png": "Learning curve of the search (dotted: recalibrations)",
    "timeline.png": ("Simulated per-device timeline of the chosen placement (each device's idle share: a "
                     "pipeline's bubbles)"),
    "graph.png": "Grouped graph coloured by device",
}
NOTES = [
    "Measured times are medians of whole training steps (forward, loss, backward, optimizer step) after "
    "warm-up. Candidates measured together are interleaved round by round, each running right after each other "
    "equally often within the rounds (a Williams design; A B, B A for two), every step after a short untimed "
    "pause (the measurement target row gives it), all of them to the session's end: until the confidence "
    "interval of every median is within the protocol's "
    "target, or the session's time cap; "
    "the CI column is that interval, runs the timed steps behind it.",
    "Speedups (vs unplaced, and vs best heuristic where that column is shown) are ratios of medians "
    "measured in the same session as the row (its session column), with a bootstrap confidence interval; "
    "above 1 means faster. A ratio whose "
    "interval holds 1 is a tie: neither is measurably faster.",
    "unplaced is the model as you run it without placer (the whole host, or the fastest single device). "
    "The chosen plan was re-measured with unplaced and the best heuristic in two fresh sessions (crosscheck, "
    "in reverse order, then confirm): its speedups come from the confirm session, not from the measurements "
    "that selected it, and a speedup is a verdict only where both sessions give it (\"before\" in a speedup "
    "is the crosscheck's; a tie whose interval excludes 1 is one the crosscheck did not confirm). Where "
    "unplaced could not be measured in the crosscheck session, it alone was held, and no plan is chosen. "
    "Ties go to the simpler plan; unplaced wins every tie.",
    "The lower bound is max(critical path, total work / number of devices) from profiled costs on the "
    "fastest device: no placement can beat it if the profile is right.",
    "Simulated times come from the calibrated simulator that the search optimizes, under the final calibration.",
]


def headline(results: Results) -> str:
    """The report's first line: the choice's headline, or a plain summary of older results."""
    if results.choice.headline:
        return results.choice.headline
    chosen = results.row(results.best) if results.best else None
    if chosen is None or not chosen.measured:
        return "No placement was measured."
    return f"Chosen placement: {method_name(chosen.method)}, {chosen.measured_ms:.2f} ms per training step."


def _protocol_text(protocol: dict) -> str:
    cap = (f"{protocol['cap_per_candidate_s']:g} s per candidate" if protocol.get("cap_per_candidate_s")
           else f"{protocol['cap_s']:g} s")
    pause = f", a {protocol['pause_ms']:g}-ms pause before each step" if protocol.get("pause_ms") else ""
    return (f"CI half-width {protocol['target']:.0%}, at least {protocol['min_runs']} steps, at most {cap} a session"
            f"{pause}")


def _environment(results: Results) -> list[list[str]]:
    caps = ", ".join(f"{d}={format_bytes(b)}" for d, b in (results.memory or {}).items() if b is not None)
    bounds = results.bounds or {}
    protocol = results.protocol or {}

    def ms(key: str) -> str:
        return MISSING if bounds.get(key) is None else f"{bounds[key]:.2f}"

    items = [
        ("workload", results.workload), ("devices", ", ".join(results.devices)), ("memory caps", caps or "none"),
        ("seed", results.seed), ("search budget (s)", results.budget_s), ("reward", results.reward),
        ("measurement target", _protocol_text(protocol) if protocol.get("target") else None),
        ("lower bound (ms)", ms("lower_bound_ms")), ("critical path (ms)", ms("critical_path_ms")),
        ("work / devices (ms)", ms("work_ms")), ("run", results.run_id or None),
        *(results.environment or {}).items(),
    ]
    return [[str(k), str(v)] for k, v in items if v is not None and v != ""]


def _reading(results: Results) -> list[str]:
    """How to read the ratios that are no current verdict (placer.report.table.format_ratio)."""
    notes = []
    try:  # the run's protocol (None: an older results.json without one)
        protocol = Protocol(**results.protocol) if results.protocol else None
    except (TypeError, ValueError):
        protocol = None
    reason = unmeasured(results.unplaced, protocol)
    if reason is not None:
        notes.append(f"{reason[:1].upper()}{reason[1:]}.")
    if any(r.vs_unplaced is not None and r.vs_unplaced.verdict == "unmeasured" for r in results.methods):
        cause = "other processes held its cores while it was timed" if results.unplaced is not None and \
            results.unplaced.busy is not None else "its confidence interval stayed far wider than the protocol's target"
        notes.append(f"Ratios marked \"no verdict\" are over an unplaced measurement that is no reference ({cause}): "
                     f"no plan is judged by them.")
    below = [r.method for r in results.methods if r.measured and r.ratio_to_lower_bound is not None
             and r.ratio_to_lower_bound < 1]
    if below:
        notes.append(f"{method_name(below[0])}{' and others' if len(below) > 1 else ''} measured below the lower "
                     f"bound (x lower bound < 1): the profile the bound comes from was taken while the host ran "
                     f"slower (busy, or its speed wandered), so here it bounds nothing. To profile again, remove the "
                     f"profile-*.json files of the cache folder ($PLACER_CACHE, default ~/.cache/placer) and run on a "
                     f"quiet host.")
    notes += _why_chosen(results)
    if any(not current(results, r) for r in results.methods if r.measured):
        notes.append(f"Speedups are shown only for rows measured in the {results.unplaced.session} session, which "
                     f"measured unplaced last{_ms(results.unplaced.measured_ms)}: a row of another session "
                     f"(its session column) was compared there with unplaced as that session found it, so its "
                     f"ratios are left out rather than set against a median shown nowhere.")
    return notes


def _why_chosen(results: Results) -> list[str]:
    """What a reader of a win asks (new-user trial 9): why a plan beats unplaced on virtual
    CPU devices, and why a row measured faster than the chosen plan was not chosen."""
    chosen = results.row(results.choice.method) if results.choice.method else None
    if chosen is None or not chosen.measured:
        return []
    notes = []
    devices = chosen.devices or results.devices
    used = {devices[d] for d in chosen.placement or () if d < len(devices)}
    unplaced_on_host = results.unplaced is not None and results.unplaced.devices in ([], ["cpu"])
    if results.choice.verdict == "faster" and chosen.kind != "unplaced" and unplaced_on_host and len(used) > 1 \
            and all(map(is_virtual_cpu_name, used)):
        notes.append(f"Why {method_name(chosen.method)} wins: unplaced runs every op on all the host's cores "
                     f"(intra-op threads); the plan runs its parts side by side on CPU devices of a share of the "
                     f"cores each, which pays where ops gain little from more threads. placer.apply gives your "
                     f"training loop's thread that share; another torch.set_num_threads after apply can lose the win.")
    faster = sorted((r for r in results.methods if r.measured and r.method != chosen.method
                     and r.measured_ms < chosen.measured_ms), key=lambda r: r.measured_ms)
    if faster and chosen.kind != "unplaced":  # unplaced's headline says no plan is measurably faster
        notes.append(f"{method_name(faster[0].method)}{' and others' if len(faster) > 1 else ''} measured faster "
                     f"than {method_name(chosen.method)}, but not measurably so where both were measured together "
                     f"(the final session picks the simplest plan within the fastest one's interval), or in a "
                     f"session without it: {method_name(chosen.method)} was chosen.")
    return notes


def _ms(value: float | None) -> str:
    return f" ({value:.2f} ms)" if value is not None else ""


def _notes(results: Results) -> list[str]:
    """The run's own notes (e.g. what a small zoo size shrank) before the standing ones; a row's
    note, which results.notes repeats for the terminal, once, after the name of its method."""
    of_rows = {note for row in results.methods for note in row.notes}
    notes = [*_reading(results), *(str(note) for note in results.notes if note not in of_rows)]
    if results.interrupted:
        word = "terminated" if results.status == "terminated" else "interrupted"
        where = f" during {results.interrupted_at}" if results.interrupted_at else ""
        notes.insert(0, f"The run was {word}{where}: this is what it had measured until then.")
    for row in results.methods:
        notes += [note if note.startswith(row.method) else f"{method_name(row.method)}: {note}" for note in row.notes]
    return list(dict.fromkeys(notes)) + NOTES


def report_blocks(results: Results, plots: dict[str, Path], plan_exists: bool) -> list[tuple]:
    """The report's content, independent of format: ("h1"|"h2"|"p"|"lead", text),
    ("table", headers, cells), ("image", caption, relative path), ("link", text, path)."""
    blocks: list[tuple] = [("lead", headline(results)),
                           ("h1", f"placer report: {results.workload or 'unknown workload'}")]
    if plan_exists:
        blocks.append(("link", "Chosen plan", results.plan))
    blocks += [("h2", "Comparison"), ("table", *table_cells(results))]
    blocks += [("image", PLOT_CAPTIONS[name], f"plots/{name}") for name in PLOT_FILES if name in plots]
    blocks += [("h2", "Environment"), ("table", ("item", "value"), _environment(results)),
               ("h2", "Notes"), *(("p", note) for note in _notes(results))]
    return blocks


class MarkdownRenderer:
    """Blocks -> Markdown text (images and links relative to the report's folder)."""

    def render(self, blocks: list[tuple]) -> str:
        """report.md's text."""
        out = []
        for kind, *args in blocks:
            if kind == "lead":
                out.append(f"**{args[0]}**")
            elif kind == "h1":
                out.append(f"# {args[0]}")
            elif kind == "h2":
                out.append(f"## {args[0]}")
            elif kind == "p":
                out.append(args[0])
            elif kind == "table":
                out.append(markdown_table(*args))
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
p.lead { font-size: 1.15em; font-weight: 600; }
"""


class HtmlRenderer:
    """Blocks -> one self-contained HTML page: every image is read from `base` and
    embedded as a data URI, nothing is fetched from elsewhere."""

    def __init__(self, base: Path):
        self.base = base

    def render(self, blocks: list[tuple]) -> str:
        """report.html's text."""
        esc = html.escape
        out = []
        for kind, *args in blocks:
            if kind == "lead":
                out.append(f'<p class="lead">{esc(args[0])}</p>')
            elif kind in ("h1", "h2"):
                out.append(f"<{kind}>{esc(args[0])}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{esc(args[0])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{esc(h)}</th>" for h in args[0])
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in args[1])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                data = base64.b64encode((self.base / args[1]).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{esc(args[0])}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{esc(args[0])}</figcaption></figure>")
            elif kind == "link":
                out.append(f'<p>{esc(args[0])}: <a href="{esc(args[1])}">{esc(args[1])}</a></p>')
        title = next((args[0] for kind, *args in blocks if kind == "h1"), "placer report")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{esc(title)}</title><style>{HTML_STYLE}</style></head>\n<body>\n"
                + "\n".join(out) + "\n</body></html>\n")
