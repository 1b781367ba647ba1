"""Two probes behind the chain target's ceiling on this host (docs/results.md, "Against a
hand-written threaded GPipe"): how much slower 8 zoo-mlp blocks run (forward and backward,
one intra-op thread) when two threads run them at once than when one runs alone, and how
their time scales with the rows of a micro-batch. Three rounds per row count; the host
must be quiet (its speed wanders 10-30% between minutes, so read the spread, not one round):

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/probe_contention.py

Printed, not recorded. At 2026-12-01 18:54 UTC (load about 1) two at once were 1.11-1.17x
slower than one alone in 6 rounds of 9, and 0.66-0.96x in the other 3 (the host's own drift);
alone, 64 rows took 73-76 ms against 213-230 ms at 256 rows: about 0.74 of the full batch's
rate per row.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
from torch import nn

WIDTH, BLOCKS, STEPS = 1024, 8, 8


def blocks() -> nn.Module:
    """8 blocks of zoo:mlp:medium (Linear, LayerNorm, GELU)."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.GELU())
                           for _ in range(BLOCKS)])


def median_step_ms(model: nn.Module, x: torch.Tensor) -> float:
    torch.set_num_threads(1)  # this thread's own intra-op threads
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for rows in (256, 128, 64):
        models, inputs = [blocks(), blocks()], [torch.randn(rows, WIDTH) for _ in range(2)]
        for _ in range(3):
            alone = median_step_ms(models[0], inputs[0])
            together: list[float] = []
            threads = [threading.Thread(target=lambda i=i: together.append(median_step_ms(models[i], inputs[i])))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"{rows} rows: alone {alone:.1f} ms, two at once {together[0]:.1f} / {together[1]:.1f} ms: "
                  f"{statistics.mean(together) / alone:.2f}x")


if __name__ == "__main__":
    main()
