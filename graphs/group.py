"""Coarsen an OpGraph into at most G placement groups (a GroupedGraph).

Groups come from contracting edges of the op graph, so that a group is a connected
piece of computation and independent branches or different layers stay apart
where the budget allows. Three passes:

1. fold: every zero-cost op (input, output, parameter fetch, view) joins a neighbour;
2. contract: the cheapest edges are contracted first, preferring edges inside one
   module (so that groups read as module paths) as long as the merged group stays
   under a cost cap of 2 x total / G (so that groups stay balanced: an unrolled LSTM
   gives per-layer windows of time steps rather than one group per layer);
3. only if the graph has more components than G: neighbours in a topological order
   are merged (always acyclic).

Every contraction keeps the quotient acyclic: an edge u -> v may be contracted only
when no other path leads from u to v. The check is a depth-first search pruned by
integer labels that strictly increase along every edge (a path into v only visits
labels below v's), kept valid after each merge.
"""

from __future__ import annotations

import heapq
from collections import Counter

import networkx as nx

ZERO_COST_TYPES = frozenset({"input", "output", "param", "reshape"})
OP_FLOOR_MS = 1e-3  # every op costs at least this much when balancing groups (launch overhead)
CAP_FACTOR = 2.0  # a group may grow to CAP_FACTOR x the average group cost before merges are last-resort
COPIED_ATTRS = ("batch_size", "microbatch_step_ms", "microbatch_step_ms_by_kind", "microbatch_absent",
                "profile_scale", "whole_step_spread")


def group(ops: nx.DiGraph, max_groups: int = 256) -> nx.DiGraph:
    """Group a (profiled) OpGraph into a GroupedGraph of at most `max_groups` groups
    (schema in graphs/__init__.py). Deterministic: equal graphs give equal groups.

    Raises
    ------
    ValueError : `max_groups` is below 1.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    q = _Quotient(ops)
    q.fold_zero_cost()
    q.contract_edges(max_groups)
    q.merge_topological_neighbours(max_groups)
    return _grouped_graph(ops, [[q.names[i] for i in sorted(m)] for m in q.members.values()])


def node_cost(data: dict) -> float:
    """Fastest fwd+bwd ms of an op (0 when unprofiled), plus a small per-op floor."""
    kinds = data.get("fwd_ms", {})
    measured = min((data["fwd_ms"][k] + data["bwd_ms"][k] for k in kinds), default=0.0)
    return measured + OP_FLOOR_MS


class _Quotient:
    """The graph of groups while merging. Groups are ints (the topological index of
    the op they started from); a merge keeps one id and drops the other."""

    def __init__(self, ops: nx.DiGraph):
        order = nx.get_node_attributes(ops, "order")
        self.names = list(nx.lexicographical_topological_sort(ops, key=lambda n: order.get(n, 0)))
        index = {name: i for i, name in enumerate(self.names)}
        self.succ = {i: {index[s] for s in ops.successors(n)} for i, n in enumerate(self.names)}
        self.pred = {i: {index[p] for p in ops.predecessors(n)} for i, n in enumerate(self.names)}
        self.members = {i: [i] for i in range(len(self.names))}
        self.cost = {i: node_cost(ops.nodes[n]) for i, n in enumerate(self.names)}
        self.zero_cost = [ops.nodes[n].get("op_type") in ZERO_COST_TYPES for n in self.names]
        # module paths of the ops that do the work (None: no opinion), so that a group that
        # swallowed an input or a view still reads, and merges, as its layer
        self.path = {i: None if self.zero_cost[i] else _module_path(ops.nodes[n].get("module", ""))
                     for i, n in enumerate(self.names)}
        self.version = dict.fromkeys(self.members, 0)  # bumped by every merge: older heap entries are stale
        self.cap = float("inf")  # set by contract_edges
        self.label = {}
        for i in range(len(self.names)):  # longest path from a source: strictly increasing along edges
            self.label[i] = max((self.label[p] + 1 for p in self.pred[i]), default=0)

    def __len__(self) -> int:
        return len(self.members)

    # -- the passes --------------------------------------------------------------

    def fold_zero_cost(self) -> None:
        """Fold each zero-cost op into its earliest successor (or, for a sink, its latest
        predecessor). Both are safe: another path to the earliest successor would have
        to pass through a successor with a smaller label. Ops are visited from the last,
        so a chain of views joins the op that consumes it."""
        for i in reversed(range(len(self.names))):
            if not self.zero_cost[i] or self.members.get(i) != [i]:
                continue
            if self.succ[i]:
                self.merge(min(self.succ[i], key=lambda s: (self.label[s], s)), i)
            elif self.pred[i]:
                self.merge(max(self.pred[i], key=lambda p: (self.label[p], -p)), i)

    def contract_edges(self, max_groups: int) -> None:
        """Contract the best safe edge until at most max_groups remain."""
        if len(self) <= max_groups:
            return
        self.cap = CAP_FACTOR * sum(self.cost.values()) / max_groups
        heap = []
        for u in self.members:
            for v in self.succ[u]:
                heap.append(self._candidate(u, v))
        heapq.heapify(heap)
        while heap and len(self) > max_groups:
            *_, u, v, version_u, version_v = heapq.heappop(heap)
            if (u not in self.members or v not in self.members or self.version[u] != version_u
                    or self.version[v] != version_v or v not in self.succ[u] or self._other_path(u, v)):
                continue  # stale entry, or unsafe (it is pushed again if u or v changes)
            self.merge(u, v)
            for p in self.pred[u]:
                heapq.heappush(heap, self._candidate(p, u))
            for s in self.succ[u]:
                heapq.heappush(heap, self._candidate(u, s))

    def merge_topological_neighbours(self, max_groups: int) -> None:
        """Merge the cheapest pair of neighbours in a topological order of the groups
        until at most max_groups remain. Only needed when no edge is left to contract
        (more connected components than groups)."""
        if len(self) <= max_groups:
            return
        quotient = nx.DiGraph([(u, v) for u in self.members for v in self.succ[u]])
        quotient.add_nodes_from(self.members)
        order = list(nx.lexicographical_topological_sort(quotient))
        while len(order) > max_groups:
            i = min(range(len(order) - 1), key=lambda j: (self.cost[order[j]] + self.cost[order[j + 1]], j))
            self.merge(order[i], order[i + 1])
            del order[i + 1]

    # -- merging -------------------------------------------------------------------

    def merge(self, keep: int, drop: int) -> None:
        """Contract group `drop` into `keep` (the caller has checked that it is safe)."""
        for s in self.succ.pop(drop):
            self.pred[s].discard(drop)
            if s != keep:
                self.succ[keep].add(s)
                self.pred[s].add(keep)
        for p in self.pred.pop(drop):
            self.succ[p].discard(drop)
            if p != keep:
                self.pred[keep].add(p)
                self.succ[p].add(keep)
        self.succ[keep].discard(drop)
        self.pred[keep].discard(drop)
        self.members[keep].extend(self.members.pop(drop))
        self.cost[keep] += self.cost.pop(drop)
        self.path[keep] = _common_prefix(self.path[keep], self.path.pop(drop))
        self.version[keep] += 1
        del self.version[drop], self.label[drop]
        self._relabel(keep)

    def _relabel(self, g: int) -> None:
        """Restore label[s] > label[p] on every edge after g changed: g takes the
        smallest valid label, and successors that now sit too low are pushed up."""
        self.label[g] = max((self.label[p] + 1 for p in self.pred[g]), default=0)
        stack = [g]
        while stack:
            x = stack.pop()
            for s in self.succ[x]:
                if self.label[s] <= self.label[x]:
                    self.label[s] = self.label[x] + 1
                    stack.append(s)

    def _other_path(self, u: int, v: int) -> bool:
        """Whether a path u -> w -> ... -> v exists besides the edge u -> v."""
        limit = self.label[v]
        stack = [w for w in self.succ[u] if w != v and self.label[w] < limit]
        seen = set(stack)
        while stack:
            x = stack.pop()
            for s in self.succ[x]:
                if s == v:
                    return True
                if s not in seen and self.label[s] < limit:
                    seen.add(s)
                    stack.append(s)
        return False

    def _candidate(self, u: int, v: int) -> tuple:
        """Heap entry for contracting u -> v: under the cap, same-module pairs first,
        then cheapest; over the cap (last resort), cheapest first."""
        combined = self.cost[u] + self.cost[v]
        distance = _module_distance(self.path[u], self.path[v])
        key = (0, distance, combined) if combined <= self.cap else (1, combined, distance)
        return (*key, u, v, self.version[u], self.version[v])


def _grouped_graph(ops: nx.DiGraph, groups: list[list[str]]) -> nx.DiGraph:
    """Build the GroupedGraph: ids in a topological order, sums of costs, readable names."""
    order = nx.get_node_attributes(ops, "order")
    group_of = {n: i for i, members in enumerate(groups) for n in members}
    quotient = nx.DiGraph()
    quotient.add_nodes_from(range(len(groups)))
    quotient.add_edges_from((group_of[a], group_of[b]) for a, b in ops.edges() if group_of[a] != group_of[b])
    topo = list(nx.lexicographical_topological_sort(quotient, key=lambda i: min(order.get(n, 0) for n in groups[i])))
    renumber = {old: new for new, old in enumerate(topo)}

    kinds = list(ops.graph.get("device_kinds", []))
    g = nx.DiGraph(name=ops.graph.get("name", ""), fingerprint=ops.graph.get("fingerprint", ""), device_kinds=kinds)
    names = _unique_names([_group_name(ops, groups[old]) for old in topo])
    for new, old in enumerate(topo):
        members = sorted(groups[old], key=lambda n: order.get(n, 0))
        data = [ops.nodes[n] for n in members]
        attrs = {"name": names[new], "members": members}
        for attr in ("fwd_ms", "bwd_ms", "opt_ms"):
            attrs[attr] = {k: sum(d.get(attr, {}).get(k, 0.0) for d in data) for k in kinds}
        for attr in ("param_bytes", "grad_bytes", "opt_bytes", "act_bytes", "out_bytes"):
            attrs[attr] = sum(d.get(attr, 0) for d in data)
        attrs["op_mix"] = dict(sorted(Counter(d.get("op_type", "other") for d in data).items()))
        g.add_node(new, **attrs)
    # A tensor crosses to another group once however many of that group's ops read it
    # (the runtime moves each value once per consuming chunk): count it once.
    crossed: set[tuple[str, int]] = set()
    for a, b, data in ops.edges(data=True):
        u, v = renumber[group_of[a]], renumber[group_of[b]]
        if u != v and (a, v) not in crossed:
            crossed.add((a, v))
            if g.has_edge(u, v):
                g.edges[u, v]["bytes"] += data.get("bytes", 0)
            else:
                g.add_edge(u, v, bytes=data.get("bytes", 0))
    g.graph["colocate"] = _group_colocation(ops, {n: renumber[i] for n, i in group_of.items()})
    for key in COPIED_ATTRS:  # what bounds and the simulator read, where the grouped graph is all they get
        if key in ops.graph:
            g.graph[key] = ops.graph[key]
    return g


def _group_colocation(ops: nx.DiGraph, group_of: dict[str, int]) -> list[list[int]]:
    """Op-level colocation sets as sets of groups; overlapping sets are merged."""
    tied = nx.Graph()
    for names in ops.graph.get("colocate", []):
        ids = sorted({group_of[n] for n in names})
        tied.add_nodes_from(ids)
        nx.add_path(tied, ids)
    return sorted(sorted(c) for c in nx.connected_components(tied) if len(c) > 1)


def _group_name(ops: nx.DiGraph, members: list[str]) -> str:
    """The common module path of the members that do work (of all, if none does)."""
    working = [n for n in members if ops.nodes[n].get("op_type") not in ZERO_COST_TYPES] or members
    prefix = None
    for n in working:
        prefix = _common_prefix(prefix, _module_path(ops.nodes[n].get("module", "")))
    return ".".join(prefix or ()) or "model"


def _unique_names(names: list[str]) -> list[str]:
    """Groups sharing a module path are numbered in topological order: "rnn.0[0]", "rnn.0[1]"."""
    counts = Counter(names)
    seen: Counter = Counter()
    unique = []
    for name in names:
        if counts[name] > 1:
            unique.append(f"{name}[{seen[name]}]")
            seen[name] += 1
        else:
            unique.append(name)
    return unique


def _module_path(module: str) -> tuple[str, ...]:
    return tuple(module.split(".")) if module else ()


def _common_prefix(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Longest common prefix of two module paths; None (no path) is neutral."""
    if a is None or b is None:
        return b if a is None else a
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _module_distance(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> int:
    """Steps up and down the module tree from one path to the other (0 if either has none)."""
    if a is None or b is None:
        return 0
    return len(a) + len(b) - 2 * len(_common_prefix(a, b))
