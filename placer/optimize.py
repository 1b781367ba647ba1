"""`placer optimize`: the whole job, from a workload to a measured plan and a report.

    check every input, then load + capture + profile + group  -> PlacementProblem  (graphs/)
    every baseline, and unplaced, measured in one session     -> rows, calibration (placer.baselines)
    fit the simulator to those measurements                   (placer.scorer -> envs.calibrate)
    the searches on the calibrated simulator                  (placer.rl / placer.search)
    the honest final choice, in two fresh sessions            (placer.choose)
    plan.json, results.json, report.{md,html} written together (placer.report.publish)

Every measurement is kept in DIR/measurements.json as soon as it is made, so that a
run interrupted (Ctrl-C, SIGTERM, a kill) and resumed with `--resume` repeats none
of them; the RL search checkpoints itself in DIR/search/. Ctrl-C or SIGTERM at any
stage keeps what was measured: the best plan so far is written and results.json
says where the run was stopped (no plan is written when unplaced could not be
measured: placer.choose rule 5). Stopped before any plan was chosen, the run says
what it kept and that `--resume` continues.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from envs.calibrate import load_calibration
from envs.sim import Calibration
from graphs.bounds import cost_floor, lower_bound
from graphs.devices import host_cores, parse_cluster
from graphs.errors import DeviceSpecError, InfeasibleError, PlacerError
from graphs.files import folder_problem
from graphs.problem import Candidate, PlacementProblem, build_problem
from graphs.workload import load_workload
from placer.baselines import HEURISTICS
from placer.baselines.common import colocation_units, require_fit
from placer.choose import confirm, fill, pick, settle_ratios, share_measurements, verdict_choice
from placer.interrupts import Terminated, interruption
from placer.microbatch_policy import absent_counts, microbatch_notes, microbatches_off
from placer.book import MeasurementBook, candidate_key
from placer.measurements import UNPLACED, Measurer, Protocol, unplaced_device, unplaced_plan
from placer.plan import Plan, make_plan
from placer.report import publish
from placer.run_folder import check_fresh, check_resume
from placer.results import MethodResult, Progress, Results, Stage, environment, quiet, warn_stderr
from placer.scorer import Scorer
from placer.search import microbatch_options
from placer.search_stage import SEARCHES, SearchOptions, run_search

__all__ = ["optimize", "DEFAULT_WORKLOAD", "DEFAULT_BUDGET_S", "check_inputs", "baseline_rows",
           "measure_baselines", "bounds_of", "SHORTLIST"]

DEFAULT_WORKLOAD = "zoo:nmt:medium"
DEFAULT_BUDGET_S = 120.0
SHORTLIST = 3  # measured candidates re-measured in the final session (besides the searches' and unplaced)
RESUME_KEYS = ("workload", "devices", "memory", "max_groups", "workers")  # checked before any work


def check_inputs(devices: str | None, memory: str | None, budget_s: float, methods: Sequence[str],
                 out_dir: Path | None, workers: int) -> None:
    """Every check that needs no work, so that a bad input is found before any.

    Raises
    ------
    DeviceSpecError, PlacerError
        A bad --devices/--memory, budget, method name (or none), worker count (more than the
        cores, or more than one with CPU devices: placer.runtime.pool.check_workers) or output folder.
    """
    from placer.runtime.pool import check_workers

    cluster = parse_cluster(devices, memory)
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise PlacerError(f"--budget {budget_s}: give a finite number of seconds > 0")
    if not methods:
        raise PlacerError(f"--methods names no method: give some of {', '.join([*HEURISTICS, *SEARCHES])}, or leave "
                          f"it out for every baseline and rl")
    unknown = [m for m in methods if m not in HEURISTICS and m not in SEARCHES]
    if unknown:
        raise PlacerError(f"unknown method {unknown[0]!r}; choose from {', '.join([*HEURISTICS, *SEARCHES])}")
    check_workers(workers, cluster)
    if out_dir is not None and (problem := folder_problem(out_dir)):
        raise PlacerError(f"--out {out_dir} {problem}: choose a folder you can write")


def baseline_rows(problem: PlacementProblem, names: Sequence[str], seed: int,
                  progress: Progress = quiet) -> tuple[list[MethodResult], dict[str, Candidate]]:
    """Each baseline's row (placement, compute seconds; infeasible ones with their
    reason) and the candidate of each feasible one, by method."""
    rows, candidates = [], {}
    for i, name in enumerate(names):
        progress(Stage("baselines", i, len(names), {"method": name}))
        start = time.perf_counter()
        try:
            outcome = HEURISTICS[name](problem, seed)
        except InfeasibleError as error:
            outcome = error
        row = MethodResult(name, "baseline", devices=problem.cluster.names, search_s=time.perf_counter() - start)
        if isinstance(outcome, InfeasibleError):
            row.feasible, row.reason = False, str(outcome)
        else:  # a placement, or a Candidate (with micro-batches: the pipeline heuristic)
            candidate = outcome if isinstance(outcome, Candidate) else Candidate(tuple(outcome))
            row.placement, row.microbatches = list(candidate.placement), candidate.microbatches
            row.schedule = "gpipe" if candidate.microbatches > 1 else None
            candidates[name] = candidate
        rows.append(row)
    return rows, candidates


def bounds_of(problem: PlacementProblem, calibration: Calibration | None = None, *, on_host: bool = True) -> dict:
    """The problem's lower bound (graphs.bounds: costs floored by the profile's scale and
    the calibration, virtual CPUs limited by the host's cores, pipelining counted) as
    results.json's `bounds`: critical_path_ms, work_ms, lower_bound_ms, microbatches.
    `on_host=False` bounds the devices as the simulator sees them, each with its own
    cores: a larger cluster than the host's that is only simulated (experiments/ablation.py)."""
    kinds = [d.kind for d in problem.cluster.devices]
    virtual = on_host and all(d.is_virtual_cpu for d in problem.cluster.devices)
    scale = (calibration or Calibration.default(problem.cluster)).compute_scale
    bound = lower_bound(problem.groups, kinds, floor=cost_floor(problem.groups, scale),
                        cores=host_cores() if virtual else None, microbatches=microbatch_options(problem))
    return {"critical_path_ms": bound.critical_path_ms, "work_ms": bound.work_ms, "lower_bound_ms": bound.bound_ms,
            "microbatches": bound.microbatches}


def measure_baselines(results: Results, measurer: Measurer, candidates: dict[str, Candidate]) -> None:
    """Measure the baselines' candidates and the unplaced model together (one session,
    or the book's earlier one), adding the `unplaced` row first and filling every row."""
    if results.unplaced is None:
        results.methods.insert(0, MethodResult(UNPLACED, "unplaced", devices=[unplaced_device(measurer.problem)]))
    measurer.measure([None, *candidates.values()], [UNPLACED, *candidates], stage="baselines: measuring")
    _fill_from_book(results, measurer, candidates, "baselines")


def optimize(workload: str | None = None, devices: str | None = None, memory: str | None = None, *,
             budget_s: float = DEFAULT_BUDGET_S, out_dir: Path | None = None, seed: int = 0, reward: str = "sim",
             resume: bool = False, methods: Sequence[str] | None = None, protocol: Protocol | None = None,
             max_groups: int = 256, search: SearchOptions | None = None, workers: int = 1,
             progress: Progress = quiet, warn: Callable[[str], None] = warn_stderr, command: str = "") -> Results:
    """Run the whole job (module docstring); write plan.json, results.json and the
    report into out_dir (default placer-out/<workload name>) and return the Results.

    Parameters
    ----------
    workload : a workload file or zoo:NAME[:SIZE] (default DEFAULT_WORKLOAD).
    devices, memory : --devices and --memory strings.
    budget_s : seconds of search (each search gets them).
    methods : baselines and searches to run (default: every baseline and "rl").
    protocol : how candidates are measured (default Protocol()).
    search : the searches' options (config overrides, a starting policy, sample budget).
    workers : > 1 measures a search's candidates on that many worker processes at once.
    progress, warn : told each stage, and each one-line warning.

    Returns
    -------
    Results, with `paths` the files written.

    Raises
    ------
    PlacerError (its subclasses)
        A bad input (before any work), an incompatible --resume, or no placement that
        can run (InfeasibleError; right after profiling, before any baseline or search,
        when the memory caps cannot hold the model however it is split).
    KeyboardInterrupt
        Ctrl-C (Terminated: SIGTERM) before anything was measured; nothing is written but
        the measurements made so far, and `warn` is told so (and that --resume continues).
    """
    spec = workload or DEFAULT_WORKLOAD
    protocol = protocol or Protocol()
    search = search or SearchOptions()
    names = list(methods) if methods is not None else [*HEURISTICS, "rl"]
    check_inputs(devices, memory, budget_s, names, out_dir, workers)
    search.config(budget_s, seed)  # a bad --search setting: refused before any work
    policy = search.load_policy()  # a corrupt --policy: CheckpointError before any work
    cluster = parse_cluster(devices, memory)
    if len(cluster.devices) < 2:  # new-user trial 12: a whole run's minutes to find that every plan ties
        raise DeviceSpecError(f"--devices names one device ({cluster.names[0]}): every plan runs the model unplaced, "
                              f"so there is nothing to search; name two or more, e.g. --devices cpu:0,cpu:1")
    identity = {"workload": spec, "devices": cluster.names, "memory": [d.memory_bytes for d in cluster.devices],
                "max_groups": max_groups, "workers": workers, "cores": host_cores()}
    progress(Stage("loading workload"))
    loaded = load_workload(spec, seed=seed)
    out = Path(out_dir) if out_dir is not None else Path("placer-out") / loaded.name
    if out_dir is None and (problem := folder_problem(out)):
        raise PlacerError(f"the output folder {out} {problem}: choose another with --out")
    book_path = out / "measurements.json"
    if resume:
        check_resume(book_path, identity, RESUME_KEYS)
    else:
        check_fresh(out, identity, warn)
    out.mkdir(parents=True, exist_ok=True)

    progress(Stage("profiling", 0, 1))
    problem = build_problem(loaded, devices, memory, max_groups=max_groups,
                            progress=lambda done, total: progress(Stage("profiling", done, total)))
    identity["fingerprint"] = problem.fingerprint
    try:  # the memory floor: no baseline, search or measurement when no placement at all fits the caps
        require_fit(problem, colocation_units(problem))
    except InfeasibleError as exc:
        raise _no_placement([str(exc)]) from exc
    refusal = microbatches_off(loaded, problem)
    asked = search.config(budget_s, seed).microbatches or ()
    if refusal and any(m > 1 for m in asked):
        raise PlacerError(f"--search microbatches: {refusal}")
    allowed = microbatch_options(problem)
    missing = sorted(set(asked) - set(allowed))
    if missing:  # no step time to simulate them by: every candidate would score infeasible
        raise PlacerError(f"--search microbatches: the profile has no step time at {absent_counts(problem, missing)}; "
                          f"choose among {', '.join(map(str, allowed))}")
    if resume:
        check_resume(book_path, identity, ("fingerprint",))
    book = MeasurementBook(identity, book_path, warn)
    if not resume:
        book.entries = {}  # a fresh run measures afresh; other identities' books stay in the file
    calibration = load_calibration(problem)
    results = Results(command="optimize", run_id=uuid.uuid4().hex[:12], workload=spec, devices=problem.cluster.names,
                      memory={d.name: d.memory_bytes for d in problem.cluster.devices}, seed=seed, budget_s=budget_s,
                      reward=reward, protocol=protocol.to_json(), environment=environment(command),
                      search=asdict(search.config(budget_s, seed)) if any(n in SEARCHES for n in names) else {},
                      bounds=bounds_of(problem, calibration),
                      notes=[*loaded.notes, *microbatch_notes(problem, refusal)])
    try:
        with _measurement_pool(spec, problem, workers, protocol, memory) as pool:
            measurer = Measurer(loaded, problem, book, protocol, pool, progress)
            scorer = Scorer(problem, measurer, calibration, reward, warn)
            interrupt = _run_stages(results, problem, measurer, scorer, names, seed, budget_s, search, policy,
                                    resume, out, progress)
            if pool is not None:
                results.notes += pool.events
        results.notes += _refusals(book)
        plan = _finish(results, problem, scorer, interrupt, seed, protocol)
    except KeyboardInterrupt:  # nothing chosen yet: say what is kept
        warn(_kept(book))
        raise
    progress(Stage("report"))
    results.paths = {k: str(v) for k, v in publish(results, out, plan, warn).items()}
    return results


def _refusals(book: MeasurementBook) -> list[str]:
    """A note on the candidates the runtime refused to run (placer.runtime.refusals: micro-batches that would
    change what the model computes), with the first one's reason: a search's row otherwise only says that none of
    them measured faster (new-user trial s26: a reduction over the batch inside the model)."""
    refused = [m.reason.removeprefix("refused: ") for m in book.entries.values()
               if not m.feasible and (m.reason or "").startswith("refused: ")]
    return [f"{len(refused)} measured candidate(s) refused by the runtime, e.g.: {refused[0]}"] if refused else []


def _kept(book: MeasurementBook) -> str:
    """The line said when a run stops before it chose anything: what it kept, and how to go on."""
    if book.entries and book.path is not None and not book.write_failed:
        return (f"stopped before any plan was chosen: the {len(book.entries)} measurement(s) made so far are kept in "
                f"{book.path}; run the same command with --resume to continue without repeating them")
    return "stopped before any measurement was kept: run the command again to start over"


def _no_placement(reasons: Sequence[str]) -> InfeasibleError:
    """The refusal of a run where no placement could run, quoting the first of
    `reasons` (why each one could not) with the advice that fits them."""
    advice = "raise --step-timeout" if reasons and all("timed out" in r for r in reasons) else \
        "raise --memory caps or add devices"
    return InfeasibleError("no placement could run on these devices" + (f": {reasons[0]}" if reasons else "")
                           + f" ({advice})")


@contextmanager
def _measurement_pool(spec: str, problem: PlacementProblem, workers: int, protocol: Protocol,
                      memory: str | None) -> Iterator[object | None]:
    """A MeasurementPool of `workers` processes (None for one: measure in this process)."""
    if workers <= 1:
        yield None
        return
    from placer.runtime.pool import MeasurementPool
    pool = MeasurementPool(spec, problem.cluster.names, workers, iters=protocol.min_runs,
                           timeout_s=protocol.step_timeout_s, warmup=protocol.warmup, memory=memory)
    try:
        yield pool
    finally:
        pool.close()


def _run_stages(results: Results, problem: PlacementProblem, measurer: Measurer, scorer: Scorer,
                names: list[str], seed: int, budget_s: float, search: SearchOptions, policy: object,
                resume: bool, out: Path, progress: Progress) -> KeyboardInterrupt | None:
    """Baselines, calibration, searches, final choice: fills `results` (rows, curve,
    choice). Returns the Ctrl-C/SIGTERM that cut it short, if one did."""
    stage = "baselines"
    try:
        rows, candidates = baseline_rows(problem, [n for n in names if n in HEURISTICS], seed, progress)
        results.methods = rows
        measure_baselines(results, measurer, candidates)
        stage = "calibration"
        scorer.refit()
        scorer.finish()
        results.recalibrations = [{**mark, "stage": "baselines"} for mark in scorer.refits]
        for method in (n for n in names if n in SEARCHES):
            stage = f"search ({method})"
            warm = _best_measured(results)
            outcome = run_search(method, problem, scorer, budget_s, seed, search, policy, warm, resume, out,
                                 progress)
            results.curve += outcome.curve
            results.recalibrations += outcome.recalibrations
            results.best_measured += outcome.best_measured
            if outcome.row is not None:
                results.methods.append(outcome.row)
                candidates[method] = Candidate(tuple(outcome.row.placement), outcome.row.microbatches)
                _fill_from_book(results, measurer, {method: candidates[method]}, "search")
            if outcome.interrupted:
                raise interruption()
        stage = "final"
        _choose(results, problem, measurer, candidates, progress)
        return None
    except KeyboardInterrupt as caught:
        exc = interruption() if not isinstance(caught, Terminated) else caught
        results.status = "terminated" if isinstance(exc, Terminated) else "interrupted"
        results.interrupted_at = stage
        if not results.methods:
            raise
        return exc


def _fill_from_book(results: Results, measurer: Measurer, candidates: dict[str, Candidate], session: str) -> None:
    """Fill rows from the book's measurements, with speedups over the book's unplaced
    and best baseline (measured in the same session, when not resumed from another)."""
    unplaced = measurer.book.get(None)
    if unplaced is not None:
        fill(results.unplaced, unplaced, "baselines", None, None, results.bounds.get("lower_bound_ms"))
    measured = {m: measurer.book.get(c) for m, c in candidates.items() if measurer.book.get(c) is not None}
    baselines = {m: x for m, x in measured.items() if results.row(m).kind == "baseline" and x.feasible}
    heuristic = min(baselines.items(), key=lambda kv: kv[1].median_ms, default=None)
    for method, measurement in measured.items():
        fill(results.row(method), measurement, session, unplaced, heuristic, results.bounds.get("lower_bound_ms"),
             measurer.protocol)


def _best_measured(results: Results) -> Candidate | None:
    rows = [r for r in results.methods if r.measured and r.placement is not None]
    best = min(rows, key=lambda r: r.measured_ms, default=None)
    return Candidate(tuple(best.placement), best.microbatches) if best is not None else None


def _choose(results: Results, problem: PlacementProblem, measurer: Measurer, candidates: dict[str, Candidate],
            progress: Progress) -> None:
    """The honest final choice (placer.choose): a fresh `final` session of the
    shortlist picks the winner, fresh `crosscheck` and `confirm` sessions of the
    winner, the best heuristic and unplaced judge it. Rows sharing a placement share a
    measurement."""
    heuristic = results.best_heuristic
    measured = sorted((r for r in results.methods if r.measured and r.method in candidates),
                      key=lambda r: r.measured_ms)
    distinct = {}  # the fastest row of each placement
    for row in measured:
        distinct.setdefault(candidate_key(candidates[row.method]), row)
    fastest = list(distinct.values())
    chosen = [*fastest[:SHORTLIST], *(r for r in measured if r.kind != "baseline"),
              *([heuristic] if heuristic else [])]
    labels = _labels(chosen, candidates)
    entries = [(UNPLACED, None), *((label, candidates[label]) for label in dict.fromkeys(labels.values()))]
    final = measurer.session(entries, "final: measuring")
    protocol = measurer.protocol
    _fill_session(results, final, labels, "final", heuristic.method if heuristic else None, protocol)
    shortlist = [UNPLACED, *labels]  # every method whose placement was re-measured
    winner = pick([results.unplaced, *(results.row(label) for label in dict.fromkeys(labels.values()))], final,
                  problem, protocol)
    if winner is None:
        results.choice = verdict_choice(None, results.unplaced, "final", shortlist, "")
        return
    judged = [r for r in (winner, heuristic) if r is not None and r.kind != "unplaced"]
    labels = _labels(judged, candidates)
    entries = [(UNPLACED, None), *((label, candidates[label]) for label in dict.fromkeys(labels.values()))]

    def measure(session: str, reverse: bool) -> list[MethodResult]:
        times = measurer.session(entries[::-1] if reverse else entries, f"{session}: measuring")
        _fill_session(results, times, labels, session, heuristic.method if heuristic else None, protocol)
        return [results.row(method) for method in labels]

    results.choice = confirm(winner, heuristic, results, measure, shortlist, results.unplaced.devices[0],
                             protocol=protocol)


def _labels(rows: Sequence[MethodResult], candidates: dict[str, Candidate]) -> dict[str, str]:
    """method -> the label its placement is measured under (the first method with it)."""
    first: dict[str, str] = {}
    return {r.method: first.setdefault(candidate_key(candidates[r.method]), r.method) for r in rows}


def _fill_session(results: Results, measured: dict, labels: dict[str, str], session: str,
                  heuristic: str | None, protocol: Protocol) -> None:
    unplaced = measured[UNPLACED]
    bound = results.bounds.get("lower_bound_ms")
    fill(results.unplaced, unplaced, session, None, None, bound)
    reference = (heuristic, measured[labels[heuristic]]) if heuristic in labels else None
    for method, label in labels.items():
        fill(results.row(method), measured[label], session, unplaced, reference, bound, protocol)


def _finish(results: Results, problem: PlacementProblem, scorer: Scorer, interrupt: KeyboardInterrupt | None,
            seed: int, protocol: Protocol) -> Plan | None:
    """Give rows of one plan one measurement, settle the choice (unconfirmed after an
    interrupt), simulate every row under the final calibration, and make the plan (None:
    unplaced could not be measured, no plan is chosen). Raises InfeasibleError when
    nothing ran, the interrupt itself when nothing was measured."""
    share_measurements(results.methods)
    device = unplaced_device(problem)
    for row in results.methods:
        if row.placement is not None and row.feasible:
            simulated = scorer.simulate(Candidate(tuple(row.placement), row.microbatches))
            row.simulated_ms = simulated.step_ms if simulated.feasible else None
    if interrupt is not None:
        measured = [r for r in results.methods if r.measured]
        if not measured:
            raise interrupt
        winner = min(measured, key=lambda r: r.measured_ms)
        results.choice = verdict_choice(winner, results.unplaced, winner.session, [], device, confirmed=False,
                                        protocol=protocol)
    if results.choice.method is None and results.choice.verdict != "unmeasured":
        raise _no_placement([r.reason for r in results.methods if r.reason])
    settle_ratios(results)
    chosen = results.row(results.choice.method) if results.choice.method is not None else None
    plan, placement, devices = None, [0] * problem.n_groups, [device]  # no plan chosen: the graph unplaced
    if chosen is not None and chosen.kind == "unplaced":
        plan = unplaced_plan(problem, seed)
        plan.measured_ms = chosen.measured_ms
    elif chosen is not None:
        candidate = Candidate(tuple(chosen.placement), chosen.microbatches)
        plan = make_plan(problem, candidate.placement, chosen.method, seed=seed, simulated_ms=chosen.simulated_ms,
                         measured_ms=chosen.measured_ms, microbatches=chosen.microbatches, schedule=chosen.schedule)
        placement, devices = list(candidate.placement), problem.cluster.names
        results.timeline = scorer.simulate(candidate, timeline=True).timeline
    results.calibration = scorer.simulator.calibration.to_json()
    results.bounds = bounds_of(problem, scorer.simulator.calibration)  # under the final calibration
    for row in results.methods:
        bound = results.bounds["lower_bound_ms"]
        row.ratio_to_lower_bound = row.measured_ms / bound if row.measured and bound else None
    results.groups = {"names": [problem.groups.nodes[i]["name"] for i in range(problem.n_groups)],
                      "edges": [list(e) for e in problem.costs.edges.tolist()],
                      "compute_ms": problem.costs.compute_ms.min(axis=1).tolist(),
                      "placement": placement, "devices": devices}
    results.notes = list(dict.fromkeys([*results.notes, *(n for r in results.methods for n in r.notes)]))
    return plan
