"""What one crossing between devices costs the runtime (issue 15 item 2).

A chain of 32 Linear(128) blocks, placed round robin over cpu:0,cpu:1 (31 crossings,
each crossed forward and backward), against the same chain all on cpu:0 of the same
cluster; the difference over 31 is the cost of a crossing. Target: at most 150 us.
The round robin is measured twice: as `placer.apply` runs it (the headline row:
workers unpinned, so a thread that hands a chain on to an idle device runs the next
chunk itself, placer.runtime.dataflow) and with its workers pinned to their own
cores (`Executor.repin(True)`: every crossing a thread wake-up, as every crossing
was before the runtime ran an idle device's task on the handing thread).
Beside it, the floors of this host: a bare thread hand-off (SimpleQueue, a small
matmul each side, one way) and a detached chunk's own autograd.backward call, and
the `unplaced` row (the eager model with the host's threads).

Candidates are measured interleaved, A B C then C B A, round after round, so that
drift hits all alike; each row reports the median step, its 95% bootstrap CI and
the number of steps. Record only on a quiet host, under the heavy lock:

    flock /tmp/placer-heavy.lock .venv/bin/python experiments/bench_crossing.py
    .venv/bin/python experiments/bench_crossing.py --quick      # a check that it runs
    .venv/bin/python experiments/bench_crossing.py --profile    # where a round-robin step's time goes

Writes experiments/results/crossing.{json,md} (crossing_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _record import host_info, host_lines  # this folder is on sys.path when run as a script
from graphs.devices import parse_cluster
from placer.plan import plan_from_assignment
from placer.runtime import apply

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS, WIDTH, ROWS = 32, 128, 32


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(BLOCKS)])

    def forward(self, x):
        return self.blocks(x)


def block_of(node) -> int | None:
    """The block a traced node belongs to (by its module path), None for others."""
    paths = [str(node.target)] if node.op in ("call_module", "get_attr") else []
    stack = node.meta.get("nn_module_stack")
    if stack:
        paths.append(str(list(stack.values())[-1][0]))
    for path in paths:
        parts = path.split(".")
        if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
            return int(parts[1])
    return None


def step_fn(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return step


def candidates() -> dict:
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(ROWS, WIDTH)
    devices = ["cpu:0", "cpu:1"]
    cluster = parse_cluster(",".join(devices))

    def placed(assign) -> nn.Module:
        fresh = Chain()
        fresh.load_state_dict(model.state_dict())
        plan = plan_from_assignment(fresh, assign, devices, method="bench")
        return apply(fresh, plan, cluster)

    def round_robin(node) -> str:
        block = block_of(node)
        return devices[(block or 0) % 2]

    unplaced = Chain()
    unplaced.load_state_dict(model.state_dict())
    pinned = placed(round_robin)
    pinned.executor.repin(True)
    return {"unplaced": (unplaced, x), "single": (placed(lambda n: "cpu:0"), x),
            "round_robin": (placed(round_robin), x), "round_robin_pinned": (pinned, x)}


def timed(step, threads: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3
    finally:
        torch.set_num_threads(before)


def bootstrap_ci(samples: np.ndarray, stat, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = [stat(rng.choice(samples, samples.size)) for _ in range(n)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def measure(rounds: int, steps: int, warmup: int) -> dict:
    """Interleaved rounds (A B C, C B A, ...) of `steps` steps per candidate."""
    models = candidates()
    host = os.cpu_count() or 1
    threads = {name: 1 for name in models}  # cpu:0 served by the caller
    threads["unplaced"] = torch.get_num_threads()
    steps_of = {name: step_fn(m, x) for name, (m, x) in models.items()}
    for name, step in steps_of.items():
        for _ in range(warmup):
            timed(step, threads[name])
    times = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name] += [timed(steps_of[name], threads[name]) for _ in range(steps)]
    for name, (m, _) in models.items():
        if hasattr(m, "close"):
            m.close()
    rows = {}
    for name, t in times.items():
        t = np.array(t)
        rows[name] = {"median_ms": float(np.median(t)), "ci_ms": bootstrap_ci(t, np.median), "steps": int(t.size),
                      "threads": threads[name]}
    per, ci = per_crossing(np.array(times["round_robin"]), np.array(times["single"]))
    per_pinned, ci_pinned = per_crossing(np.array(times["round_robin_pinned"]), np.array(times["single"]))
    return {"rows": rows, "crossings": BLOCKS - 1, "host_cores": host, "per_crossing_us": per,
            "per_crossing_ci_us": ci, "per_crossing_pinned_us": per_pinned, "per_crossing_pinned_ci_us": ci_pinned,
            "target_us": 150.0}


def per_crossing(crossed: np.ndarray, single: np.ndarray) -> tuple[float, tuple[float, float]]:
    """The per-crossing cost (us) of steps `crossed` over steps `single` (ms): the
    difference of medians over the chain's crossings, and its 95% bootstrap CI."""
    crossings = BLOCKS - 1
    rng = np.random.default_rng(1)
    diffs = [(np.median(rng.choice(crossed, crossed.size)) - np.median(rng.choice(single, single.size)))
             / crossings * 1e3 for _ in range(2000)]
    per = (np.median(crossed) - np.median(single)) / crossings * 1e3
    return float(per), (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)))


def handoff_floor(n: int = 2000) -> float:
    """One-way time of a SimpleQueue hand-off between two threads, a small matmul each side (us)."""
    a, b = queue.SimpleQueue(), queue.SimpleQueue()
    w, x = torch.randn(WIDTH, WIDTH), torch.randn(ROWS, WIDTH)

    def echo() -> None:
        torch.set_num_threads(1)
        for _ in range(n):
            y = a.get()
            b.put(y @ w)

    t = threading.Thread(target=echo)
    t.start()
    start = time.perf_counter()
    for _ in range(n):
        a.put(x @ w)
        b.get()
    elapsed = time.perf_counter() - start
    t.join()
    return elapsed / (2 * n) * 1e6


def backward_floor(n: int = 2000) -> float:
    """A detached chunk's own autograd.backward on one Linear(128) (us per call)."""
    layer, x = nn.Linear(WIDTH, WIDTH), torch.randn(ROWS, WIDTH)
    g = torch.ones(ROWS, WIDTH)
    start = time.perf_counter()
    for _ in range(n):
        leaf = x.detach().requires_grad_()
        torch.autograd.backward([layer(leaf)], [g])
    return (time.perf_counter() - start) / n * 1e6


def profile(steps: int) -> None:
    models = candidates()
    model, x = models.pop("round_robin")
    for other, _ in models.values():
        if hasattr(other, "close"):
            other.close()
    step = step_fn(model, x)
    torch.set_num_threads(1)
    for _ in range(5):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    model.close()


def write_markdown(path: Path, results: dict) -> None:
    r = results["crossing"]
    lines = [f"# Crossing cost{' (quick: timings meaningless)' if results['quick'] else ''}", "",
             *host_lines(results["host"]), "",
             f"{BLOCKS} x Linear({WIDTH}), batch {ROWS}; round robin over cpu:0,cpu:1 = {r['crossings']} crossings, "
             f"each forward and backward. Candidates interleaved A B C / C B A.", "",
             "| placement | threads | median ms | 95% CI | steps |", "| --- | ---: | ---: | --- | ---: |"]
    for name, row in r["rows"].items():
        lo, hi = row["ci_ms"]
        lines.append(f"| {name} | {row['threads']} | {row['median_ms']:.3f} | {lo:.3f}-{hi:.3f} | {row['steps']} |")
    lo, hi = r["per_crossing_ci_us"]
    plo, phi = r["per_crossing_pinned_ci_us"]
    lines += ["", f"Per crossing (forward + backward): **{r['per_crossing_us']:.0f} us** (95% CI {lo:.0f}-{hi:.0f}; "
              f"target <= {r['target_us']:.0f} us, as placer.apply runs it); workers pinned, a wake-up per "
              f"crossing: {r['per_crossing_pinned_us']:.0f} us (95% CI {plo:.0f}-{phi:.0f}).", "",
              f"Floors here: a bare thread hand-off {results['handoff_us']:.0f} us one way; a detached chunk's own "
              f"autograd.backward {results['backward_us']:.0f} us."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a check that it runs")
    parser.add_argument("--profile", action="store_true", help="print where a round-robin step's time goes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.profile:
        profile(args.steps)
        return
    rounds, steps, warmup = (2, 3, 2) if args.quick else (args.rounds, args.steps, 10)
    results = {
        "quick": args.quick, "host": host_info(),  # experiments/_record.py: the one host-info helper
        "crossing": measure(rounds, steps, warmup),
        "handoff_us": handoff_floor(200 if args.quick else 5000),
        "backward_us": backward_floor(200 if args.quick else 5000),
    }
    print(f"per crossing {results['crossing']['per_crossing_us']:.0f} us (target 150; pinned "
          f"{results['crossing']['per_crossing_pinned_us']:.0f} us); hand-off floor "
          f"{results['handoff_us']:.0f} us, backward floor {results['backward_us']:.0f} us")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "crossing_quick" if args.quick else "crossing"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(RESULTS / f"{stem}.md", results)
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
