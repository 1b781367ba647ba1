"""The comparison table: one row per method, as text (the console) and Markdown.

Rows are read from a Results; the speedups shown are the ones stored in each row,
each measured against `unplaced` (and the best heuristic) in the row's own
interleaved session, with the ratio's confidence interval; a "tie" is a ratio
whose interval holds 1. Ratios are shown only on rows of the session that measured
unplaced last (placer.choose.current: another session's compare with an unplaced
median the table does not show); one over an unplaced that is no reference
(placer.choose rules 5 and 7) is in parentheses, tagged "no verdict". `placer
baseline`'s rows are simulated, not measured: its column of times over the lower
bound says so (with --measure the column is measured over the bound, as everywhere,
and unmeasured rows have none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from graphs.devices import format_size
from placer.choose import current, plan_key
from placer.results import MethodResult, Ratio, Results, method_name

__all__ = ["MISSING", "TABLE_HEADERS", "comparison_rows", "table_cells", "format_table", "text_table",
           "markdown_table", "format_markdown_table", "format_bytes", "format_ratio", "same_plan"]

MISSING = "-"
TABLE_HEADERS = ("method", "measured ms", "CI ms", "runs", "vs unplaced", "vs best heuristic", "simulated ms",
                 "x lower bound", "peak memory", "search s", "session", "status")


def as_results(results: Results | dict) -> Results:
    """A Results from a Results or its JSON dict (older, unversioned ones too)."""
    return results if isinstance(results, Results) else Results.from_json(results)


def comparison_rows(results: Results | dict) -> list[MethodResult]:
    """The rows, fastest measured first, unmeasured next (by simulated time),
    infeasible last."""
    def order(row: MethodResult) -> tuple:
        time = row.measured_ms if row.measured else row.simulated_ms
        return (not row.feasible, not row.measured, math.inf if time is None else time)

    return sorted(as_results(results).methods, key=order)


def _num(x: float | None, fmt: str) -> str:
    return MISSING if x is None else format(x, fmt)


def same_plan(results: Results, row: MethodResult) -> MethodResult | None:
    """The first other row of the same plan (placer.choose.plan_key), if any: rows of one
    plan carry one measurement (placer.choose.share_measurements)."""
    key = plan_key(row)
    return None if key is None else next((r for r in results.methods if r is not row and plan_key(r) == key), None)


def format_ratio(ratio: Ratio | None) -> str:
    """"1.12x [1.05, 1.19]", "1.00x tie [0.97, 1.03]", or "-"; a ratio over a reference
    that is no verdict in parentheses: "(5.37x [2.68, 28.57]) no verdict"; a ratio judged
    in an earlier session too (placer.choose rule 8) shows it after its own:
    "1.10x tie [1.05, 1.15], before 1.02x [0.98, 1.06]"."""
    if ratio is None:
        return MISSING
    tie = " tie" if ratio.verdict == "tie" else ""
    before = "".join(f", before {r.value:.2f}x [{r.ci[0]:.2f}, {r.ci[1]:.2f}]" for r in ratio.earlier)
    text = f"{ratio.value:.2f}x{tie} [{ratio.ci[0]:.2f}, {ratio.ci[1]:.2f}]{before}"
    return f"({text}) no verdict" if ratio.verdict == "unmeasured" else text


def format_bytes(n: float | None) -> str:
    """Bytes for people: "1.5 KiB", "30.0 MiB" (graphs.devices.format_size)."""
    return MISSING if n is None else format_size(n)


def table_cells(results: Results | dict) -> tuple[tuple[str, ...], list[list[str]]]:
    """The comparison table as strings: the one source of the text and Markdown tables.
    A `devices` column appears when the placed rows ran on different device sets
    (placer compare of plans made for different devices), a `micro-batches` column
    ("4 gpipe") when a row is pipelined. A row of another session than unplaced's
    last shows no ratio (whatever an older results.json stored); the `vs best heuristic`
    column appears only where a row shows one (where unplaced is chosen, its last
    sessions measure no other plan beside the heuristic: new-user trial s25 saw the
    column empty in every run)."""
    results = as_results(results)
    rows = comparison_rows(results)
    mixed = len({tuple(r.devices) for r in rows if r.kind != "unplaced"}) > 1
    simulated = results.command == "baseline" and not any(r.measured for r in rows)  # placer baseline, unmeasured
    headers = [h if h != "x lower bound" or not simulated else "simulated x lower bound" for h in TABLE_HEADERS]
    piped = any(r.microbatches > 1 for r in rows)
    versus = any(current(results, r) and r.vs_best_heuristic is not None for r in rows)
    headers = (headers[0], *(["devices"] if mixed else []), *(["micro-batches"] if piped else []),
               *(h for h in headers[1:] if versus or h != "vs best heuristic"))
    cells = []
    for r in rows:
        shown = current(results, r)
        memory = ", ".join(f"{d} {format_bytes(b)}" for d, b in r.peak_bytes.items())
        status = "ok" if r.feasible else f"infeasible: {r.reason or 'no reason given'}"
        twin = same_plan(results, r)
        status += f" (same plan as {method_name(twin.method)})" if twin is not None else ""
        ci = f"{r.ci_ms[0]:.2f}-{r.ci_ms[1]:.2f}" if r.measured and r.ci_ms else MISSING
        cells.append([
            method_name(r.method) + (" (chosen)" if r.method == results.best else ""),
            *([",".join(r.devices) or MISSING] if mixed else []),
            *([f"{r.microbatches} {r.schedule or 'gpipe'}" if r.microbatches > 1 else "1"] if piped else []),
            _num(r.measured_ms if r.feasible else None, ".2f"), ci, str(r.runs) if r.runs else MISSING,
            format_ratio(r.vs_unplaced if shown else None),
            *([format_ratio(r.vs_best_heuristic if shown else None)] if versus else []),
            _num(r.simulated_ms, ".2f"),
            _num(r.ratio_to_lower_bound if simulated or r.measured else None, ".2f"), memory or MISSING, _num(r.search_s, ".1f"), r.session or MISSING,
            status,
        ])
    return headers, cells


def text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Aligned plain-text columns under a dashed rule (the console's tables)."""
    widths = [max(len(str(row[i])) for row in [headers, *cells]) for i in range(len(headers))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def format_table(results: Results | dict) -> str:
    """The comparison table as aligned plain text, for the console."""
    return text_table(*table_cells(results))


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A Markdown table (pipes in cells escaped)."""
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, cells)])


def format_markdown_table(results: Results | dict) -> str:
    """The comparison table in Markdown, as used in report.md."""
    return markdown_table(*table_cells(results))
