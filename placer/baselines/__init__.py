"""Heuristic placements and graph partitioners: what every RL result is judged against.

Every method is a plain function `method(problem, seed=0) -> Placement` that returns
a placement keeping colocation and the devices' memory caps, or raises
InfeasibleError with a one-line reason.

| method            | idea                                                          | module    |
| ----------------- | ------------------------------------------------------------- | --------- |
| `single`          | everything on the fastest device that holds the model         | simple    |
| `round_robin`     | groups dealt over devices in topological order                | simple    |
| `sequential_fill` | fill devices in order (accelerate sequential map, m-TOPO)      | simple    |
| `balanced`        | contiguous blocks balanced by profiled time (torchgpipe)       | simple    |
| `expert`          | the workload's hand placement; else depth bands of equal work | simple    |
| `metis`           | k-way METIS partition weighted by compute, bytes and speed     | partition |
| `kernighan_lin`   | recursive Kernighan-Lin bisection (networkx)                   | partition |
| `etf`             | earliest-time-first list scheduling (Baechi's m-ETF)          | schedule  |
| `sct`             | ETF plus LP-chosen favourite children (Baechi's m-SCT)         | schedule  |

`pipeline` (module pipeline) also chooses a number of micro-batches: contiguous
stages balanced by time (torchgpipe's balance_by_time, exact min-max) and the count
the simulator finds fastest. It returns a Candidate (placement, micro-batches), so
it lives in PIPELINES; `HEURISTICS` holds both kinds, as `placer optimize` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from placer.baselines.partition import kernighan_lin, metis
from placer.baselines.pipeline import pipeline
from placer.baselines.repair import repair
from placer.baselines.schedule import etf, sct
from placer.baselines.simple import balanced, expert, round_robin, sequential_fill, single
from graphs.errors import InfeasibleError, PlacerError
from graphs.problem import Candidate, Placement, PlacementProblem

Baseline = Callable[[PlacementProblem, int], Placement]

BASELINES: dict[str, Baseline] = {
    "single": single,
    "round_robin": round_robin,
    "sequential_fill": sequential_fill,
    "balanced": balanced,
    "expert": expert,
    "metis": metis,
    "kernighan_lin": kernighan_lin,
    "etf": etf,
    "sct": sct,
}
PIPELINES: dict[str, Callable[[PlacementProblem, int], Candidate]] = {"pipeline": pipeline}
HEURISTICS: dict[str, Callable[[PlacementProblem, int], Placement | Candidate]] = {**BASELINES, **PIPELINES}


def run_baselines(problem: PlacementProblem, methods: Sequence[str] | None = None,
                  seed: int = 0) -> dict[str, Placement | InfeasibleError]:
    """Each method's placement, or the InfeasibleError saying why it has none."""
    names = list(BASELINES) if methods is None else list(methods)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise PlacerError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    results: dict[str, Placement | InfeasibleError] = {}
    for name in names:
        try:
            results[name] = BASELINES[name](problem, seed)
        except InfeasibleError as error:
            results[name] = error
    return results


__all__ = ["BASELINES", "PIPELINES", "HEURISTICS", "run_baselines", "pipeline", "repair", "single", "round_robin", "sequential_fill", "balanced",
           "expert", "metis", "kernighan_lin", "etf", "sct"]
