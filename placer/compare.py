"""`placer compare`: measure saved plans side by side, with the unplaced model, and
write the same report as optimize (no plan is written).

All plans and `unplaced` are measured in one interleaved session (`compare`), each
row with its speedup over unplaced measured there; the fastest by the choice rules
(placer.choose) is then measured again with unplaced and the best heuristic in a
fresh session in reverse order (`crosscheck`), then in order (`confirm`), from which its
claimed speedups come, with the verdicts both sessions give (placer.choose rule 8).

The plans must be for the workload's model, but may be for different devices (a
plan on `cpu` beside one on `cpu:0,cpu:1`, as optimize writes when unplaced wins):
each runs on its own devices, which this host must have. Each device set has its
problem (placer.choose counts a row's cut edges on its own); the unplaced model runs
on a GPU where some set's profile makes one the fastest device, else on the whole
host; the lower bound is the least of the sets' bounds, so no row can beat it.

A row's placement and simulated step time come from the plan's `assignment` on its
problem, not from the plan's stored `placement` and `simulated_ms`: a hand edit of
plan.json changes the assignment only, and two plans with one stored placement would
otherwise count as one candidate (placer.choose.plan_key) and share a measurement.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from envs.calibrate import load_calibration
from envs.sim import Simulator
from graphs.errors import PlacerError, PlanError
from graphs.files import folder_problem
from graphs.problem import PlacementProblem, build_problem
from graphs.trace import fingerprint, trace_model
from graphs.workload import load_workload
from placer.choose import confirm, fill, pick, settle_ratios, verdict_choice
from placer.optimize import bounds_of
from placer.book import MeasurementBook
from placer.measurements import UNPLACED, Measurer, Protocol, unplaced_device
from placer.plan import Plan, load_plan, mismatch_message, plan_cluster
from placer.report import publish
from placer.results import MethodResult, Progress, Results, environment, quiet, warn_stderr
from placer.runtime.timing import Measurement

__all__ = ["compare"]


def compare(workload: str, plans: Sequence[str | Path], out_dir: Path | None = None, protocol: Protocol | None = None,
            progress: Progress = quiet, warn: Callable[[str], None] = warn_stderr, command: str = "") -> Results:
    """Measure `plans` of `workload`, each on its own devices, and the unplaced model
    together; write results.json and the report into out_dir (default
    placer-out/<name>-compare). A file given more than once is measured once, in one
    row (a note says so); a plan that runs the whole model on unplaced's device is
    noted as the unplaced model run through placer's runtime.

    Returns
    -------
    Results (command "compare"; devices: every device some plan places on, in order;
    choice: the fastest plan by the choice rules, or unplaced when no plan is
    measurably faster).

    Raises
    ------
    PlanError
        A plan cannot be read, or was made for another model than `workload` (before
        anything is profiled, measured or written).
    DeviceSpecError
        A plan names a device this host lacks (before the workload is loaded).
    PlacerError
        The output folder cannot be written; the workload cannot be loaded or captured.
    """
    protocol = protocol or Protocol()
    given = [Path(p).resolve() for p in plans]
    plans = list({Path(p).resolve(): p for p in plans}.values())  # a file given twice: one row, in first place
    repeated = [str(p) for p in plans if given.count(Path(p).resolve()) > 1]
    loaded_plans: list[Plan] = [load_plan(p) for p in plans]
    for plan in loaded_plans:
        plan_cluster(plan)  # a device this host lacks: refused naming the plan, before the workload loads
    device_sets = list(dict.fromkeys(tuple(plan.devices) for plan in loaded_plans))
    if out_dir is not None and (problem := folder_problem(out_dir)):
        raise PlacerError(f"--out {out_dir} {problem}: choose a folder you can write")
    loaded = load_workload(workload)
    # The fingerprint of the workload's capture as each plan made it (the batch dims it kept free; traces cached).
    for plan in loaded_plans:
        this_model = fingerprint(loaded.model, trace_model(loaded.model, loaded.leaf_modules, inputs=loaded.inputs,
                                                           batch_dims=plan.capture.batch_dims).gm)
        if plan.fingerprint != this_model:
            raise PlanError(mismatch_message(plan, this_model))
    out = Path(out_dir) if out_dir is not None else Path("placer-out") / f"{loaded.name}-compare"
    problems = [build_problem(loaded, ",".join(devices)) for devices in device_sets]
    host = next((p for p in problems if unplaced_device(p) != "cpu"), problems[0])  # GPU costs: one profile for all
    out.mkdir(parents=True, exist_ok=True)
    results = Results(command="compare", run_id=uuid.uuid4().hex[:12], workload=workload,
                      devices=list(dict.fromkeys(d for devices in device_sets for d in devices)),
                      protocol=protocol.to_json(), environment=environment(command), notes=list(loaded.notes),
                      bounds=min((bounds_of(p, load_calibration(p)) for p in problems),
                                 key=lambda b: b["lower_bound_ms"]))
    if repeated:
        results.notes.append(f"{', '.join(repeated)} given more than once: measured once, in one row")
    measurer = Measurer(loaded, host, MeasurementBook({}), protocol, progress=progress)
    rows = [MethodResult(UNPLACED, "unplaced", devices=[unplaced_device(host)])]
    methods = [plan.method for plan in loaded_plans]
    simulators = [Simulator(p, load_calibration(p)) for p in problems]
    for path, plan in zip(plans, loaded_plans):
        # Bare method names where they are unique; files tell apart plans of one method.
        name = plan.method if methods.count(plan.method) == 1 and plan.method != UNPLACED \
            else f"{plan.method} ({Path(path).name})"
        at = device_sets.index(tuple(plan.devices))
        placement = placement_of(problems[at], plan)
        simulated = None if placement is None else simulators[at].simulate(placement, plan.microbatches)
        rows.append(MethodResult(name, _kind(plan.method), placement=placement, devices=list(plan.devices),
                                 microbatches=plan.microbatches, schedule=plan.schedule, plan=str(path),
                                 simulated_ms=simulated.step_ms if simulated is not None and simulated.feasible
                                 else None))
        if placement is None:
            rows[-1].notes.append(f"{name}: not simulated: its assignment does not keep each of this profile's "
                                  f"groups on one device (a hand edit, or a plan made with another --max-groups)")
        elif not simulated.feasible:
            rows[-1].notes.append(f"{name}: not simulated: {simulated.reason}")
        if list(plan.devices) == rows[0].devices and plan.microbatches <= 1:
            rows[-1].notes.append(f"{name}: the unplaced model (the whole model on {plan.devices[0]}, as unplaced "
                                  f"runs it), through placer's runtime")
    results.methods = rows
    by_name = dict(zip([r.method for r in rows[1:]], loaded_plans))

    def session(chosen: Sequence[MethodResult], stage: str) -> dict[str, Measurement]:
        """Measure the chosen rows (their plans, unplaced eagerly) in one session; fill them."""
        measured = measurer.session([(r.method, by_name.get(r.method)) for r in chosen], stage)
        _fill(results, measured, stage, protocol)
        return measured

    try:
        winner = pick(rows, session(rows, "compare"), problems, protocol)
        heuristic, shortlist = results.best_heuristic, [r.method for r in rows]
        placed = {r.method: r for r in (winner, heuristic) if r is not None and r.kind != "unplaced"}
        judged = [rows[0], *placed.values()]

        def measure(stage: str, reverse: bool) -> list[MethodResult]:
            session(judged[::-1] if reverse else judged, stage)
            return judged[1:]

        results.choice = (verdict_choice(None, results.unplaced, "compare", shortlist, rows[0].devices[0])
                          if winner is None else
                          confirm(winner, heuristic, results, measure, shortlist, rows[0].devices[0],
                                  writes_plan=False, protocol=protocol))
        settle_ratios(results)
        results.notes = list(dict.fromkeys([*results.notes, *(n for r in rows for n in r.notes)]))
    except KeyboardInterrupt:
        results.status, results.interrupted_at = "interrupted", "measuring"
        raise
    results.paths = {k: str(v) for k, v in publish(results, out, None, warn).items()}
    return results


def placement_of(problem: PlacementProblem, plan: Plan) -> list[int] | None:
    """Group id -> device index of `problem`'s cluster, as `plan.assignment` places
    each group's member nodes; None where a group's members are on several devices
    (or on a device the cluster lacks). `plan` must be for the problem's capture."""
    index = {name: i for i, name in enumerate(problem.cluster.names)}
    placement = []
    for g in range(problem.n_groups):
        devices = {plan.assignment.get(m) for m in problem.groups.nodes[g]["members"]}
        if len(devices) != 1 or (device := devices.pop()) not in index:
            return None
        placement.append(index[device])
    return placement


def _kind(method: str) -> str:
    """A plan's row kind from its method (a saved unplaced plan runs through placer: a baseline)."""
    return {"rl": "rl", "random_search": "search", "local_search": "search"}.get(method, "baseline")


def _fill(results: Results, measured: dict[str, Measurement], session: str, protocol: Protocol) -> None:
    """Fill the measured rows, with speedups over unplaced and the session's best baseline
    (no verdict over an unplaced the protocol could not measure: placer.choose)."""
    bound = results.bounds.get("lower_bound_ms")
    unplaced = measured.get(UNPLACED)
    baselines = {r.method: measured[r.method] for r in results.methods
                 if r.kind == "baseline" and r.method in measured and measured[r.method].feasible}
    heuristic = min(baselines.items(), key=lambda kv: kv[1].median_ms, default=None)
    for row in results.methods:
        if row.method in measured:
            fill(row, measured[row.method], session, unplaced, heuristic, bound, protocol)
