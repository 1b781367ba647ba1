"""Timing primitives the profiler builds on: the median of a call's samples after a
warm-up, a model's state kept across timed training steps, torch's CPU threads for a
block. Plain functions, no caching: graphs.profile decides what to time and keeps it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

MIN_SAMPLE_MS = 0.5  # each timing sample runs a node this long at least
MAX_INNER = 1000  # ... but repeats a tiny node at most this often per sample
NODE_BUDGET_MS = 200.0  # no further samples once a node's calls (its warm-up too) took this long


def time_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None],
            budget_ms: float = NODE_BUDGET_MS) -> tuple[float, object]:
    """(median ms of `fn` over up to `repeats` samples, its last result). A first call
    warms up and calibrates how many calls one sample needs to last MIN_SAMPLE_MS; it
    is never a sample, even for a slow `fn` (one call per sample): a first call pays
    for caches, allocations and an optimizer's first state, and with 3 samples it
    would make the median the slower of the two real ones (whole steps ~10% high).
    Sampling stops early, after one sample at least, once the calls (the first
    included) took `budget_ms`."""
    result, first_ms = _timed(fn, 1, sync)
    inner = max(1, min(MAX_INNER, int(MIN_SAMPLE_MS / max(first_ms, 1e-6))))
    samples: list[float] = []
    spent_ms = first_ms
    while len(samples) < max(1, repeats) and not (samples and spent_ms >= budget_ms):
        result, ms = _timed(fn, inner, sync)
        samples.append(ms)
        spent_ms += ms * inner
    return statistics.median(samples), result


def _timed(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> tuple[object, float]:
    """(last result, ms per call) of `calls` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        result = fn()
    sync()
    return result, (time.perf_counter() - start) * 1e3 / calls


@contextlib.contextmanager
def state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter and buffer value (a forward may update buffers; a step
    changes weights) and drop gradients afterwards."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                v.copy_(snapshot[k])
        model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """The block run with torch's intra-op thread count at `threads` (None, 0: as it is), restored after."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
