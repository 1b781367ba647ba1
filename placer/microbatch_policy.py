"""Whether a workload's model may run in micro-batches at all, decided once before any
search, so that the searches, the pipeline heuristic, the lower bound and the notes
agree with what the runtime would refuse (placer.runtime.microbatch).

Two kinds of model are refused:

- one whose results micro-batches would change (batch norm in training, a buffer
  updated in forward: placer.runtime.microbatch.static_refusal), unless the workload
  accepts per-micro-batch statistics (`microbatch_statistics = True`);
- always, one with a single-value output, such as a loss computed inside the model
  (a ModelOutput's `loss` when labels are passed): micro-batches' values of it cannot
  be put back together (the runtime refuses it at its first step); and one with a
  gradient hook on a parameter, which micro-batches would run once each
  (placer.runtime.refusals.hook_refusal).

For either, the problem's micro-batch step tables keep m = 1 alone, so that no search
(placer.search.microbatch_options) and no pipeline heuristic (baselines.pipeline: the
simulator finds other counts unprofiled) proposes m > 1, and the lower bound
(placer.optimize.bounds_of) counts no pipelining.

optimize plans a training step, so this looks at the training capture whatever mode
the workload's model is in: batch norm keeps micro-batches off here although a plan
with m > 1 runs such a model exactly in eval mode (the runtime refuses it only at the
first call in training mode: placer.runtime.refusals.capture_refusal). Its note keeps
the workload's advice (`microbatch_statistics = True`), which only the workload's
author can follow before optimizing again.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx

from graphs.problem import PlacementProblem
from graphs.profile import MICROBATCHES
from graphs.trace import in_mode
from graphs.trace_inputs import BATCH_FREE, reads_inputs
from graphs.workload import Workload

__all__ = ["absent_counts", "microbatch_notes", "microbatches_off", "scalar_output"]


def microbatches_off(loaded: Workload, problem: PlacementProblem) -> str | None:
    """Why `loaded`'s model may not run in micro-batches (module docstring), trimming
    the problem's micro-batch tables to m = 1 when so; None when it may."""
    from graphs.capture import NodeFailure, propagate_shapes
    from graphs.trace import trace_model
    from placer.runtime.microbatch import static_refusal
    from placer.runtime.refusals import hook_refusal

    traced = trace_model(loaded.model, loaded.leaf_modules, inputs=loaded.inputs,
                         batch_dims=loaded.batch_dims)  # the capture's (trace_cache)
    if traced.method == "fx":  # fx records no shapes (the capture's shape pass may have run on a copy's graph)
        try:
            propagate_shapes(traced.gm, tuple(traced.bind(tuple(loaded.inputs), {}).values()))
        except NodeFailure:
            pass  # no shapes: the runtime's probe refuses a scalar output at the first micro-batched step
    source = problem.workload or loaded.spec
    reason = scalar_output(traced.gm.graph, source) or hook_refusal(source, loaded.model)
    if reason is None and not problem.microbatch_statistics:
        with in_mode(loaded.model, "train"):  # a module called whole (an fx leaf) reads its flag as it runs
            reason = static_refusal(traced.gm.graph, loaded.model, source, extra_roots=(traced.gm,))
    if reason:
        for graph in (g for g in (problem.groups, problem.ops) if g is not None):
            by_kind = graph.graph.get("microbatch_step_ms_by_kind") or {}
            graph.graph["microbatch_step_ms_by_kind"] = {k: _only_one(t) for k, t in by_kind.items()}
            graph.graph["microbatch_step_ms"] = _only_one(graph.graph.get("microbatch_step_ms"))
    return reason


def scalar_output(graph: fx.Graph, source: str) -> str | None:
    """Why a captured graph with a single-value (0-dimensional) tensor output cannot be
    micro-batched, naming the output; None when every output has dimensions (or the
    capture recorded no shapes: the runtime's probe still checks those)."""
    output = next(n for n in graph.nodes if n.op == "output")
    for node in output.all_input_nodes:
        value = node.meta.get("val", node.meta.get("tensor_meta"))
        if getattr(value, "shape", None) is not None and len(value.shape) == 0:
            if not reads_inputs(node):
                return f"{source}: output '{node.name}' {BATCH_FREE}"
            return (f"{source}: output '{node.name}' is a single value over the whole batch, such as a loss computed "
                    f"inside the model; micro-batches' values of it cannot be gathered: compute it in loss_fn to "
                    f"allow micro-batches")
    return None


def absent_counts(problem: PlacementProblem, counts: Iterable[int]) -> str:
    """Why the profile timed no step at each of `counts` (graphs.profile's `microbatch_absent`: the batch
    does not divide, or the model fails at batch / m; else that graphs.profile.MICROBATCHES lacks it),
    one clause per reason: "m = 4, 8: the batch (6 rows of input 'x', the first with a batch dimension)
    does not divide into m"."""
    known = problem.groups.graph.get("microbatch_absent") or {}
    by_reason: dict[str, list[str]] = {}
    for m in sorted(counts):
        why = known.get(m) or (f"placer profiles only {', '.join(map(str, MICROBATCHES))}" if m not in MICROBATCHES
                               else "not profiled (the model could not run, or was not timed, at batch / m)")
        by_reason.setdefault(why, []).append(str(m))
    return "; ".join(f"m = {', '.join(ms)}: {why}" for why, ms in by_reason.items())


def microbatch_notes(problem: PlacementProblem, refusal: str | None) -> list[str]:
    """The notes optimize and inspect give about micro-batches: why they are off (`refusal`, from
    microbatches_off), else which counts the profile could not time and why (absent_counts); [] when
    every count is open."""
    if refusal:
        return [f"micro-batches off: {refusal}"]
    absent = problem.groups.graph.get("microbatch_absent") or {}
    return [f"micro-batch counts unavailable: {absent_counts(problem, absent)}"] if absent else []


def _only_one(table: dict | None) -> dict | None:
    """A micro-batch step table ({m: ms}, keys ints or JSON's strings) with m = 1 alone."""
    return {m: ms for m, ms in table.items() if int(m) == 1} if table else table
