"""The output folder of `placer optimize` between runs: `--resume` continues the run
there only when it is the same job (its measurements' identity: workload, devices,
memory caps, groups, workers, then the graph's fingerprint), and a fresh run never
mixes with an earlier one (another workload's run is refused; the same one's search
checkpoint is removed).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from graphs.errors import CheckpointError
from placer.measurements import MeasurementBook

__all__ = ["check_resume", "check_fresh"]


def check_resume(path: Path, identity: dict, keys: Sequence[str]) -> None:
    """Refuse --resume into `path`'s folder where there is nothing to continue, or
    where the earlier run (the identity of the book `path` saved last) differs from
    `identity` in one of `keys`.

    Raises
    ------
    CheckpointError : the folder is missing, or a key differs (naming each, was/now; memory
        without a cap before or now is not named beside other devices).
    """
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot --resume in {path.parent}: the folder does not exist (no earlier run there); "
                              f"run without --resume or give the --out of the run to continue")
    previous = MeasurementBook.last_identity(path)
    if previous is None:
        return
    changed = [k for k in keys if k in previous and not _same(k, previous[k], identity.get(k))]
    if "devices" in changed and "memory" in changed and not any(previous["memory"] or []) \
            and not any(identity.get("memory") or []):
        changed.remove("memory")  # no caps before or now: only the device count differs, which devices says
    if changed:
        what = "; ".join(f"{k} was {previous[k]}, now {identity.get(k)}" for k in changed)
        raise CheckpointError(f"cannot --resume in {path.parent}: the earlier run differs ({what}); "
                              f"run without --resume or choose another --out")


def check_fresh(out: Path, identity: dict, warn: Callable[[str], None]) -> None:
    """A fresh run (no --resume) never mixes with an earlier one in `out`: refused when
    the earlier run (its measurements' identity) was of another workload or devices;
    else the earlier run's search checkpoint (out/search: policy.pt, checkpoint.pt,
    the curve) is removed, saying so, so that a later --policy or --resume reads this
    run's search alone. `warn` is told of the removal.

    Raises
    ------
    CheckpointError : `out` holds a run of another workload or devices.
    """
    previous = MeasurementBook.last_identity(out / "measurements.json")
    if previous is not None and any(k in previous and not _same(k, previous[k], identity[k])
                                    for k in ("workload", "devices")):
        devices = ",".join(previous.get("devices") or identity["devices"])
        raise CheckpointError(f"--out {out} holds a run of {previous.get('workload', identity['workload'])} on "
                              f"{devices}: use another --out, --resume to continue it, or delete it")
    search = out / "search"
    if search.is_dir() and any(search.iterdir()):
        shutil.rmtree(search)
        warn(f"{search}: removed the earlier run's search checkpoint (a fresh run; --resume would continue it)")


def _same(key: str, before: object, now: object) -> bool:
    """Whether an identity's value is unchanged; a workload file named by another path is the same."""
    if before == now:
        return True
    if key != "workload" or not isinstance(before, str):
        return False
    return Path(before).is_file() and Path(str(now)).is_file() and Path(before).samefile(str(now))
