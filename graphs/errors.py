"""Every failure a user can cause is one of these: the CLI prints `error: <message>`
and exits non-zero; API callers catch the specific type."""


class PlacerError(Exception):
    """Base class of placer's user-facing errors. The message is one clear line."""


class WorkloadError(PlacerError):
    """A workload file or zoo name cannot be loaded or does not follow the contract."""


class CaptureError(PlacerError):
    """The model cannot be traced into a graph, even at coarser grain."""


class DeviceSpecError(PlacerError):
    """A --devices or --memory string is malformed or names a device this host lacks."""


class PlanError(PlacerError):
    """A plan file is corrupt, of an unknown format, or made for another model."""


class InfeasibleError(PlacerError):
    """No placement of the requested kind fits the devices' memory or constraints."""


class CheckpointError(PlacerError):
    """A search checkpoint or a saved policy is corrupt, of an unknown format, or made for
    another problem (other model, devices or memory caps)."""


class ExecutionError(PlacerError):
    """A placed model cannot run: its executor is closed, a worker died, or a step ran
    past its time limit."""


def exit_error(label: str, code: object) -> WorkloadError:
    """The error for workload code that ended the process (`sys.exit(code)`, `exit()`,
    `raise SystemExit`) where placer ran it: `label` names what ran (a function of the
    workload file, the model's forward). Placer turns a SystemExit into this only where
    the workload's code runs; one raised anywhere else is left alone."""
    return WorkloadError(f"{label} called sys.exit({code!r}); a workload must return a value or raise an "
                         f"exception, not end the process")
