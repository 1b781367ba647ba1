"""Random layered DAGs with the attributes of a profiled graph, for tests and benchmarks
that must not depend on a particular model (grouping 10,000 nodes, baselines on
random DAGs, simulator speed)."""

from __future__ import annotations

import networkx as nx
import numpy as np

OP_TYPES = ("conv", "linear", "matmul", "elementwise", "norm", "activation")


def random_op_graph(n_nodes: int, seed: int = 0, kinds: tuple[str, ...] = ("cpu",), width: int = 8) -> nx.DiGraph:
    """A profiled OpGraph (schema in graphs/__init__.py) of n_nodes in layers of up to
    `width` nodes; every node but the first has at least one predecessor in an
    earlier layer. Node names are "n0".."n{N-1}" in a topological order."""
    rng = np.random.default_rng(seed)
    g = nx.DiGraph(name=f"random{n_nodes}", fingerprint=f"random-{n_nodes}-{seed}", colocate=[],
                   granularity="op", leaf_paths=[], device_kinds=list(kinds))
    layer_of = []
    layer, in_layer = 0, 0
    for i in range(n_nodes):
        if in_layer >= rng.integers(1, width + 1):
            layer, in_layer = layer + 1, 0
        layer_of.append(layer)
        in_layer += 1
        speed = {k: (1.0 if k == "cpu" else 0.1) for k in kinds}
        fwd = float(rng.lognormal(mean=-1.0, sigma=1.0))
        params = int(rng.integers(0, 4) * rng.integers(1, 1 << 20)) * 4
        g.add_node(
            f"n{i}", op="call_function", target=str(rng.choice(OP_TYPES)), module=f"block{layer // 4}.layer{layer}",
            op_type=str(rng.choice(OP_TYPES)), params={f"p{i}": params} if params else {},
            out_bytes=int(rng.integers(1, 1 << 18)) * 4, order=i,
            fwd_ms={k: fwd * s for k, s in speed.items()}, bwd_ms={k: 2 * fwd * s for k, s in speed.items()},
            opt_ms={k: params * 1e-7 for k in kinds},
            param_bytes=params, grad_bytes=params, opt_bytes=params, act_bytes=int(rng.integers(0, 1 << 18)) * 4,
        )
    first_of_layer = {}
    for i, lay in enumerate(layer_of):
        first_of_layer.setdefault(lay, i)
    for i in range(1, n_nodes):
        lay = layer_of[i]
        if lay == 0:
            continue
        lo = first_of_layer[max(0, lay - 2)]
        hi = first_of_layer[lay]
        for src in set(rng.integers(lo, hi, size=int(rng.integers(1, 3)))):
            g.add_edge(f"n{src}", f"n{i}", bytes=g.nodes[f"n{src}"]["out_bytes"])
    return g


def random_grouped_graph(n_groups: int, seed: int = 0, kinds: tuple[str, ...] = ("cpu",), width: int = 4,
                         tied_pairs: int = 0) -> nx.DiGraph:
    """A GroupedGraph (schema in graphs/__init__.py) with ids 0..n-1 in topological
    order; `tied_pairs` random pairs of groups must share a device."""
    ops = random_op_graph(n_groups, seed=seed, kinds=kinds, width=width)
    mapping = {f"n{i}": i for i in range(n_groups)}
    g = nx.relabel_nodes(ops, mapping)
    rng = np.random.default_rng(seed + 1)
    for i in range(n_groups):
        data = g.nodes[i]
        data["name"] = f"{data['module']}.{i}"
        data["members"] = [f"n{i}"]
        data["op_mix"] = {data["op_type"]: 1}
    g.graph["colocate"] = [sorted(map(int, rng.choice(n_groups, size=2, replace=False))) for _ in range(tied_pairs)]
    return g
