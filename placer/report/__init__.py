"""Reports: a Results (what `optimize` and `compare` produce and save as results.json)
in; report.md, a self-contained report.html and plots out.

    table.py      the comparison table (text for the console, Markdown)
    plots.py      the PNG plots
    document.py   the report's blocks and its two renderers (Markdown, HTML)

`publish` writes all of one run's files together (plan, results, report);
`write_report` (re-)renders the report of a Results alone (`placer report`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from placer.interrupts import Terminated, deferred
from placer.plan import Plan
from placer.report.document import HtmlRenderer, MarkdownRenderer, report_blocks
from placer.report.plots import PLOT_FILES, draw_plots, save_figure
from placer.report.table import comparison_rows, format_bytes, format_markdown_table, format_table, text_table
from placer.results import Results, method_name, warn_stderr

__all__ = ["publish", "write_report", "render_report", "format_table", "format_markdown_table", "comparison_rows",
           "text_table", "format_bytes", "method_name", "save_figure", "PLOT_FILES", "REPORT_FILES",
           "UNCONFIRMED_PLAN"]

REPORT_FILES = ("report.md", "report.html")
UNCONFIRMED_PLAN = "plan.unconfirmed.json"  # an earlier plan.json, set aside by a run that chose no plan


def render_report(results: Results, folder: Path, plan_exists: bool) -> list[str]:
    """Draw the plots into folder/plots and write folder/report.md and report.html;
    returns the files written, relative to `folder` (plots first)."""
    plots = draw_plots(results, folder / "plots")
    blocks = report_blocks(results, plots, plan_exists)
    (folder / "report.md").write_text(MarkdownRenderer().render(blocks), encoding="utf-8")
    (folder / "report.html").write_text(HtmlRenderer(folder).render(blocks), encoding="utf-8")
    return [f"plots/{name}" for name in plots] + list(REPORT_FILES)


def _swap_in(staging: Path, out_dir: Path, files: list[str], stale: list[str]) -> dict[str, Path]:
    """Move `files` from staging into out_dir and delete `stale` there, with Ctrl-C
    and SIGTERM held back, so that a reader never finds two runs' files side by side."""
    written = {}
    with deferred():
        (out_dir / "plots").mkdir(exist_ok=True)
        for name in files:
            os.replace(staging / name, out_dir / name)
            written[name] = out_dir / name
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
    return written


def _stale(kept: list[str]) -> list[str]:
    return [name for name in [*(f"plots/{p}" for p in PLOT_FILES), *REPORT_FILES] if name not in kept]


def write_report(results: Results | dict, out_dir: Path) -> dict[str, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/plots/*.png.

    Everything is rendered into a staging folder inside out_dir and moved into place
    only when all of it succeeded, so a failure leaves the previous report (or none)
    untouched, never a half-written one; plots of an earlier report that this one
    lacks are removed.

    Returns
    -------
    {"markdown": path, "html": path, <plot file name>: path, ...}

    Raises
    ------
    OSError
        out_dir cannot be written; whatever the plotting raises, with nothing changed.
    """
    results = results if isinstance(results, Results) else Results.from_json(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        files = render_report(results, staging, plan_exists=bool(results.plan) and (out_dir / results.plan).is_file())
        written = _swap_in(staging, out_dir, files, _stale(files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _named(written)


def _named(written: dict[str, Path]) -> dict[str, Path]:
    keys = {"report.md": "markdown", "report.html": "html", "results.json": "results", "plan.json": "plan"}
    return {keys.get(name, name.removeprefix("plots/")): path for name, path in written.items()}


def publish(results: Results, out_dir: Path, plan: Plan | None = None,
            warn: Callable[[str], None] = warn_stderr) -> dict[str, Path]:
    """Write one run's files together: plan.json, results.json, report.md, report.html
    and plots/*.png.

    All are staged inside out_dir and swapped in together with Ctrl-C and SIGTERM held
    back; results.json and the report carry the run's run_id. A Ctrl-C (or SIGTERM)
    while the report is drawn stops the report only: results.json says so
    (interrupted at "report") and the previous run's report files are removed rather
    than left beside this run's results. A file that cannot be written (disk full,
    permissions) is a warning naming it and the cause; plan.json is still written
    when it can be. An optimize run that chose no plan (`plan` None: no verdict) renames
    an earlier plan.json in out_dir to UNCONFIRMED_PLAN, so that no training loop
    applies a plan this run could not confirm, and its headline says so.

    Returns
    -------
    {"plan": path, "results": path, "markdown": path, "html": path, <plot>: path}
    for the files written.
    """
    out_dir = Path(out_dir)
    if plan is None and results.command == "optimize":
        _set_aside(results, out_dir, warn)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".run-", dir=out_dir))
    except OSError as exc:
        warn(f"cannot write in {out_dir} ({exc.strerror or exc}): writing plan.json and results.json directly")
        return _direct(results, out_dir, plan, warn)
    try:
        files: list[str] = []
        if plan is not None and _try(warn, out_dir / "plan.json", lambda: plan.save(staging / "plan.json")):
            files.append("plan.json")
        results.plan = "plan.json" if plan is not None else None
        report: list[str] = []
        try:
            report = render_report(results, staging, plan_exists=plan is not None)
        except KeyboardInterrupt as exc:
            results.status = "terminated" if isinstance(exc, Terminated) else "interrupted"
            results.interrupted_at = "report"
            results.notes.append("The report was not written (interrupted); render it with "
                                 "`placer report results.json`.")
        except OSError as exc:
            warn(f"cannot write the report in {out_dir} ({exc.strerror or exc}); render it later with "
                 f"`placer report {out_dir / 'results.json'}`")
        if _try(warn, out_dir / "results.json", lambda: results.save(staging / "results.json")):
            files.append("results.json")
        try:
            written = _swap_in(staging, out_dir, report + files, _stale(report))
        except OSError as exc:
            warn(f"cannot move this run's files into {out_dir} ({exc.strerror or exc})")
            return _direct(results, out_dir, plan, warn)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if plan is not None and "plan.json" not in written:  # staging failed: the plan alone may still fit
        if _try(warn, out_dir / "plan.json", lambda: plan.save(out_dir / "plan.json")):
            written["plan.json"] = out_dir / "plan.json"
    return _named(written)


def _set_aside(results: Results, out_dir: Path, warn: Callable[[str], None]) -> None:
    """Rename out_dir/plan.json (an earlier run's) to UNCONFIRMED_PLAN and say so in the headline."""
    earlier = out_dir / "plan.json"
    if earlier.is_file() and _try(warn, earlier, lambda: os.replace(earlier, out_dir / UNCONFIRMED_PLAN)):
        results.choice.headline += (f" The earlier plan.json in {out_dir} is renamed {UNCONFIRMED_PLAN}, so that no "
                                    f"training loop applies it unconfirmed.")


def _direct(results: Results, out_dir: Path, plan: Plan | None, warn: Callable[[str], None]) -> dict[str, Path]:
    written = {}
    for name, save in (("plan.json", plan.save if plan is not None else None), ("results.json", results.save)):
        if save is not None and _try(warn, out_dir / name, lambda: save(out_dir / name)):
            written[name] = out_dir / name
    return _named(written)


def _try(warn: Callable[[str], None], path: Path, write: Callable[[], object]) -> bool:
    """Run a write; a failure is one warning naming `path` and the cause."""
    try:
        write()
        return True
    except OSError as exc:
        warn(f"cannot write {path}: {exc.strerror or exc}")
        return False
