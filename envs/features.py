"""Per-group features: what the Gymnasium observation and the RL policy see of a group.

The feature vector has a fixed width whatever the graph, so that a policy trained on
one workload can start the search on another (transfer).
"""

from __future__ import annotations

import numpy as np

from graphs.problem import PlacementProblem

# Coarse op categories (graphs/__init__.py); anything else counts as "other".
OP_TYPES = ("conv", "linear", "matmul", "lstm", "embedding", "norm", "pool", "activation",
            "elementwise", "reshape", "attention", "loss", "input", "output", "param", "other")
DEVICE_KINDS = ("cpu", "cuda")
N_SHARES = 7
N_FEATURES = len(OP_TYPES) + len(DEVICE_KINDS) + 7 + N_SHARES


def group_features(problem: PlacementProblem) -> np.ndarray:
    """[n_groups, N_FEATURES] float32: op-type mix (fractions), log compute (fwd+bwd ms)
    per device kind (0 where not profiled), log output/parameter/activation bytes,
    topological position in [0, 1], log in- and out-degree, the group's share of
    total compute; then shares that say how it weighs in this problem whatever the
    model's size (`shares`): memory, bytes in and out, the longest chains of compute
    before and after it (as Placeto's and HEFT's levels), and its optimizer time."""
    g = problem.groups
    n = problem.n_groups
    feats = np.zeros((n, N_FEATURES), dtype=np.float32)
    total = sum(min(g.nodes[i]["fwd_ms"][k] + g.nodes[i]["bwd_ms"][k] for k in g.nodes[i]["fwd_ms"]) for i in range(n)) or 1.0
    for i in range(n):
        data = g.nodes[i]
        mix = data.get("op_mix", {})
        count = sum(mix.values()) or 1
        for op, c in mix.items():
            feats[i, OP_TYPES.index(op) if op in OP_TYPES else OP_TYPES.index("other")] += c / count
        col = len(OP_TYPES)
        for j, kind in enumerate(DEVICE_KINDS):
            if kind in data["fwd_ms"]:
                feats[i, col + j] = np.log1p(data["fwd_ms"][kind] + data["bwd_ms"][kind])
        col += len(DEVICE_KINDS)
        fastest = min(data["fwd_ms"][k] + data["bwd_ms"][k] for k in data["fwd_ms"])
        feats[i, col:col + 7] = (
            np.log1p(data["out_bytes"] / 1024.0),
            np.log1p(data["param_bytes"] / 1024.0),
            np.log1p(data["act_bytes"] / 1024.0),
            i / max(n - 1, 1),
            np.log1p(g.in_degree(i)),
            np.log1p(g.out_degree(i)),
            fastest / total,
        )
    if n:
        feats[:, -N_SHARES:] = shares(problem)
    return feats


def shares(problem: PlacementProblem) -> np.ndarray:
    """[n_groups, N_SHARES] in [0, 1]: each group's share of the memory pinned, of the
    bytes flowing in and out (both relative to the largest group's), of the critical
    path before it (its top level: the heaviest chain of fastest-device compute that
    must run before it, over the whole critical path) and after it (bottom level, itself
    included), its compute over the critical path, and its share of the optimizer time."""
    c = problem.costs
    n = problem.n_groups
    compute = c.compute_ms.min(axis=1)
    memory = c.memory_bytes
    bytes_in = np.bincount(c.edges[:, 1], weights=c.edge_bytes, minlength=n) if len(c.edges) else np.zeros(n)
    bytes_out = np.bincount(c.edges[:, 0], weights=c.edge_bytes, minlength=n) if len(c.edges) else np.zeros(n)
    top, bottom = np.zeros(n), compute.copy()
    preds = [[] for _ in range(n)]
    for u, v in c.edges.tolist():
        preds[v].append(u)
    for v in range(n):  # group ids are a topological order
        top[v] = max((top[u] + compute[u] for u in preds[v]), default=0.0)
    for v in range(n - 1, -1, -1):
        for u in preds[v]:
            bottom[u] = max(bottom[u], compute[u] + bottom[v])
    critical = max(float((top + compute).max()), 1e-12)
    opt = c.opt_ms.min(axis=1)

    def share(x: np.ndarray, of: float) -> np.ndarray:
        return x / of if of > 0 else np.zeros_like(x)

    return np.stack([share(memory, float(memory.sum())), share(bytes_in, float(bytes_in.max(initial=0))),
                     share(bytes_out, float(bytes_out.max(initial=0))), top / critical, bottom / critical,
                     compute / critical, share(opt, float(opt.sum()))], axis=1)


def adjacency(problem: PlacementProblem, size: int | None = None) -> np.ndarray:
    """[size, size] int8 adjacency (1 where group i feeds group j), zero-padded."""
    n = problem.n_groups
    size = size or n
    adj = np.zeros((size, size), dtype=np.int8)
    e = problem.costs.edges
    if len(e):
        adj[e[:, 0], e[:, 1]] = 1
    return adj
