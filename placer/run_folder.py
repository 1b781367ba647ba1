"""The output folder of `placer optimize` between runs: `--resume` continues the run
there only when it is the same job (its measurements' identity: workload, devices,
memory caps, groups, workers, then the graph's fingerprint), and a fresh run never
mixes with an earlier one (another workload's run is refused; the same one's search
checkpoint is removed). What a run there wrote, for a user who passes its results.json
or a plan.json it did not write (`plan_of_run`, `run_beside`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from graphs.errors import CheckpointError
from placer.book import MeasurementBook

__all__ = ["check_resume", "check_fresh", "plan_of_run", "run_beside"]


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


def plan_of_run(path: Path, results: dict) -> str:
    """What to pass instead of the results file `path` (its JSON `results`): the plan its
    run wrote, while it is there; else why it wrote none, in the run's own headline."""
    from placer.report import UNCONFIRMED_PLAN  # here: placer.report imports what imports this module

    written = path.parent / str(results.get("plan") or "")
    if results.get("plan") and written.is_file():
        return f"pass the plan beside it, {written}"
    if results.get("command") == "compare":
        plans = [r["plan"] for r in results.get("methods", []) if isinstance(r, dict) and Path(r.get("plan") or "").is_file()]
        return "placer compare writes no plan: pass one of the plans it compared" + (f", e.g. {plans[0]}" if plans else "")
    if results.get("plan"):
        return f"the plan its run wrote, {written}, is no longer there: run placer optimize again to write one"
    choice = results.get("choice") if isinstance(results.get("choice"), dict) else {}
    aside = path.parent / UNCONFIRMED_PLAN
    earlier = f" ({aside} is an earlier run's plan that it could not confirm)" if aside.is_file() else ""
    why = str(choice.get("headline") or "") or "Run placer optimize again to write one."  # says what to do
    return f"its run wrote no plan{earlier}: {why}"


def run_beside(path: Path) -> str:
    """For a plan file `path` that is not there: "; " and what the run whose results.json
    lies beside it wrote (plan_of_run), or "" where there is none."""
    try:
        results = json.loads((path.parent / "results.json").read_text())
    except (OSError, ValueError):
        return ""
    return f"; {plan_of_run(path.parent / 'results.json', results)}" if isinstance(results, dict) else ""
