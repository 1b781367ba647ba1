"""`placer optimize`: the whole job, from a workload to a measured plan and a report.

    load + capture + profile + group      -> PlacementProblem          (graphs/)
    every baseline, simulated + measured  -> calibration data          (placer.baselines, runtime)
    fit the simulator to those measurements                            (envs.calibrate)
    RL search on the calibrated simulator, measuring its best candidates (placer.rl)
    the best *measured* placement         -> plan.json, results.json, report.{md,html}

Every measurement is kept in DIR/measurements.json as soon as it is made, so that an
interrupted run (Ctrl-C, a killed process) resumed with `--resume` repeats none of
them, and the RL search checkpoints itself in DIR/search/.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from contextlib import contextmanager
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from graphs.bounds import lower_bound
from graphs.workload import Workload, load_workload
from placer.baselines import BASELINES, run_baselines
from graphs.devices import host_cores
from graphs.errors import InfeasibleError, PlanError
from graphs.files import write_text_atomically
from placer.plan import Plan, make_plan
from graphs.problem import Placement, PlacementProblem, build_problem
from placer.runtime import measure as measure_plan
from placer.runtime.measure import Measurement, measure_placement
from envs.calibrate import fit_calibration, load_calibration, save_calibration
from envs.sim import Calibration, Simulator

DEFAULT_WORKLOAD = "zoo:nmt:medium"
DEFAULT_BUDGET_S = 120.0


@dataclass
class Stage:
    """What the progress display shows: a stage name and how far along it is."""

    name: str
    done: float = 0
    total: float | None = None
    info: dict = field(default_factory=dict)


Progress = Callable[[Stage], None]


def _quiet(stage: Stage) -> None:
    pass


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=_json_default))


def _json_default(value: object) -> object:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def environment(command: str = "") -> dict:
    return {
        "host": platform.node() + " (" + platform.platform() + ")",
        "processor": platform.processor() or platform.machine(),
        "cores": host_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "placer": _placer_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
    }


def _placer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("placer")
    except PackageNotFoundError:
        return "dev"


class MeasurementBook:
    """Real measurements of placements, saved to disk as they are made and reused.

    Known-infeasible placements are recorded without running anything. With a
    `pool` (placer.distributed.MeasurementPool) a batch is measured on several
    worker processes at once; otherwise one at a time in this process."""

    def __init__(self, workload: Workload, problem: PlacementProblem, path: Path | None, iters: int, pool=None):
        self.workload, self.problem, self.path, self.iters, self.pool = workload, problem, path, iters, pool
        self.identity = {"fingerprint": problem.fingerprint, "devices": problem.cluster.names,
                         "memory": [d.memory_bytes for d in problem.cluster.devices], "iters": iters}
        self.entries: dict[str, dict] = {}
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("identity") == self.identity:
                    self.entries = saved["entries"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                self.entries = {}  # a damaged book only costs re-measuring

    @staticmethod
    def key(placement: Sequence[int]) -> str:
        return ",".join(str(int(d)) for d in placement)

    def measure_many(self, placements: Sequence[Sequence[int]], methods: Sequence[str] | None = None) -> list[dict]:
        """Measurement.to_json() of each placement, measuring only the new ones."""
        methods = list(methods) if methods is not None else ["candidate"] * len(placements)
        new = {}
        for placement, method in zip(placements, methods):
            if self.key(placement) not in self.entries:
                new.setdefault(self.key(placement), (tuple(placement), method))
        if self.pool is not None and len(new) > 1:
            known = {k: v for k, v in new.items() if self.problem.violations(v[0])}
            for key, (placement, method) in known.items():
                self._record(key, measure_placement(self.workload, self.problem, placement, method, self.iters))
            todo = [(k, v) for k, v in new.items() if k not in known]
            plans = [make_plan(self.problem, placement, method) for _, (placement, method) in todo]
            for (key, _), result in zip(todo, self.pool.measure_many(plans)):
                self._record(key, result)
        else:
            for key, (placement, method) in new.items():
                self._record(key, measure_placement(self.workload, self.problem, placement, method, self.iters))
        return [self.entries[self.key(p)] for p in placements]

    def measure(self, placement: Sequence[int], method: str = "candidate") -> dict:
        return self.measure_many([placement], [method])[0]

    def get(self, placement: Sequence[int]) -> dict | None:
        """The measurement of a placement, if it has been measured."""
        return self.entries.get(self.key(placement))

    def measured_ms(self, placement: Sequence[int]) -> float:
        entry = self.measure(placement)
        return entry["median_ms"] if entry["feasible"] else math.inf

    def _record(self, key: str, result: Measurement) -> None:
        self.entries[key] = result.to_json()
        if self.path is not None:
            write_json_atomic(self.path, {"identity": self.identity, "entries": self.entries})

    def pairs(self) -> tuple[list[Placement], list[float]]:
        """Every feasible measurement as (placements, ms), for calibration."""
        placements, times = [], []
        for key, entry in self.entries.items():
            if entry["feasible"]:
                placements.append(tuple(int(d) for d in key.split(",")))
                times.append(entry["median_ms"])
        return placements, times


def method_row(method: str, kind: str, placement: Sequence[int] | None, simulated_ms: float | None,
               measured: dict | None, bound_ms: float, search_s: float | None, reason: str | None = None) -> dict:
    """One row of results.json (schema: placer/report.py) from a simulated time and a
    measurement (Measurement.to_json(); None when not measured)."""
    row = {"method": method, "kind": kind, "feasible": reason is None, "reason": reason,
           "simulated_ms": simulated_ms, "measured_ms": None, "iqr_ms": None, "peak_bytes": {},
           "ratio_to_lower_bound": None, "search_s": None if search_s is None else round(search_s, 3),
           "placement": list(placement) if placement is not None else None}
    if measured is not None:
        row.update(feasible=measured["feasible"], reason=measured.get("reason"), peak_bytes=measured["peak_bytes"])
        if measured["feasible"]:
            row.update(measured_ms=measured["median_ms"], iqr_ms=measured["iqr_ms"],
                       ratio_to_lower_bound=measured["median_ms"] / bound_ms if bound_ms > 0 else None)
    return row


def evaluate(method: str, kind: str, placement: Placement, sim: Simulator, measured: dict | None,
             bound_ms: float, search_s: float) -> dict:
    """A results row for a placement: simulated, and measured when `measured` is given."""
    simulated = sim.simulate(placement)
    if not simulated.feasible:
        return method_row(method, kind, placement, None, None, bound_ms, search_s, reason=simulated.reason)
    return method_row(method, kind, placement, simulated.step_ms, measured, bound_ms, search_s)


def optimize(workload: str | None = None, devices: str | None = None, memory: str | None = None,
             budget_s: float = DEFAULT_BUDGET_S, out_dir: Path | None = None, seed: int = 0, reward: str = "sim",
             resume: bool = False, methods: Sequence[str] | None = None, measure_iters: int = 10,
             max_groups: int = 256, max_samples: int | None = None, policy_path: Path | None = None,
             workers: int = 1, progress: Progress = _quiet, command: str = "") -> dict:
    """Run the whole job (module docstring) and return the results dict that it also
    writes, with plan.json and the report, into out_dir (default placer-out/<name>).

    `methods` names the baselines to run and "rl" for the search (default: all);
    `policy_path` starts the search from a policy saved by an earlier search
    (DIR/search/policy.pt); `workers` > 1 measures batches of placements on that many
    worker processes (placer.distributed.MeasurementPool). Ctrl-C at any stage keeps
    what was measured: the best plan so far is written and results say interrupted."""
    from placer.report import write_report

    spec = workload or DEFAULT_WORKLOAD
    progress(Stage("loading workload"))
    loaded = load_workload(spec, seed=seed)
    out = Path(out_dir) if out_dir is not None else Path("placer-out") / loaded.name
    out.mkdir(parents=True, exist_ok=True)

    progress(Stage("profiling", 0, 1))
    problem = build_problem(loaded, devices, memory, max_groups=max_groups,
                            progress=lambda done, total: progress(Stage("profiling", done, total)))
    bounds = lower_bound(problem.groups, [d.kind for d in problem.cluster.devices])
    sim = Simulator(problem, load_calibration(problem))
    names = list(methods) if methods is not None else [*BASELINES, "rl"]
    with _measurement_pool(spec, problem, workers, measure_iters, memory) as pool:
        book = MeasurementBook(loaded, problem, out / "measurements.json", measure_iters, pool)
        rows, interrupted = _baselines(problem, [n for n in names if n != "rl"], sim, book, bounds.bound_ms, seed,
                                       progress)
        calibration = _recalibrate(problem, book, sim.calibration)
        sim = Simulator(problem, calibration)
        curve: list[dict] = []
        if "rl" in names and not interrupted:
            sim, curve, interrupted, rl_row = _search(problem, sim, book, rows, bounds.bound_ms, budget_s, seed,
                                                      reward, resume, max_samples, policy_path, out, progress)
            if rl_row is not None:
                rows.append(rl_row)
    for row in rows:  # every simulated time under the final calibration, so that they compare
        if row["simulated_ms"] is not None:
            row["simulated_ms"] = sim.simulate(row["placement"]).step_ms

    best = min((r for r in rows if r["measured_ms"] is not None), key=lambda r: r["measured_ms"], default=None)
    if best is None:
        reasons = [r["reason"] for r in rows if r["reason"]]
        raise InfeasibleError("no placement fits these devices" + (f": {reasons[0]}" if reasons else "")
                              + " (raise --memory caps or add devices)")
    chosen = tuple(best["placement"])
    plan = make_plan(problem, chosen, best["method"], seed=seed, simulated_ms=sim.simulate(chosen).step_ms,
                     measured_ms=best["measured_ms"])
    plan.save(out / "plan.json")

    results = {
        "workload": spec, "devices": problem.cluster.names,
        "memory": {d.name: d.memory_bytes for d in problem.cluster.devices},
        "seed": seed, "budget_s": budget_s, "reward": reward, "interrupted": interrupted,
        "bounds": {"critical_path_ms": bounds.critical_path_ms, "work_ms": bounds.work_ms,
                   "lower_bound_ms": bounds.bound_ms},
        "environment": environment(command),
        "methods": rows, "best": best["method"], "plan": "plan.json",
        "curve": curve, "timeline": sim.simulate(chosen, timeline=True).timeline,
        "groups": {"names": [problem.groups.nodes[i]["name"] for i in range(problem.n_groups)],
                   "edges": [list(e) for e in problem.costs.edges.tolist()],
                   "compute_ms": problem.costs.compute_ms.min(axis=1).tolist(),
                   "placement": list(chosen)},
        "calibration": sim.calibration.to_json(),
        "notes": list(loaded.notes),
    }
    write_json_atomic(out / "results.json", results)
    progress(Stage("report"))
    paths = write_report(results, out)
    results["paths"] = {"plan": str(out / "plan.json"), "results": str(out / "results.json"),
                        **{k: str(v) for k, v in paths.items()}}
    return results


@contextmanager
def _measurement_pool(spec: str, problem: PlacementProblem, workers: int, iters: int, memory: str | None):
    if workers <= 1:
        yield None
        return
    from placer.distributed import MeasurementPool
    pool = MeasurementPool(spec, problem.cluster.names, workers, iters=iters, memory=memory)
    try:
        yield pool
    finally:
        pool.close()


def _baselines(problem: PlacementProblem, names: Sequence[str], sim: Simulator, book: MeasurementBook,
               bound_ms: float, seed: int, progress: Progress) -> tuple[list[dict], bool]:
    """Compute every baseline, then measure those the simulator finds feasible (in one
    batch on a worker pool, if there is one). Returns the rows and whether Ctrl-C cut
    the measurements short (the rows then hold what was measured)."""
    computed: list[tuple[str, Placement | InfeasibleError, float]] = []
    for i, name in enumerate(names):
        progress(Stage("baselines", i, 2 * len(names), {"method": name}))
        start = time.perf_counter()
        computed.append((name, run_baselines(problem, [name], seed=seed)[name], time.perf_counter() - start))
    todo = [(name, outcome) for name, outcome, _ in computed
            if not isinstance(outcome, InfeasibleError) and sim.simulate(outcome).feasible]
    interrupted = False
    try:
        if book.pool is not None:
            progress(Stage("baselines", len(names), 2 * len(names), {"method": f"measuring {len(todo)} at once"}))
            book.measure_many([outcome for _, outcome in todo], [name for name, _ in todo])
        for i, (name, outcome) in enumerate(todo):
            progress(Stage("baselines", len(names) + i, 2 * len(names), {"method": f"measuring {name}"}))
            book.measure(outcome, name)
    except KeyboardInterrupt:
        interrupted = True
    rows = []
    for name, outcome, elapsed in computed:
        if isinstance(outcome, InfeasibleError):
            rows.append(method_row(name, "baseline", None, None, None, bound_ms, elapsed, reason=str(outcome)))
        else:
            rows.append(evaluate(name, "baseline", outcome, sim, book.get(outcome), bound_ms, elapsed))
    progress(Stage("baselines", 2 * len(names), 2 * len(names)))
    return rows, interrupted


def _search(problem: PlacementProblem, sim: Simulator, book: MeasurementBook, rows: list[dict], bound_ms: float,
            budget_s: float, seed: int, reward: str, resume: bool, max_samples: int | None,
            policy_path: Path | None, out: Path, progress: Progress) -> tuple[Simulator, list[dict], bool, dict | None]:
    """The RL search, warm-started from the best measured baseline. Rewards come from
    the simulator, re-calibrated from every measurement so far whenever the trainer
    has measured new candidates (or, with reward="measure", from a measurement of
    every sample). Returns the final simulator, the learning curve, whether it was
    interrupted, and RL's row (None when it found no feasible placement)."""
    from placer.rl.policy import load_policy
    from placer.rl.trainer import TrainConfig, train

    measured_rows = [r for r in rows if r["measured_ms"] is not None]
    warm = tuple(min(measured_rows, key=lambda r: r["measured_ms"])["placement"]) if measured_rows else None
    state = {"sim": sim}

    def score(placements: Sequence[Placement]) -> list[float]:
        if reward == "measure":
            return [e["median_ms"] if e["feasible"] else math.inf for e in book.measure_many(placements)]
        results = [state["sim"].simulate(p) for p in placements]
        return [r.step_ms if r.feasible else math.inf for r in results]

    def recalibrate(placements: list[Placement], times: list[float]) -> Callable:
        state["sim"] = Simulator(problem, _recalibrate(problem, book, state["sim"].calibration))
        return score

    config = TrainConfig(seed=seed, budget_s=budget_s, **({"max_samples": max_samples} if max_samples else {}))
    start = time.perf_counter()
    result = train(problem, score, config, measure=book.measured_ms, warm_start=warm, out_dir=out / "search",
                   resume=resume, recalibrate=recalibrate,
                   policy=load_policy(policy_path) if policy_path is not None else None,
                   on_progress=lambda info: progress(Stage("search", min(info["elapsed_s"], budget_s), budget_s, info)))
    row = None
    if result.best is not None:
        measured = book.measure(result.best, "rl") if state["sim"].simulate(result.best).feasible else None
        row = evaluate("rl", "rl", result.best, state["sim"], measured, bound_ms, time.perf_counter() - start)
    return state["sim"], result.curve, result.interrupted, row


def _recalibrate(problem: PlacementProblem, book: MeasurementBook, current: Calibration) -> Calibration:
    """Fit the simulator to every measurement so far (kept when there are too few)."""
    placements, times = book.pairs()
    if len(placements) < 2:
        return current
    calibration = fit_calibration(problem, placements, times, initial=current)
    save_calibration(problem, calibration)
    return calibration


def compare(workload: str, plans: Sequence[str | Path], out_dir: Path | None = None, measure_iters: int = 10,
            progress: Progress = _quiet, command: str = "") -> dict:
    """Measure the given plans side by side and write the same report as optimize."""
    from placer.plan import load_plan
    from placer.report import write_report

    loaded = load_workload(workload)
    out = Path(out_dir) if out_dir is not None else Path("placer-out") / f"{loaded.name}-compare"
    out.mkdir(parents=True, exist_ok=True)
    loaded_plans: list[Plan] = [load_plan(p) for p in plans]
    for path, plan in zip(plans, loaded_plans):
        if plan.devices != loaded_plans[0].devices:
            raise PlanError(f"{path} places on {','.join(plan.devices)} but {plans[0]} on "
                            f"{','.join(loaded_plans[0].devices)}: compare plans made for the same devices")
    devices = ",".join(loaded_plans[0].devices)
    problem = build_problem(loaded, devices)
    bounds = lower_bound(problem.groups, [d.kind for d in problem.cluster.devices])
    methods = [plan.method for plan in loaded_plans]
    rows = []
    for i, (path, plan) in enumerate(zip(plans, loaded_plans)):
        progress(Stage("measuring", i, len(loaded_plans), {"plan": str(path)}))
        measured = measure_plan(loaded, plan, problem.cluster, iters=measure_iters).to_json()
        # Bare method names let the report find `single`; files tell apart plans of one method.
        name = plan.method if methods.count(plan.method) == 1 else f"{plan.method} ({Path(path).name})"
        row = method_row(name, "rl" if plan.method == "rl" else "baseline", plan.placement, plan.simulated_ms,
                         measured, bounds.bound_ms, None)
        rows.append({**row, "plan": str(path)})
    best = min((r for r in rows if r["measured_ms"] is not None), key=lambda r: r["measured_ms"], default=None)
    results = {"workload": workload, "devices": loaded_plans[0].devices, "seed": None,
               "bounds": {"critical_path_ms": bounds.critical_path_ms, "work_ms": bounds.work_ms,
                          "lower_bound_ms": bounds.bound_ms},
               "environment": environment(command), "methods": rows, "best": best["method"] if best else None,
               "plan": None, "curve": [], "timeline": [], "groups": None, "notes": list(loaded.notes)}
    write_json_atomic(out / "results.json", results)
    paths = write_report(results, out)
    results["paths"] = {"results": str(out / "results.json"), **{k: str(v) for k, v in paths.items()}}
    return results
