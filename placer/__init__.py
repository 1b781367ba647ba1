"""placer: device placement optimization for PyTorch training.

The public API a training loop needs:

    import placer
    plan = placer.load_plan("placer-out/nmt/plan.json")
    model = placer.apply(build_model(), plan)   # an ordinary nn.Module
"""

from graphs.errors import (
    CaptureError,
    CheckpointError,
    DeviceSpecError,
    ExecutionError,
    InfeasibleError,
    PlacerError,
    PlanError,
    WorkloadError,
)

__all__ = [
    "apply", "load_plan", "Plan", "PlacerError", "WorkloadError", "CaptureError",
    "DeviceSpecError", "PlanError", "InfeasibleError", "CheckpointError", "ExecutionError",
]


def __getattr__(name: str):
    # Imported on first use so that `import placer` stays cheap for the CLI.
    if name == "apply":
        from placer.runtime import apply
        return apply
    if name in ("load_plan", "Plan"):
        from placer import plan
        return getattr(plan, name)
    raise AttributeError(name)
