"""Train with a placement in your own training loop: the "reuse the learned placement"
path, written as a user would write it.

    # a plan from `placer optimize` or `placer baseline --out plan.json`:
    .venv/bin/python experiments/train_with_plan.py --workload zoo:transformer --plan plan.json --steps 20
    # no plan at hand: one is made here (the workload's expert placement over --devices)
    .venv/bin/python experiments/train_with_plan.py --workload zoo:transformer --steps 3

The only placer lines are `placer.load_plan` and `placer.apply`; the rest is an
ordinary PyTorch loop. At the end the placed model's checkpoint is loaded into a
plain, unplaced model, which gives the same loss: checkpoints move both ways.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import placer
from graphs.workload import load_workload


def make_plan(workload_spec: str, devices: str, path: Path) -> Path:
    """A plan from the workload's expert placement (what `placer baseline --method
    expert --out plan.json` writes)."""
    from placer.baselines import expert
    from placer.plan import make_plan as plan_for
    from graphs.problem import build_problem

    problem = build_problem(workload_spec, devices)
    return plan_for(problem, expert(problem), method="expert").save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="zoo:transformer")
    parser.add_argument("--plan", type=Path, default=None, help="plan.json (default: make one here)")
    parser.add_argument("--devices", default="cpu:0,cpu:1", help="devices of the plan made here")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="three steps: a check that it runs")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps

    workload = load_workload(args.workload)  # build_model(), example_inputs(), loss_fn
    plan_path = args.plan or make_plan(args.workload, args.devices, Path(tempfile.mkdtemp()) / "plan.json")

    # --- the user's own code, with a placement ---------------------------------
    plan = placer.load_plan(plan_path)
    model = placer.apply(workload.fresh_model(), plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = workload.inputs
    for step in range(1, steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        out = model(*inputs)
        loss = workload.loss_fn(out, *inputs)
        loss.backward()
        optimizer.step()
        print(f"step {step:>3}  loss {loss.item():.4f}  {(time.perf_counter() - start) * 1e3:7.1f} ms")
    checkpoint = model.state_dict()
    # ---------------------------------------------------------------------------

    plain = workload.fresh_model()
    plain.load_state_dict(checkpoint)
    with torch.no_grad():
        placed_loss = workload.loss_fn(model(*inputs), *inputs).item()
        plain_loss = workload.loss_fn(plain(*inputs), *inputs).item()
    print(f"plan {plan_path} ({plan.method}, devices {','.join(plan.devices)}): after {steps} steps the placed "
          f"model's loss is {placed_loss:.5f}; the unplaced model with its checkpoint gives {plain_loss:.5f}")


if __name__ == "__main__":
    main()
