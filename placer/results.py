"""The typed results of a run: what `placer optimize` and `placer compare` write as
results.json, what the report renders and what experiments/ read.

Schema `placer.results/v1` (docs/results.md documents every field): a `Results`
holds the run's settings and host, one `MethodResult` row per method (the `unplaced`
model, each baseline, each search), the final `Choice`, the search's learning curve
with its recalibrations, and what the plots need. Rows carry their measurement
(median, confidence interval, IQR, runs, and the interleaved session that made it)
and their speedup over `unplaced` measured in that same session (`Ratio`).

`Results.save` writes strict JSON only (no NaN or Infinity: non-finite numbers
become null); `Results.load` reads this schema and the unversioned results.json of
earlier placer versions.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from graphs.devices import host_cores
from graphs.errors import PlacerError
from graphs.files import write_text_atomically
from placer.runtime.stats import busy_from_json

__all__ = ["SCHEMA", "KINDS", "SESSIONS", "NAMES", "method_name", "Stage", "Progress", "quiet", "warn_stderr",
           "environment", "placer_version", "strict", "write_json", "Ratio", "MethodResult", "Choice", "Results"]

SCHEMA = "placer.results/v1"
KINDS = ("unplaced", "baseline", "search", "rl")
SESSIONS = ("baselines", "search", "final", "crosscheck", "confirm")  # optimize's sessions, least authoritative first
NAMES = {
    "unplaced": "unplaced", "single": "single device", "round_robin": "round robin", "expert": "expert",
    "balanced": "balanced", "sequential_fill": "sequential fill", "metis": "METIS", "kernighan_lin": "Kernighan-Lin",
    "etf": "ETF", "sct": "SCT", "pipeline": "pipeline", "rl": "RL", "random_search": "random search",
    "local_search": "local search",
}


def method_name(method: str) -> str:
    """A method's name for people ("metis" -> "METIS"); unknown names as they are."""
    return NAMES.get(method, method)


# ----------------------------------------------------------------------------- progress

@dataclass
class Stage:
    """What a progress display shows: a stage name, how far along it is (done of
    total; total None when open-ended) and a few details."""

    name: str
    done: float = 0
    total: float | None = None
    info: dict = field(default_factory=dict)


Progress = Callable[[Stage], None]


def quiet(stage: Stage) -> None:
    """A progress function that shows nothing."""


def warn_stderr(text: str) -> None:
    """The default for `warn` arguments: one line `warning: ...` on stderr."""
    print(f"warning: {text}", file=sys.stderr)


# ----------------------------------------------------------------------------- host and files

def environment(command: str = "") -> dict:
    """The host a measurement was made on: name, OS, processor, cores, torch, Python,
    placer, date (UTC) and the command line."""
    return {
        "host": platform.node() + " (" + platform.platform() + ")",
        "processor": platform.processor() or platform.machine(),
        "cores": host_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "placer": placer_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
    }


def placer_version() -> str:
    """The installed placer's version, or "dev" in a source checkout."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("placer")
    except PackageNotFoundError:
        return "dev"


def strict(value: Any) -> Any:
    """`value` as strict JSON values: numpy scalars as Python numbers, tuples as lists,
    non-finite floats as None."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):  # numpy scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as strict JSON (see `strict`), atomically.

    Raises
    ------
    OSError
        The file cannot be written (the old one is then unchanged).
    """
    return write_text_atomically(path, json.dumps(strict(data), indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- the artifact

def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


@dataclass(frozen=True)
class Ratio:
    """How many times faster a measurement is than a reference (reference median / its
    median: above 1 is faster), with the ratio's confidence interval, and the verdict:
    "faster", "slower", or "tie" when the interval holds 1. A ratio judged in several
    sessions (placer.choose rule 8) keeps the earlier sessions' ratios in `earlier`, and
    its verdict is the one they all give ("tie" where they differ)."""

    value: float
    ci: tuple[float, float]
    verdict: str
    reference: str  # the reference's method name
    earlier: tuple["Ratio", ...] = ()

    def to_json(self) -> dict:
        """{"value", "ci": [low, high], "verdict", "reference"}, and "earlier": [...] where there are any."""
        data = {"value": self.value, "ci": list(self.ci), "verdict": self.verdict, "reference": self.reference}
        return {**data, "earlier": [r.to_json() for r in self.earlier]} if self.earlier else data

    @classmethod
    def from_json(cls, data: Any) -> "Ratio | None":
        """A Ratio from `to_json`'s dict; None for anything else (null, or damaged)."""
        if not isinstance(data, dict) or _opt_float(data.get("value")) is None:
            return None
        ci = data.get("ci") or [data["value"], data["value"]]
        earlier = data.get("earlier") if isinstance(data.get("earlier"), list) else []
        return cls(float(data["value"]), (float(ci[0]), float(ci[1])), str(data.get("verdict", "tie")),
                   str(data.get("reference", "")), tuple(r for r in map(cls.from_json, earlier) if r is not None))

    def describe(self) -> str:
        """"1.12x (CI 1.05-1.19)", "1.00x (tie, CI 0.97-1.03)" when the interval holds 1,
        "5.37x (no verdict, CI 2.68-28.57)" when the reference could not be measured;
        "1.12x (CI 1.05-1.19; the session before: 1.10x, CI 1.04-1.16)" with an earlier session's."""
        tie = {"tie": "tie, ", "unmeasured": "no verdict, "}.get(self.verdict, "")
        before = "".join(f"; the session before: {r.value:.2f}x, CI {r.ci[0]:.2f}-{r.ci[1]:.2f}"
                         for r in self.earlier)
        return f"{self.value:.2f}x ({tie}CI {self.ci[0]:.2f}-{self.ci[1]:.2f}{before})"


@dataclass
class MethodResult:
    """One row: a method's placement, simulated and measured.

    Attributes
    ----------
    method : "unplaced", a baseline's name, or a search's ("rl", "random_search", ...).
    kind : one of KINDS: "unplaced" (the model run without placer), "baseline", "search", "rl".
    feasible : False when it does not fit or could not run (reason says why).
    measured_ms, ci_ms, iqr_ms, runs : median step time (ms), its confidence interval
        [low, high] (ms), interquartile range (ms) and timed steps; None/0 unmeasured.
    session : the interleaved session that measured it ("baselines", "final", "crosscheck",
        "confirm", "compare", or "search" for a search's own measurements). Rows of one plan share
        the measurement of the latest of these (placer.choose.share_measurements).
    simulated_ms : the calibrated simulator's step time under the final calibration.
    placement : device index per group (None: not placed by group, e.g. unplaced).
    devices : the device names the placement indexes (unplaced: the one device it ran on).
    microbatches, schedule : pipelining (1 and None: none).
    peak_bytes : device name -> peak bytes measured.
    ratio_to_lower_bound : measured_ms / the problem's lower bound.
    search_s : seconds the method took to compute (search: its budget spent).
    vs_unplaced, vs_best_heuristic : speedup over those, measured in the same session;
        only on rows of the session that measured unplaced last (placer.choose.settle_ratios).
    plan : the plan file the row was measured from (compare).
    notes : what the user should know about this row.
    busy : what its session found when other processes held the cores this row
        (unplaced) ran its intra-op threads on while it was timed: {"others", "cores",
        "steps"} (the direct reading) or {"load", "cores", "own"} (the load average,
        placer.runtime.host_load); None when they did not. No verdict rests on a busy
        row (placer.choose rule 7).
    """

    method: str
    kind: str = "baseline"
    feasible: bool = True
    reason: str | None = None
    measured_ms: float | None = None
    ci_ms: tuple[float, float] | None = None
    iqr_ms: float | None = None
    runs: int = 0
    session: str | None = None
    simulated_ms: float | None = None
    placement: list[int] | None = None
    devices: list[str] = field(default_factory=list)
    microbatches: int = 1
    schedule: str | None = None
    peak_bytes: dict[str, int] = field(default_factory=dict)
    ratio_to_lower_bound: float | None = None
    search_s: float | None = None
    vs_unplaced: Ratio | None = None
    vs_best_heuristic: Ratio | None = None
    plan: str | None = None
    notes: list[str] = field(default_factory=list)
    busy: dict | None = None

    @property
    def measured(self) -> bool:
        """Feasible and measured: only such rows are compared."""
        return self.feasible and self.measured_ms is not None

    def to_json(self) -> dict:
        """The row as strict JSON values (the schema's row)."""
        return _with_ratios(self)

    @classmethod
    def from_json(cls, data: dict) -> "MethodResult":
        """A row from its JSON; missing optional keys take their defaults, and an
        unversioned row's kind is derived from its method."""
        method = str(data["method"])
        ci = data.get("ci_ms")
        kind = data.get("kind") or ("rl" if method == "rl" else "unplaced" if method == "unplaced" else "baseline")
        return cls(
            method=method, kind=kind, feasible=data.get("feasible") is not False, reason=data.get("reason"),
            measured_ms=_opt_float(data.get("measured_ms")),
            ci_ms=(float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
            iqr_ms=_opt_float(data.get("iqr_ms")), runs=int(data.get("runs") or 0), session=data.get("session"),
            simulated_ms=_opt_float(data.get("simulated_ms")),
            placement=[int(d) for d in data["placement"]] if data.get("placement") is not None else None,
            devices=list(data.get("devices") or []), microbatches=int(data.get("microbatches") or 1),
            schedule=data.get("schedule"), peak_bytes=dict(data.get("peak_bytes") or {}),
            ratio_to_lower_bound=_opt_float(data.get("ratio_to_lower_bound")),
            search_s=_opt_float(data.get("search_s")), vs_unplaced=Ratio.from_json(data.get("vs_unplaced")),
            vs_best_heuristic=Ratio.from_json(data.get("vs_best_heuristic")), plan=data.get("plan"),
            notes=[str(n) for n in data.get("notes") or []],
            busy=busy_from_json(data.get("busy")))


def _with_ratios(row: "MethodResult | Choice") -> dict:
    """A row or choice as strict JSON: its fields, the speedup ratios as their JSON."""
    data = {f.name: getattr(row, f.name) for f in fields(row)}
    for name in ("vs_unplaced", "vs_best_heuristic"):
        data[name] = data[name].to_json() if data[name] is not None else None
    return strict(data)


@dataclass
class Choice:
    """The final choice and the line that says it.

    Attributes
    ----------
    method : the row plan.json was written from (None: no plan).
    contender : the plan the final session picked and the crosscheck and confirm sessions
        judged against unplaced (it is `method` when it won; unplaced took its place on a tie).
    verdict : "faster" (measurably faster than unplaced), "tie" (no plan is measurably
        faster: unplaced is chosen), "slower" (the contender is measurably slower:
        unplaced is chosen), "unplaced infeasible" (the model cannot run unplaced: the
        fastest plan is chosen), "unconfirmed" (interrupted before the final sessions:
        chosen from earlier measurements), "unmeasured" (unplaced could not be measured:
        no plan is chosen, `contender` is the plan that would have been judged) or
        "none" (nothing measured).
    headline : the report's first line.
    session : the session whose measurements the claimed speedups come from.
    shortlist : the methods re-measured together to choose.
    vs_unplaced, vs_best_heuristic : the chosen plan's speedups, from `session`, with the
        crosscheck session's as their `earlier` and the verdict both sessions give.
    """

    method: str | None = None
    verdict: str = "none"
    headline: str = ""
    contender: str | None = None
    session: str | None = None
    shortlist: list[str] = field(default_factory=list)
    vs_unplaced: Ratio | None = None
    vs_best_heuristic: Ratio | None = None

    def to_json(self) -> dict:
        """The choice as strict JSON values."""
        return _with_ratios(self)

    @classmethod
    def from_json(cls, data: Any, best: str | None = None) -> "Choice":
        """A Choice from its JSON; an unversioned results file's `best` is an unconfirmed choice."""
        if not isinstance(data, dict):
            return cls(method=best, verdict="unconfirmed" if best else "none")
        return cls(method=data.get("method"), verdict=str(data.get("verdict", "none")),
                   headline=str(data.get("headline") or ""), contender=data.get("contender"),
                   session=data.get("session"),
                   shortlist=list(data.get("shortlist") or []), vs_unplaced=Ratio.from_json(data.get("vs_unplaced")),
                   vs_best_heuristic=Ratio.from_json(data.get("vs_best_heuristic")))


_RUN_FIELDS = ("workload", "devices", "memory", "seed", "budget_s", "reward", "search", "protocol", "bounds",
               "environment", "plan", "curve", "recalibrations", "best_measured", "timeline", "groups", "calibration",
               "notes")


@dataclass
class Results:
    """A run of `placer optimize` or `placer compare` (module docstring).

    Attributes
    ----------
    command : "optimize" or "compare".
    run_id : unique per run; the report files carry it too.
    status : "complete", "interrupted" (Ctrl-C) or "terminated" (SIGTERM).
    interrupted_at : the stage that was cut short ("search", "report", ...), if any.
    workload, devices, memory, seed, budget_s, reward : the run's inputs.
    search : the search configuration used; protocol : the measurement protocol.
    bounds : {"critical_path_ms", "work_ms", "lower_bound_ms"}.
    environment : the host (placer.results.environment).
    methods : one row per method, `unplaced` first.
    choice : what plan.json holds, and why.
    plan : plan.json's file name beside results.json (None: no plan written).
    curve : the search's progress, one dict per round ("calibration": refits so far).
    recalibrations : one dict per refit of the simulator during the search.
    best_measured : each improvement of a search's best measurement: `method`, `update`,
        `samples`, `elapsed_s` of its round, `median_ms`, `ci_ms`.
    timeline : the chosen plan's simulated per-device events.
    groups : the grouped graph for the plot ({"names", "edges", "compute_ms", "placement"}).
    calibration : the simulator's final calibration.
    notes : what the user should be told.
    """

    command: str = "optimize"
    run_id: str = ""
    status: str = "complete"
    interrupted_at: str | None = None
    workload: str = ""
    devices: list[str] = field(default_factory=list)
    memory: dict[str, int | None] = field(default_factory=dict)
    seed: int | None = None
    budget_s: float | None = None
    reward: str | None = None
    search: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    methods: list[MethodResult] = field(default_factory=list)
    choice: Choice = field(default_factory=Choice)
    plan: str | None = None
    curve: list[dict] = field(default_factory=list)
    recalibrations: list[dict] = field(default_factory=list)
    best_measured: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    groups: dict | None = None
    calibration: dict | None = None
    notes: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict, compare=False)  # files written (not saved)

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C or SIGTERM cut the run short."""
        return self.status != "complete"

    @property
    def best(self) -> str | None:
        """The chosen method (what plan.json holds)."""
        return self.choice.method

    def row(self, method: str) -> MethodResult | None:
        """The row of `method`, if there is one."""
        return next((r for r in self.methods if r.method == method), None)

    @property
    def unplaced(self) -> MethodResult | None:
        """The `unplaced` row (the model run without placer), if there is one."""
        return next((r for r in self.methods if r.kind == "unplaced"), None)

    @property
    def best_heuristic(self) -> MethodResult | None:
        """The fastest measured feasible baseline (by its measured median)."""
        return min((r for r in self.methods if r.kind == "baseline" and r.measured),
                   key=lambda r: r.measured_ms, default=None)

    def to_json(self) -> dict:
        """results.json's content (schema placer.results/v1), strict JSON values."""
        data = {"schema": SCHEMA, "command": self.command, "run_id": self.run_id, "status": self.status,
                "interrupted": self.interrupted, "interrupted_at": self.interrupted_at,
                **{name: getattr(self, name) for name in _RUN_FIELDS},
                "methods": [r.to_json() for r in self.methods], "choice": self.choice.to_json(), "best": self.best}
        return strict(data)

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        """Read this schema, or an unversioned results.json (earlier placer versions:
        `best` without `choice`, rows without CIs).

        Raises
        ------
        PlacerError
            A newer schema than this placer reads.
        """
        schema = data.get("schema")
        if schema is not None and schema != SCHEMA:
            raise PlacerError(f"results of schema {schema!r}; this placer reads {SCHEMA!r}: upgrade placer")
        status = data.get("status") or ("interrupted" if data.get("interrupted") else "complete")
        rows = [MethodResult.from_json(r) for r in data.get("methods") or [] if isinstance(r, dict) and r.get("method")]
        values = {name: data.get(name) for name in _RUN_FIELDS if data.get(name) is not None}
        return cls(command=data.get("command") or "optimize", run_id=str(data.get("run_id") or ""), status=status,
                   interrupted_at=data.get("interrupted_at"), **values, methods=rows,
                   choice=Choice.from_json(data.get("choice"), data.get("best")))

    def save(self, path: str | Path) -> Path:
        """Write results.json (strict JSON, atomically). Raises OSError when it cannot."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Results":
        """Read a results.json.

        Raises
        ------
        PlacerError
            The file is missing, not JSON, or not a results file.
        """
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlacerError(f"{path}: no such results file") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PlacerError(f"{path}: not a readable results file ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict) or "methods" not in data:
            raise PlacerError(f"{path}: not a placer results file (no 'methods')")
        return cls.from_json(data)
