"""Where a pipelined mlp step's page faults come from (docs/results.md, "Against a
hand-written threaded GPipe"): zoo:mlp:medium's pipeline stages at m=4 over cpu:0,cpu:1,
run by placer.apply or by bench_gpipe_ref's threaded GPipe, alone in this process. It
prints each step's minor page faults (counts: the host's load does not change them),
for placer per chunk task as well (phase, micro-batch, device, the running thread's
faults), and glibc's `malloc_stats` (each arena's bytes) after the last step:

    .venv/bin/python experiments/probe_faults.py placer
    .venv/bin/python experiments/probe_faults.py gpipe

Printed, not recorded. Linux with glibc only.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import threading

import torch

from bench_gpipe_ref import ThreadedGPipe, halves  # this folder is on sys.path when run as a script
from bench_runtime import chain_plans
from placer.runtime import apply

STEPS = 5


def faults(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_minflt


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "placer"
    torch.set_num_threads(1)  # the caller is cpu:0 of two 1-thread devices
    workload, _, _, pipelined = chain_plans("mlp", "medium")
    x = workload.inputs[0]
    tasks: list[str] = []
    if which == "placer":
        model = apply(workload.fresh_model(), pipelined["stages, m=4"])
        executor = model.executor
        for name in ("_forward_task", "_backward_task"):
            run = getattr(executor, name)

            def counted(*args, run=run, phase=name[1]):
                before = faults(resource.RUSAGE_THREAD)
                run(*args)
                tasks.append(f"{phase}{args[-2]}{executor.chunks[args[-1]].device[-1]}"
                             f"({threading.current_thread().name[:6]}):{faults(resource.RUSAGE_THREAD) - before}")
            setattr(executor, name, counted)
        step = lambda: workload.loss_fn(model(x), x).backward()  # noqa: E731
    else:
        model = workload.fresh_model()
        gpipe = ThreadedGPipe(*halves("mlp", model), workload.loss_fn, 4)
        step = lambda: gpipe.step(x)  # noqa: E731
    for i in range(STEPS):
        tasks.clear()
        for p in model.parameters():
            p.grad = None  # as optimizer.zero_grad() does
        before = faults()
        step()
        print(f"step {i}: {faults() - before} page faults" + (f"; tasks {' '.join(tasks)}" if tasks else ""))
    sys.stdout.flush()
    ctypes.CDLL("libc.so.6").malloc_stats()  # to stderr


if __name__ == "__main__":
    main()
