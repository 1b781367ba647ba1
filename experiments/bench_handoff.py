"""Does running an idle device's chunk on the handing thread cost parallel plans anything?

placer.runtime.dataflow lets the thread that makes one task ready run it itself when the
task's device is idle (a device is a slot, not a thread), which takes the thread wake-up
out of a chain's crossing (bench_crossing.py). This A/B checks the other side: the towers
plan of bench_runtime.py (4 MLP towers; towers 0,1 on cpu:0, towers 2,3 and the head on
cpu:1), where both devices work at once, run as placer.apply runs it ("slot") and with the
rule turned off ("thread": every chunk on its own device's thread, as before), beside the
same model all on cpu:0. Candidates interleaved A B C / C B A, steps of one thread each,
ratios of medians with 95% bootstrap CIs. Record only on a quiet host:

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_handoff.py

Writes experiments/results/handoff.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _record import host_info, host_lines  # this folder is on sys.path when run as a script
from bench_runtime import Towers, module_path
from placer.plan import plan_from_assignment
from placer.runtime import apply, dataflow

RESULTS = Path(__file__).resolve().parent / "results"


SLOT = dataflow.Pass.__init__


def thread_per_device(self, *args, **kwargs) -> None:
    """Pass.__init__ with every chunk run only on its own device's thread (the rule off)."""
    SLOT(self, *args, **kwargs)
    self.takers = [{w} for w in self.chunk_workers]


def ratio_ci(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float, float]:
    """median(a) / median(b) and its 95% bootstrap CI."""
    rng = np.random.default_rng(0)
    x, y = np.array(a), np.array(b)
    values = [np.median(rng.choice(x, x.size)) / np.median(rng.choice(y, y.size)) for _ in range(n)]
    return float(np.median(x) / np.median(y)), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def interleave(names: list[str], step: Callable[[str], float], rounds: int, steps: int) -> dict[str, list[float]]:
    """Times of `step(name)` (ms) for every candidate: one warm-up step each, then `rounds`
    rounds of `steps` steps each, in order A B C, then C B A, alternately."""
    for name in names:
        step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name] += [step(name) for _ in range(steps)]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the caller serves cpu:0 of two 1-thread devices
    x = torch.randn(256, 1024)
    devices = ["cpu:0", "cpu:1"]

    def towers_apart(node) -> str:
        return "cpu:1" if module_path(node).startswith(("head", "towers.2", "towers.3")) else "cpu:0"

    placed = {name: apply(model, plan_from_assignment(model, assign, devices, inputs=(x,)))
              for name, model, assign in (("towers", Towers(1024, 4), towers_apart),
                                          ("all on cpu:0", Towers(1024, 4), lambda n: "cpu:0"))}
    candidates = {"slot": (placed["towers"], SLOT), "thread": (placed["towers"], thread_per_device),
                  "all on cpu:0": (placed["all on cpu:0"], SLOT)}
    def step(name: str) -> float:
        model, init = candidates[name]
        dataflow.Pass.__init__ = init  # each pass is a new Pass
        start = time.perf_counter()
        model(x).sum().backward()
        return (time.perf_counter() - start) * 1e3

    try:
        times = interleave(list(candidates), step, args.rounds, args.steps)
    finally:
        dataflow.Pass.__init__ = SLOT
        for model in placed.values():
            model.close()
    results = {"host": host_info(), "medians_ms": {k: float(np.median(v)) for k, v in times.items()},
               "steps": {k: len(v) for k, v in times.items()},
               "slot_vs_cpu0": ratio_ci(times["all on cpu:0"], times["slot"]),
               "thread_vs_cpu0": ratio_ci(times["all on cpu:0"], times["thread"]),
               "thread_over_slot": ratio_ci(times["thread"], times["slot"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "handoff.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Hand-off rule on a parallel plan (towers 2+2)", "", *host_lines(results["host"]), "",
             "| candidate | median ms | steps |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:.1f} | {results['steps'][k]} |" for k, v in results["medians_ms"].items()]
    for key, text in (("slot_vs_cpu0", "towers, slot rule, over all on cpu:0"),
                      ("thread_vs_cpu0", "towers, thread per device, over all on cpu:0"),
                      ("thread_over_slot", "thread per device / slot rule (> 1: the rule is faster)")):
        value, low, high = results[key]
        lines.append(f"\n{text}: {value:.2f}x (95% CI {low:.2f}-{high:.2f})")
    (RESULTS / "handoff.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'handoff'}.json and .md")


if __name__ == "__main__":
    main()
