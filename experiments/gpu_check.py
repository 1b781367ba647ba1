"""The parts of experiments/gpu_check.sh that run Python: each checks one thing on a
machine with one CUDA GPU and prints what it saw, ending with one line
`RESULT <part> PASS|FAIL|SKIP <why>` (exit status 0, 1 or 3).

    python3 experiments/gpu_check.py env
    python3 experiments/gpu_check.py plan        # a cuda:0,cpu plan: equals the unplaced model? how fast?
    python3 experiments/gpu_check.py microbatch  # the same plan in 2 micro-batches (placer.apply, GPipe)
    python3 experiments/gpu_check.py pipelining  # the same plan on torch.distributed.pipelining (two ranks)
    python3 experiments/gpu_check.py bf16        # under bf16 autocast: equal within bf16 tolerance? how fast?

Without CUDA each part but `env` is SKIPped with the reason; `--stand-in` runs it with
the virtual CPU device cpu:1 standing in for cuda:0 (a dry run of the script's logic).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASS, FAIL, SKIP = 0, 1, 3
SPEC = "zoo:transformer:medium"  # steps of tens of ms on a GPU, the CPU half bounded by the host
FP32_RTOL = 1e-4  # GPU vs CPU float32 (TF32 off): summation order only
BF16_RTOL = 3e-2  # bf16 keeps 8 bits of mantissa: a loss agrees to about 1e-2
BF16_COSINE = 0.99  # each gradient's direction under bf16 autocast vs float32


class Skip(Exception):
    pass


def accelerator(stand_in: bool) -> str:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return "cuda:0"
    if stand_in:
        return "cpu:1"
    raise Skip("no CUDA device (torch.cuda.is_available() is False); --stand-in runs it on cpu:1 instead")


def half_plan(spec: str, first: str, second: str = "cpu"):
    """The model's captured graph (torch.export where it can) cut in two contiguous
    halves: the first on `first`."""
    from graphs.workload import load_workload
    from train_distributed import contiguous_plan

    w = load_workload(spec)
    second = "cpu:0" if first.startswith("cpu") else second
    return w, contiguous_plan(w.fresh_model(), [first, second], w.leaf_modules, spec, w.inputs)


def one_step(model: torch.nn.Module, workload, autocast: str | None = None,
             device: str | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients (on the host, by parameter name) of one forward and backward,
    the batch on `device` (None: where the workload made it)."""
    inputs = tuple(x.to(device) for x in workload.inputs) if device else workload.inputs
    model.zero_grad(set_to_none=True)
    with torch.autocast(autocast, dtype=torch.bfloat16) if autocast else nullcontext():
        out = model(*inputs)
    loss = workload.loss_fn(out, *inputs)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def compare(expected: tuple[float, dict], actual: tuple[float, dict], rtol: float, cosine: float | None = None) -> str:
    """'' when `actual` matches `expected` (loss and every gradient), else what differs."""
    (loss0, grads0), (loss1, grads1) = expected, actual
    if set(grads0) != set(grads1):
        return f"gradients of {sorted(set(grads0) ^ set(grads1))[:3]} on one side only"
    if abs(loss1 - loss0) > rtol * abs(loss0):
        return f"loss {loss1:.6g} vs {loss0:.6g}"
    for name, g0 in grads0.items():
        g1 = grads1[name]
        if cosine is not None:
            c = torch.nn.functional.cosine_similarity(g0.flatten(), g1.flatten(), dim=0).item()
            if g0.abs().max() > 0 and c < cosine:
                return f"gradient of {name}: cosine {c:.4f} < {cosine}"
        elif (g1 - g0).abs().max() > rtol * g0.abs().max() + 1e-7:
            return f"gradient of {name}: max error {(g1 - g0).abs().max():.3g} vs scale {g0.abs().max():.3g}"
    print(f"  loss {loss1:.6f} (unplaced {loss0:.6f}); {len(grads0)} gradients agree")
    return ""


def show(label: str, m) -> None:
    if m.feasible:
        print(f"  {label}: median {m.median_ms:.2f} ms, IQR {m.iqr_ms:.2f} ms, {len(m.times_ms)} steps")
    else:
        print(f"  {label}: infeasible: {m.reason}")


# -- the parts ----------------------------------------------------------------------

def part_env(args) -> str:
    print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"available {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"  {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    import placer
    print(f"  placer from {Path(placer.__file__).parent}")
    return ""


def placed_like_unplaced(w, plan, label: str, iters: int) -> str:
    """Apply `plan`: one step's loss and gradients against the unplaced model's, then
    its measured step time."""
    import placer
    from placer.runtime import measure

    placed = placer.apply(w.fresh_model(), plan)
    try:
        problem = compare(one_step(w.fresh_model(), w), one_step(placed, w), FP32_RTOL)
    finally:
        placed.close()
    show(label, measure(w, plan, iters=iters, warmup=2))
    return problem


def part_plan(args) -> str:
    from placer.runtime.timing import EagerTrial, run_trial

    device = accelerator(args.stand_in)
    w, plan = half_plan(SPEC, device)
    print(f"{SPEC} on {','.join(plan.devices)}: {sum(d == device for d in plan.assignment.values())} of "
          f"{len(plan.assignment)} nodes on {device}")
    problem = placed_like_unplaced(w, plan, "placed", args.iters)
    show(f"unplaced on {device.split(':')[0]}", run_trial(EagerTrial(w, device=device.split(":")[0]), args.iters))
    return problem


def part_microbatch(args) -> str:
    w, plan = half_plan(SPEC, accelerator(args.stand_in))
    return placed_like_unplaced(w, dataclasses.replace(plan, microbatches=2, schedule="gpipe"),
                                "placed, 2 micro-batches (GPipe)", args.iters)


def part_pipelining(args) -> str:
    from graphs.workload import load_workload
    from placer.distributed import measure_pipelined, train_pipelined

    device = accelerator(args.stand_in)
    spec = "zoo:transformer"  # two ranks start in seconds with the small model
    _, plan = half_plan(spec, device)
    losses = train_pipelined(spec, plan, 3, microbatches=2, schedule="1f1b", timeout_s=120)
    w = load_workload(spec)
    model = w.fresh_model()
    optimizer = w.make_optimizer(model.parameters())
    expected = []
    for _ in range(3):
        loss, _ = one_step(model, w)
        optimizer.step()
        expected.append(loss)
    print(f"  losses {losses}\n  unplaced {expected}")
    show("2 ranks, 2 micro-batches (1F1B)", measure_pipelined(spec, plan, iters=args.iters, warmup=2,
                                                               microbatches=2, schedule="1f1b", timeout_s=120))
    bad = [(a, b) for a, b in zip(losses, expected) if abs(a - b) > FP32_RTOL * abs(b)]
    return f"losses {bad[0][0]:.6g} vs unplaced {bad[0][1]:.6g}" if bad else ""


def part_bf16(args) -> str:
    import placer
    from placer.runtime.timing import summarize, time_steps

    device = accelerator(args.stand_in)
    kind = device.split(":")[0]
    w, plan = half_plan(SPEC, device)
    fp32 = one_step(w.fresh_model(), w)
    eager = one_step(w.fresh_model().to(kind), w, autocast=kind, device=kind)
    placed = placer.apply(w.fresh_model(), plan)
    try:
        ours = one_step(placed, w, autocast=kind)
        off_eager, off_ours = abs(eager[0] - fp32[0]), abs(ours[0] - fp32[0])
        print(f"  loss under bf16 autocast: unplaced {eager[0]:.6f}, placed {ours[0]:.6f}, float32 {fp32[0]:.6f}")
        if off_ours < 0.1 * off_eager:
            problem = (f"autocast did not reach the placed model (its loss is float32's to {off_ours:.2g}, eager "
                       f"bf16 is {off_eager:.2g} away): autocast is per thread and chunks run on device workers")
        else:
            problem = compare(fp32, ours, BF16_RTOL, BF16_COSINE)
        optimizer = w.make_optimizer(placed.parameters())

        def step() -> None:
            one_step(placed, w, autocast=kind)
            optimizer.step()

        sync = [device] if kind == "cuda" else []
        time_steps(step, 2, sync=sync)  # warm-up
        show("placed, bf16 autocast", summarize(time_steps(step, args.iters, sync=sync)))
    finally:
        placed.close()
    return problem


PARTS: dict[str, Callable] = {"env": part_env, "plan": part_plan, "microbatch": part_microbatch,
                              "pipelining": part_pipelining, "bf16": part_bf16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--stand-in", action="store_true", help="without CUDA, run on cpu:1 instead of skipping")
    args = parser.parse_args()
    try:
        problem = PARTS[args.part](args)
    except Skip as exc:
        print(f"RESULT {args.part} SKIP {exc}", flush=True)
        return SKIP
    except Exception as exc:
        traceback.print_exc()
        print(f"RESULT {args.part} FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              flush=True)
        return FAIL
    print(f"RESULT {args.part} {'FAIL ' + problem if problem else 'PASS'}", flush=True)
    return FAIL if problem else PASS


if __name__ == "__main__":
    sys.exit(main())
