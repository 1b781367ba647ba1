"""How close does placer's pipelined plan come to a hand-written threaded GPipe?

Issue 15 set its chain target (best pipelined plan at least 1.3x over the best
unpipelined) beside a ceiling: "a 60-line threaded GPipe reached 1.28x on a deep MLP
at m=4". This script is that yardstick, on zoo:mlp:medium and zoo:gpt:medium: two
threads of one intra-op thread each, stage 0 on the caller, stage 1 on a worker, the
forward of every micro-batch and then the backward in reverse (torchgpipe's GPipe,
Kim et al. 2020), the loss of micro-batch i weighted by its share of the batch. Beside
it: placer.apply of the pipeline heuristic's stages (placer.baselines.pipeline) at the
same m, and the eager model on one thread (what "all on cpu:0" runs). Candidates
interleaved A B C / C B A, ratios of medians with 95% bootstrap CIs, and each step's
minor page faults (the process's, a count the host's load does not change: on this KVM
guest a fault costs microseconds, and allocator behaviour differs between the two).
Record only on a quiet host:

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_gpipe_ref.py

Writes experiments/results/gpipe_ref.{json,md}.
"""

from __future__ import annotations

import argparse
import queue
import resource
import threading
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from _record import host_info, host_lines, record  # this folder is on sys.path when run as a script
from bench_handoff import interleave, ratio_ci
from bench_runtime import chain_plans
from placer.runtime import apply


class ThreadedGPipe:
    """Two stages, `first` on the calling thread and `second` on a worker thread, run
    with GPipe's schedule over `m` micro-batches (dim 0, torch.chunk). `step(x)` runs
    one training step's forward and backward, accumulating gradients as eager does."""

    def __init__(self, first: nn.Module, second: nn.Module, loss_fn: Callable, m: int):
        self.first, self.second, self.loss_fn, self.m = first, second, loss_fn, m
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        torch.set_num_threads(1)  # this thread's own intra-op threads
        while True:
            chunks = []
            for _ in range(self.m):  # forward of every micro-batch as it arrives
                hidden, x, share = self.inbox.get()
                chunks.append((hidden, self.loss_fn(self.second(hidden), x) * share))
            for hidden, loss in reversed(chunks):  # then the backward in reverse
                loss.backward()
                self.outbox.put(hidden.grad)

    def step(self, x: torch.Tensor) -> None:
        outputs = []
        for chunk in x.chunk(self.m):
            out = self.first(chunk)
            outputs.append(out)
            self.inbox.put((out.detach().requires_grad_(), chunk, chunk.shape[0] / x.shape[0]))
        for out in reversed(outputs):
            out.backward(self.outbox.get())


class GPTFront(nn.Module):
    """A zoo GPT's embeddings and its first `cut` blocks."""

    def __init__(self, gpt: nn.Module, cut: int):
        super().__init__()
        self.gpt, self.cut = gpt, cut

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.gpt.wte(tokens) + self.gpt.wpe(self.gpt.positions)
        for block in self.gpt.blocks[:self.cut]:
            x = block(x)
        return x


def halves(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The zoo chain cut at its middle block: (embeddings and) the first half of the
    blocks, then the rest and the head. placer's heuristic cuts by measured time, at
    or beside the same block."""
    cut = len(model.blocks) // 2
    if name == "mlp":
        return nn.Sequential(*model.blocks[:cut]), nn.Sequential(*model.blocks[cut:], model.head)
    return GPTFront(model, cut), nn.Sequential(*model.blocks[cut:], model.ln_f, model.lm_head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,gpt")
    parser.add_argument("--microbatches", default="2,4")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the caller is stage 0 / cpu:0 of two 1-thread devices
    counts = [int(m) for m in args.microbatches.split(",")]
    results: dict = {"host": host_info(), "models": {}}
    for name in args.models.split(","):
        workload, problem, unpipelined, pipelined = chain_plans(name, "medium")
        x = workload.inputs[0]
        eager = workload.fresh_model()
        candidates: dict[str, tuple[nn.Module, Callable[[], None]]] = {
            "one thread (eager)": (eager, lambda: workload.loss_fn(eager(x), x).backward())}
        closers = []
        for m in counts:
            ref = workload.fresh_model()
            gpipe = ThreadedGPipe(*halves(name, ref), workload.loss_fn, m)
            candidates[f"threaded GPipe m={m}"] = (ref, lambda gpipe=gpipe: gpipe.step(x))
            placed = apply(workload.fresh_model(), pipelined[f"stages, m={m}"])
            closers.append(placed.close)
            candidates[f"placer m={m}"] = (
                placed, lambda placed=placed: workload.loss_fn(placed(x), x).backward())
        faults: dict[str, list[int]] = {label: [] for label in candidates}

        def step(label: str) -> float:
            model, run = candidates[label]
            for p in model.parameters():
                p.grad = None  # as optimizer.zero_grad() does
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            run()
            elapsed = (time.perf_counter() - start) * 1e3
            faults[label].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return elapsed

        try:
            times = interleave(list(candidates), step, args.rounds, args.steps)
        finally:
            for close in closers:
                close()
        base = times["one thread (eager)"]
        rows = {label: {"median_ms": float(np.median(t)), "steps": len(t), "vs_one_thread": ratio_ci(base, t),
                        "page_faults": int(np.median(faults[label][1:]))} for label, t in times.items()}
        for m in counts:
            rows[f"placer m={m}"]["vs_threaded_gpipe"] = ratio_ci(times[f"threaded GPipe m={m}"],
                                                                 times[f"placer m={m}"])
        results["models"][f"{name}-medium"] = rows
        print(name, {label: round(r["median_ms"], 1) for label, r in rows.items()})
    lines = ["# placer's pipelined plans against a hand-written threaded GPipe", "",
             *host_lines(results["host"])]
    for model, rows in results["models"].items():
        lines += ["", f"## {model}", "", "| candidate | median ms | steps | over one thread (95% CI) |"
                  " placer / GPipe (> 1: placer faster) | page faults a step |", "| --- | ---: | ---: | --- | --- | ---: |"]
        for label, r in rows.items():
            vs = r.get("vs_threaded_gpipe")
            lines.append(f"| {label} | {r['median_ms']:.1f} | {r['steps']} | {_ci(r['vs_one_thread'])} | "
                         f"{_ci(vs) if vs else ''} | {r['page_faults']} |")
    record("gpipe_ref", results, "\n".join(lines) + "\n")


def _ci(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


if __name__ == "__main__":
    main()
