"""Cut a placed fx graph into chunks and compile each into its own small GraphModule.

Which nodes form a chunk is graphs.schedule.partition's work-conserving rule (the
simulator uses the very same function): a chunk is a set of same-device nodes that
become runnable at the same moment, forward and backward. The partition runs over
*atoms*: the plan's groups when it has them (so the runtime and the simulator,
which sees only groups, make the same chunks), else single nodes.

Each chunk's GraphModule runs its nodes in fx order as generated Python code over
the model's own submodules, parameters and buffers (no copies). get_attr nodes
cost nothing and belong to no chunk: every chunk that reads a parameter or buffer
reads it itself, so parameters and buffers are never values passed between chunks
(a buffer updated in place is updated where it lives, once, as in eager).

In-place updates are made visible as edges first (`thread_in_place_updates`), on a
copy of the graph: a node that reads `x` after `x.add_(y)` reads the add_ node
instead, and graphs.schedule.ordering_edges orders updates after earlier readers
and random ops in eager's order.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from graphs.schedule import (Partition, after_update, chunk_order, memory_owner, mutated_args, mutates_first_arg,
                             ordering_edges, partition, pass_order, setitem, tensor_base)
from placer.runtime.tensors import written_tensors

__all__ = ["Chunk", "build_chunks", "thread_in_place_updates", "buffer_turns"]

_SKIP = ("placeholder", "output", "get_attr")


@dataclass(frozen=True)
class Chunk:
    index: int  # position in a topological order of the chunk graph
    device: str  # device name ("cpu:1", "cuda:0")
    nodes: tuple[str, ...]  # fx node names it computes, in fx order
    inputs: tuple[str, ...]  # values it reads from outside: model inputs or other chunks' nodes
    outputs: tuple[str, ...]  # its nodes that other chunks or the model output read
    mutated_inputs: frozenset[str]  # inputs it changes in place, directly or through a view (it gets a copy)
    module: fx.GraphModule  # forward(*inputs) -> tuple(outputs)
    after: tuple[int, ...] = ()  # indices of the chunks it waits for (values and ordering)
    # Tie-breaks among chunks ready at once, lower first (graphs.schedule.pass_order):
    forward_rank: int = 0
    backward_rank: int = 0


def thread_in_place_updates(graph: fx.Graph, root: nn.Module) -> dict[str, str]:
    """Make in-place updates visible as edges, in `graph` itself: a node that reads
    `x` after `x.add_(y)` reads the add_ node instead (the same tensor in eager mode,
    so nothing changes there). Without this, a chunk that changes its input in place
    works on a copy and a later chunk reading `x` would miss the update.

    An update of a parameter's or buffer's memory reads the get_attr itself, through
    its views made again just before it: `self.ema.mul_(a).add_(b)` is captured as
    add_(mul_, b), and an add_ handed mul_'s value by another chunk would change a
    copy, so add_ reads `ema` instead; `self.buf[:4].mul_(a)` changes a slice made
    again from `buf` in the update's own chunk (graphs.capture.node_params counts such
    an update as a reader of the tensor, so a plan keeps it on the tensor's device).
    An update through a view of any other value (`x[:, 0] = y` as
    aten.copy_(aten.select(x, ...), y)) gets its views made again from `x` the same
    way and a node after it that stands for `x` updated (graphs.schedule.after_update),
    which later readers of `x` read. Returns the added nodes' names, each with the
    update whose chunk it must share."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    glue: dict[str, str] = {}
    for node in list(graph.nodes):
        for arg in mutated_args(node, root):
            owner = memory_owner(arg, root)
            base = owner if owner.op == "get_attr" else tensor_base(arg)
            if node.target is operator.setitem:
                node.target = setitem  # returns x, so that later readers can read the update
            if arg is base or owner.op == "get_attr":
                later = _aliases(arg, root) if mutates_first_arg(node, root) and node.args[0] is arg else []
                if arg is not base:
                    node.replace_input_with(arg, _view_again(graph, node, arg, base, glue, root))
                stand_in = node
            else:
                node.replace_input_with(arg, _view_again(graph, node, arg, base, glue, root))
                with graph.inserting_after(node):
                    stand_in = graph.call_function(after_update, (base, node))
                glue[stand_in.name] = node.name
                later = [base]
            for value in later:
                for user in list(value.users):
                    if user in order and order[user] > order[node]:
                        user.replace_input_with(value, stand_in)
    return glue


def _aliases(value: fx.Node, root: nn.Module) -> list[fx.Node]:
    """`value` and the nodes whose result is exactly its memory: the in-place updates
    it is the result of, back to the value they started from."""
    same = [value]
    while mutates_first_arg(value, root):
        value = value.args[0]
        same.append(value)
    return same


def _view_again(graph: fx.Graph, update: fx.Node, view: fx.Node, base: fx.Node, glue: dict[str, str],
                root: nn.Module) -> fx.Node:
    """`view` made again from `base` right before `update`, each new node glued to
    `update` (in-place updates on the way hand their argument's memory on and are
    left out); `base` itself when no view is on the way."""
    chain = []
    while view is not base:
        if not mutates_first_arg(view, root):
            chain.append(view)
        view = view.args[0]
    last = base
    with graph.inserting_before(update):
        for v in reversed(chain):
            prev, source = last, v.args[0]
            last = graph.node_copy(v, lambda n, source=source, prev=prev: prev if n is source else n)
            glue[last.name] = update.name
    return last


def build_chunks(root: nn.Module, graph: fx.Graph, assignment: dict[str, str], *,
                 groups: Sequence[Iterable[str]] | None = None, runs: bool = False,
                 extra_roots: Sequence[nn.Module] = ()) -> list[Chunk]:
    """Chunks of `graph` (traced from `root`) placed by `assignment` (node -> device).

    `groups`: the plan's groups (member node names, in group id order), used as the
    partition's atoms when each group's nodes share a device and the group order is
    topological; otherwise every node is its own atom. `runs`: chunks are maximal
    same-device runs in fx order instead (the distributed backend's stages).
    `extra_roots`: where targets `root` lacks are found (a higher-order op's
    subgraph module, which lives on the traced GraphModule). The caller's graph is
    left as it is. Returns the chunks in a topological order (Chunk.index)."""
    lookup = _Lookup(root, extra_roots)
    ordering = ordering_edges(graph, lookup)
    original = [(a.name, n.name) for n in graph.nodes for a in n.all_input_nodes]
    graph = _copy(graph)
    glue = thread_in_place_updates(graph, lookup)
    assignment = {**assignment, **{name: assignment[anchor] for name, anchor in glue.items()}}
    if groups:
        groups = [list(names) + [name for name, anchor in glue.items() if anchor in names] for names in groups]
    nodes = list(graph.nodes)
    body = [n for n in nodes if n.op not in _SKIP]
    position = {n.name: i for i, n in enumerate(body)}
    pairs = {(a.name, n.name) for n in body for a in n.all_input_nodes} | set(original) | set(ordering)
    pairs = [(position[a], position[b]) for a, b in pairs if a in position and b in position and a != b]

    atom_of = _atoms(body, assignment, groups, pairs, glue)
    n_atoms = max(atom_of, default=-1) + 1
    atom_device = [""] * n_atoms
    for node, a in zip(body, atom_of):
        atom_device[a] = assignment[node.name]
    atom_pairs = [(atom_of[u], atom_of[v]) for u, v in pairs if atom_of[u] != atom_of[v]]
    if runs:  # stages: no hand-off preference, fx order
        chunk_of_atom = [0] * n_atoms
        for a in range(1, n_atoms):
            chunk_of_atom[a] = chunk_of_atom[a - 1] + (atom_device[a] != atom_device[a - 1])
        k = chunk_of_atom[-1] + 1 if n_atoms else 0
        part = Partition(chunk_of_atom, [False] * k, [False] * k)
    else:
        devices = {d: i for i, d in enumerate(dict.fromkeys(atom_device))}
        part = partition(n_atoms, atom_pairs, [devices[d] for d in atom_device])
    rank = [{c: r for r, c in enumerate(pass_order(part, backward))} for backward in (False, True)]
    chunk_of = [part.chunk_of[a] for a in atom_of]
    order = chunk_order(chunk_of, pairs)
    index = {c: i for i, c in enumerate(order)}

    members: list[list[fx.Node]] = [[] for _ in order]
    for node, c in zip(body, chunk_of):
        members[index[c]].append(node)
    after: list[set[int]] = [set() for _ in order]
    for u, v in pairs:
        a, b = index[chunk_of[u]], index[chunk_of[v]]
        if a != b:
            after[b].add(a)
    return [_compile(i, run, assignment[run[0].name], lookup, tuple(sorted(after[i])), rank[0][order[i]],
                     rank[1][order[i]]) for i, run in enumerate(members)]


def buffer_turns(chunks: Sequence[Chunk]) -> list[list[int]]:
    """Per chunk, the chunks that touch (read or update) a tensor it touches that some
    chunk updates in place: with micro-batches, chunk c of micro-batch i waits for those
    of micro-batch i - 1 (dataflow.Pass `previous`), so that each micro-batch reads and
    updates a buffer after the one before it is done with it, as eager runs them in turn.
    Empty lists where the forward updates no tensor in place."""
    written = set().union(*(written_tensors(c.module) for c in chunks))
    touched = [{id(operator.attrgetter(str(n.target))(c.module)) for n in c.module.graph.nodes if n.op == "get_attr"}
               & written for c in chunks]
    return [[b for b, theirs in enumerate(touched) if mine & theirs] for mine in touched]


def _copy(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` with the same node names."""
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _atoms(body: list[fx.Node], assignment: dict[str, str], groups, pairs: list[tuple[int, int]],
           glue: dict[str, str]) -> list[int]:
    """Atom of each body node: its group when the groups can serve (every body node
    in one group, a group on one device, edges from lower to higher group ids), else
    its own, shared with the update it is glued to (`thread_in_place_updates`).
    Atoms are numbered densely in a topological order."""
    position = {n.name: i for i, n in enumerate(body)}
    own = [position[glue[n.name]] if n.name in glue else i for i, n in enumerate(body)]
    raw = own
    if groups:
        group_of = {name: g for g, names in enumerate(groups) for name in names}
        grouped = [group_of.get(n.name) for n in body]
        device: dict[int, str] = {}
        usable = None not in grouped and all(
            device.setdefault(g, assignment[n.name]) == assignment[n.name] for n, g in zip(body, grouped))
        if usable and all(grouped[u] <= grouped[v] for u, v in pairs):
            raw = grouped
    dense = {a: i for i, a in enumerate(sorted(set(raw)))}  # groups without computing nodes make no atom
    return [dense[a] for a in raw]


class _Lookup:
    """A root that finds each target in `root`, else in the extra roots."""

    def __init__(self, root: nn.Module, extra: Sequence[nn.Module]):
        self._roots = (root, *extra)

    def fetch(self, target: str):
        for r in self._roots:
            obj, found = r, True
            for part in target.split("."):
                if not hasattr(obj, part):
                    found = False
                    break
                obj = getattr(obj, part)
            if found:
                return obj
        raise AttributeError(f"no module of the model has {target!r}")

    def get_submodule(self, target: str) -> nn.Module:
        return self.fetch(target)

    def __getattr__(self, name: str):
        if name == "_roots":  # not set yet (unpickling)
            raise AttributeError(name)
        return self.fetch(name)


def _compile(index: int, run: list[fx.Node], device: str, lookup: _Lookup, after: tuple[int, ...],
             forward_rank: int, backward_rank: int) -> Chunk:
    members = set(run)
    reads = [a for n in run for a in n.all_input_nodes if a not in members]
    inputs = list(dict.fromkeys(a for a in reads if a.op != "get_attr"))
    attrs = list(dict.fromkeys(a for a in reads if a.op == "get_attr"))
    outputs = [n for n in run if any(u not in members for u in n.users)]

    g = fx.Graph()
    env = {a: g.placeholder(a.name) for a in inputs}
    targets = {}
    for a in attrs:  # the chunk's own attribute, named as its node: one lookup, not one per dotted part
        env[a] = g.node_copy(a)
        env[a].target = a.name
        targets[a.name] = lookup.fetch(str(a.target))
    for node in run:
        env[node] = g.node_copy(node, lambda a: env[a])
    g.output(tuple(env[n] for n in outputs))
    mutated = {tensor_base(arg).name for node in run for arg in mutated_args(node, lookup)
               if tensor_base(arg) in inputs}
    targets.update({str(n.target): lookup.fetch(str(n.target)) for n in g.nodes if n.op == "call_module"})
    return Chunk(
        index=index, device=device, nodes=tuple(n.name for n in run),
        inputs=tuple(a.name for a in inputs), outputs=tuple(n.name for n in outputs),
        mutated_inputs=frozenset(mutated), module=fx.GraphModule(targets, g, class_name=f"Chunk{index}"),
        after=after, forward_rank=forward_rank, backward_rank=backward_rank,
    )
