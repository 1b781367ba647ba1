"""`placer compare`: measure saved plans side by side, with the unplaced model, and
write the same report as optimize (no plan is written).

All plans and `unplaced` are measured in one interleaved session (`compare`), each
row with its speedup over unplaced measured there; the fastest by the choice rules
(placer.choose) is then measured again with unplaced and the best heuristic in a
fresh session (`confirm`), from which its claimed speedups come.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from envs.calibrate import load_calibration
from graphs.errors import PlacerError, PlanError
from graphs.files import folder_problem
from graphs.problem import build_problem
from graphs.workload import load_workload
from placer.choose import fill, pick, verdict_choice
from placer.optimize import bounds_of
from placer.measurements import UNPLACED, MeasurementBook, Measurer, Protocol, run_session, unplaced_device
from placer.plan import Plan, load_plan
from placer.report import publish
from placer.results import MethodResult, Progress, Results, environment, quiet, warn_stderr
from placer.runtime.timing import Measurement, PlacedTrial

__all__ = ["compare"]


def compare(workload: str, plans: Sequence[str | Path], out_dir: Path | None = None, protocol: Protocol | None = None,
            progress: Progress = quiet, warn: Callable[[str], None] = warn_stderr, command: str = "") -> Results:
    """Measure `plans` of `workload` and the unplaced model together; write
    results.json and the report into out_dir (default placer-out/<name>-compare).

    Returns
    -------
    Results (command "compare"; choice: the fastest plan by the choice rules, or
    unplaced when no plan is measurably faster).

    Raises
    ------
    PlanError
        A plan cannot be read, or the plans are for different devices (before any work).
    PlacerError
        The output folder cannot be written.
    """
    protocol = protocol or Protocol()
    loaded_plans: list[Plan] = [load_plan(p) for p in plans]
    for path, plan in zip(plans, loaded_plans):
        if plan.devices != loaded_plans[0].devices:
            raise PlanError(f"{path} places on {','.join(plan.devices)} but {plans[0]} on "
                            f"{','.join(loaded_plans[0].devices)}: compare plans made for the same devices")
    if out_dir is not None and (problem := folder_problem(out_dir)):
        raise PlacerError(f"--out {out_dir} {problem}: choose a folder you can write")
    loaded = load_workload(workload)
    out = Path(out_dir) if out_dir is not None else Path("placer-out") / f"{loaded.name}-compare"
    problem = build_problem(loaded, ",".join(loaded_plans[0].devices))
    out.mkdir(parents=True, exist_ok=True)
    results = Results(command="compare", run_id=uuid.uuid4().hex[:12], workload=workload,
                      devices=list(loaded_plans[0].devices), protocol=protocol.to_json(),
                      environment=environment(command), notes=list(loaded.notes),
                      bounds=bounds_of(problem, load_calibration(problem)))
    measurer = Measurer(loaded, problem, MeasurementBook({}), protocol, progress=progress)
    rows = [MethodResult(UNPLACED, "unplaced", devices=[unplaced_device(problem)])]
    methods = [plan.method for plan in loaded_plans]
    for path, plan in zip(plans, loaded_plans):
        # Bare method names where they are unique; files tell apart plans of one method.
        name = plan.method if methods.count(plan.method) == 1 and plan.method != UNPLACED \
            else f"{plan.method} ({Path(path).name})"
        rows.append(MethodResult(name, _kind(plan.method), placement=plan.placement, devices=list(plan.devices),
                                 microbatches=plan.microbatches, schedule=plan.schedule,
                                 simulated_ms=plan.simulated_ms, plan=str(path)))
    results.methods = rows
    by_name = dict(zip([r.method for r in rows[1:]], loaded_plans))
    try:
        measured = _session(measurer, by_name, rows, protocol, "compare")
        _fill(results, measured, "compare")
        winner = pick(rows, measured, problem)
        if winner is not None:
            judged = {r.method: r for r in (winner, results.best_heuristic) if r is not None and r.kind != "unplaced"}
            confirm = _session(measurer, by_name, [rows[0], *judged.values()], protocol, "confirm")
            _fill(results, confirm, "confirm")
        results.choice = verdict_choice(winner, results.unplaced, "confirm", [r.method for r in rows],
                                        rows[0].devices[0])
    except KeyboardInterrupt:
        results.status, results.interrupted_at = "interrupted", "measuring"
        raise
    results.paths = {k: str(v) for k, v in publish(results, out, None, warn).items()}
    return results


def _kind(method: str) -> str:
    """A plan's row kind from its method (a saved unplaced plan runs through placer: a baseline)."""
    return {"rl": "rl", "random_search": "search", "local_search": "search"}.get(method, "baseline")


def _session(measurer: Measurer, plans: dict[str, Plan], rows: Sequence[MethodResult], protocol: Protocol,
             stage: str) -> dict[str, Measurement]:
    """One interleaved session of `rows` (their plans, unplaced eagerly)."""
    p = protocol
    trials = [measurer.trial(None, UNPLACED) if row.kind == "unplaced"
              else PlacedTrial(measurer.workload, plans[row.method], label=row.method, warmup=p.warmup,
                               step_timeout_s=p.step_timeout_s, clock=measurer.clock)
              for row in rows]
    return dict(zip([r.method for r in rows], run_session(trials, protocol, measurer.clock, measurer.progress, stage)))


def _fill(results: Results, measured: dict[str, Measurement], session: str) -> None:
    """Fill the measured rows, with speedups over unplaced and the session's best baseline."""
    bound = results.bounds.get("lower_bound_ms")
    unplaced = measured.get(UNPLACED)
    baselines = {r.method: measured[r.method] for r in results.methods
                 if r.kind == "baseline" and r.method in measured and measured[r.method].feasible}
    heuristic = min(baselines.items(), key=lambda kv: kv[1].median_ms, default=None)
    for row in results.methods:
        if row.method in measured:
            fill(row, measured[row.method], session, unplaced, heuristic, bound)
