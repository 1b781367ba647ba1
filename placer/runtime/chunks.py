"""Fuse a placed fx graph into chunks: maximal runs of consecutive nodes (in fx order)
on one device, each compiled into its own small fx.GraphModule.

Why runs in fx order: fx order is a topological order, so every input of a node in
chunk k is produced by a model input or by a node in a chunk j <= k. Edges of the
chunk graph therefore only go from lower to higher chunk index, and the chunk graph
is acyclic by construction, whatever the placement. A device that runs its chunks in
increasing index order (and, in the backward pass, decreasing) can never wait on
work that waits on it: the lowest unfinished chunk always has its inputs ready.

Each chunk's GraphModule is built over the original model as root, so it refers to
the model's own submodules, parameters and buffers (no copies) and runs as generated
Python code, not through an interpreter.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}


@dataclass(frozen=True)
class Chunk:
    index: int  # position in fx order; the schedule runs chunks of a device in this order
    device: str  # device name ("cpu:1", "cuda:0")
    nodes: tuple[str, ...]  # fx node names it computes
    inputs: tuple[str, ...]  # values it reads from outside: model inputs or other chunks' nodes
    outputs: tuple[str, ...]  # its nodes that other chunks or the model output read
    mutated_inputs: frozenset[str]  # inputs it changes in place (the runtime hands it a copy)
    module: fx.GraphModule  # forward(*inputs) -> tuple(outputs)


def mutates_first_arg(node: fx.Node, root: nn.Module) -> bool:
    """Whether a node changes its first argument in place (x.add_(y), x += y, x[i] = y,
    ReLU(inplace=True), F.relu(x, inplace=True))."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    if node.op == "call_module":
        return getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    return False


def thread_in_place_updates(graph: fx.Graph, root: nn.Module) -> None:
    """Make in-place updates visible as edges: a node that reads `x` after `x.add_(y)`
    reads the add_ node instead (the same tensor in eager mode, so nothing changes
    there). Without this, a chunk that changes its input in place works on a copy and
    a later chunk reading `x` would miss the update. (`x[i] = y` returns nothing and
    stays as it is: its effect is seen only inside its own chunk.)"""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.target is operator.setitem or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if mutates_first_arg(node, root):
            target = node.args[0]
            for user in list(target.users):
                if order[user] > order[node]:
                    user.replace_input_with(target, node)


def build_chunks(root: nn.Module, graph: fx.Graph, assignment: dict[str, str]) -> list[Chunk]:
    """Split `graph` (traced from `root`) into chunks of consecutive same-device nodes.
    Model inputs (placeholders) and the output node belong to no chunk. Rewires
    `graph` by thread_in_place_updates first."""
    thread_in_place_updates(graph, root)
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    runs: list[list[fx.Node]] = []
    for node in body:
        if runs and assignment[runs[-1][-1].name] == assignment[node.name]:
            runs[-1].append(node)
        else:
            runs.append([node])
    return [_compile(i, run, assignment[run[0].name], root) for i, run in enumerate(runs)]


def _compile(index: int, run: list[fx.Node], device: str, root: nn.Module) -> Chunk:
    members = set(run)
    inputs = list(dict.fromkeys(a for n in run for a in n.all_input_nodes if a not in members))
    outputs = [n for n in run if any(u not in members for u in n.users)]

    g = fx.Graph()
    env = {a: g.placeholder(a.name) for a in inputs}
    for node in run:
        env[node] = g.node_copy(node, lambda a: env[a])
    g.output(tuple(env[n] for n in outputs))
    mutated = {n.args[0].name for n in run
               if n.args and isinstance(n.args[0], fx.Node) and n.args[0] in inputs and mutates_first_arg(n, root)}
    return Chunk(
        index=index, device=device, nodes=tuple(n.name for n in run),
        inputs=tuple(a.name for a in inputs), outputs=tuple(n.name for n in outputs),
        mutated_inputs=frozenset(mutated),
        module=fx.GraphModule(root, g, class_name=f"Chunk{index}"),
    )
