"""`random_search`: uniformly random candidates, the cheapest yardstick.

Each round draws `batch_size` candidates: every group a uniformly random device (a
group that shares parameters with an earlier one takes that one's device, so that
no sample is infeasible for that reason alone) and a uniformly random micro-batch
count among the allowed ones. The warm start is scored first and kept, so the result
is never worse than it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from graphs.problem import Candidate, PlacementProblem
from placer.search.config import SearchConfig, microbatch_options
from placer.search.state import SearchResult, search_loop

__all__ = []


def random_candidates(problem: PlacementProblem, options: Sequence[int], rng: np.random.Generator,
                      n: int) -> list[Candidate]:
    """n random candidates: devices uniform per colocation set, micro-batches uniform over `options`.

    >>> import networkx as nx
    >>> from graphs.devices import parse_cluster
    >>> g = nx.DiGraph(colocate=[[0, 2]]); g.add_nodes_from(range(3))
    >>> [c] = random_candidates(PlacementProblem(g, parse_cluster("cpu:0,cpu:1")), (1,), np.random.default_rng(0), 1)
    >>> c.placement[0] == c.placement[2], c.microbatches
    (True, 1)
    """
    leader = np.asarray(problem.colocation_leader)
    devices = rng.integers(0, problem.n_devices, size=(n, problem.n_groups))[:, leader]
    counts = rng.choice(np.asarray(options), size=n)
    return [Candidate(tuple(row), int(m)) for row, m in zip(devices.tolist(), counts.tolist())]


def block_candidates(problem: PlacementProblem, options: Sequence[int], rng: np.random.Generator,
                     n: int) -> list[Candidate]:
    """n random candidates made of contiguous blocks: the groups in id order (a topological
    order) cut at random into devices to 2 * devices blocks (at most one per group), each
    block on a random device other than the previous block's (a colocation set follows its
    first member), micro-batches uniform over `options`. Stage-like: far fewer crossings
    than uniformly random candidates."""
    leader = np.asarray(problem.colocation_leader)
    groups, d = problem.n_groups, problem.n_devices
    rows = []
    for _ in range(n):
        blocks = min(int(rng.integers(d, 2 * d + 1)), groups)
        cuts = np.sort(rng.choice(np.arange(1, groups), size=blocks - 1, replace=False))  # a block starts at each
        block_of = np.searchsorted(cuts, np.arange(groups), side="right")  # [groups] block index
        steps = rng.integers(1, d, size=blocks - 1) if d > 1 else np.zeros(blocks - 1, dtype=int)
        devices = (rng.integers(d) + np.concatenate([[0], np.cumsum(steps)])) % d  # [blocks] each unlike the last
        rows.append(devices[block_of][leader])
    counts = rng.choice(np.asarray(options), size=n)
    return [Candidate(tuple(row.tolist()), int(m)) for row, m in zip(rows, counts.tolist())]


def random_search(problem: PlacementProblem, scorer, config: SearchConfig, warm_start: Candidate | None = None,
                  on_progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Random search at the budget and measurement cadence of `config` (placer.search.run)."""
    rng = np.random.default_rng(config.seed)
    options = config.microbatches or microbatch_options(problem)
    state, interrupted = search_loop(
        lambda state, n, _: state.score(scorer, random_candidates(problem, options, rng, n), config.keep_top),
        scorer, config, warm_start, on_progress)
    return state.result("random_search", interrupted)
