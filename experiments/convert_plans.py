"""Convert recorded plan files from format v1 to v2, leaving their numbers as they are.

    python experiments/convert_plans.py experiments/results

A v1 plan was made on a torch.fx capture; as v2 it keeps that capture (method "fx"),
gains the example batch's signature where recapturing with it reproduces the plan's
graph (checked by fingerprint), one micro-batch, no schedule, and a device_map in
accelerate's names covering every tensor of the model. A plan whose model no longer
matches its fingerprint is reported and left alone (re-run `placer optimize` for it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from graphs.capture import input_signature
from graphs.errors import PlacerError
from graphs.workload import load_workload
from placer.plan import FORMAT_V1, Capture, accelerate_device_map, load_plan, trace_for_plan


def convert(path: Path) -> str:
    """Rewrite one v1 plan file as v2; returns what happened, in a few words."""
    if json.loads(path.read_text()).get("format") != FORMAT_V1:
        return "not v1: left alone"
    plan = load_plan(path)
    workload = load_workload(plan.workload)
    trace_for_plan(workload.fresh_model(), plan)  # PlanError when the model no longer matches
    with_inputs = replace(plan, capture=Capture(method="fx", leaf_paths=plan.capture.leaf_paths,
                                                inputs=input_signature(workload.inputs)))
    try:
        trace_for_plan(workload.fresh_model(), with_inputs)
        plan = with_inputs
    except PlacerError:
        pass  # the example call changes the fx graph (an optional argument): keep the v1 capture
    plan.device_map = accelerate_device_map(plan.device_map, workload.model.state_dict(), plan.devices[0])
    plan.save(path)
    return "converted" + ("" if plan.capture.inputs is None else ", with the example batch's signature")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="searched recursively for plan.json files")
    args = parser.parse_args()
    failed = False
    for path in sorted(args.folder.rglob("plan.json")):
        try:
            print(f"{path}: {convert(path)}")
        except PlacerError as exc:
            failed = True
            print(f"{path}: not converted: {exc}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
