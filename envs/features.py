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
N_FEATURES = len(OP_TYPES) + len(DEVICE_KINDS) + 7


def group_features(problem: PlacementProblem) -> np.ndarray:
    """[n_groups, N_FEATURES] float32: op-type mix (fractions), log compute (fwd+bwd ms)
    per device kind (0 where not profiled), log output/parameter/activation bytes,
    topological position in [0, 1], log in- and out-degree, and the group's share of
    total compute (so that the policy sees relative weight, not only magnitude)."""
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
    return feats


def adjacency(problem: PlacementProblem, size: int | None = None) -> np.ndarray:
    """[size, size] int8 adjacency (1 where group i feeds group j), zero-padded."""
    n = problem.n_groups
    size = size or n
    adj = np.zeros((size, size), dtype=np.int8)
    e = problem.costs.edges
    if len(e):
        adj[e[:, 0], e[:, 1]] = 1
    return adj
