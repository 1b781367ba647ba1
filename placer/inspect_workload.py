"""What `placer inspect` shows (graphs.summary), with the lower bound that optimize's
results.json and report give for the same model and devices, so that the two agree.

The bound (placer.optimize.bounds_of) floors each cost by the profile's scale (a
whole step slower than its ops alone is undone) and by the calibration saved by the
last optimize of this model on these devices (where it found the devices faster than
profiled), limits virtual CPU devices by the host's cores, and counts micro-batches
where the model allows them. (`inspect` once showed the plain profiled costs
instead, a higher bound than the report's for the same model and devices.)
"""

from __future__ import annotations

from envs.calibrate import Calibration, load_calibration
from graphs.bounds import LowerBound
from graphs.devices import host_cores
from graphs.problem import PlacementProblem, build_problem
from graphs.summary import summarize
from graphs.workload import Workload, load_workload
from placer.microbatch_policy import microbatch_notes, microbatches_off
from placer.optimize import bounds_of

__all__ = ["inspect_summary", "bound_as_optimize"]


def inspect_summary(workload: str, devices: str | None, max_groups: int) -> dict:
    """graphs.summary.summarize's JSON-ready summary of `workload` on `devices`, its
    bound the one optimize reports and notes saying under which calibration and, as
    optimize's do, why micro-batches are off (placer.microbatch_policy).

    Raises WorkloadError, CaptureError or DeviceSpecError (build_problem)."""
    loaded = load_workload(workload)
    problem = build_problem(loaded, devices, max_groups=max_groups)
    calibration = load_calibration(problem)
    basis = ("under this model's saved calibration for these devices" if calibration else
             "before any calibration (optimize's is lower where it finds the devices faster than profiled)")
    cluster = problem.cluster.devices
    refusal = microbatches_off(loaded, problem)  # as optimize notes it (bound_as_optimize asks again: cached)
    virtual = [d for d in cluster if d.is_virtual_cpu]
    shares = (f"virtual CPU devices' intra-op threads (each its share of this host's {host_cores()} cores): "
              + ", ".join(f"{d.name}: {d.threads} thread{'s' if d.threads > 1 else ''}" for d in virtual)
              ) if virtual else None
    return summarize(problem.ops, problem.groups, [d.kind for d in cluster],
                     bound=bound_as_optimize(loaded, problem, calibration),
                     notes=[*loaded.notes, f"lower bound as optimize's report gives it, {basis}",
                            *([shares] if shares else []), *microbatch_notes(problem, refusal)],
                     device_names=[d.name for d in cluster])


def bound_as_optimize(loaded: Workload, problem: PlacementProblem, calibration: Calibration | None) -> LowerBound:
    """The problem's lower bound as optimize's results.json and report give it (module
    docstring). As optimize does, it first keeps m = 1 alone in the problem's
    micro-batch tables for a model that micro-batches would change
    (placer.microbatch_policy.microbatches_off), so call it before computing any baseline."""
    microbatches_off(loaded, problem)
    bounds = bounds_of(problem, calibration)
    return LowerBound(critical_path_ms=bounds["critical_path_ms"], work_ms=bounds["work_ms"],
                      bound_ms=bounds["lower_bound_ms"], microbatches=bounds["microbatches"])
