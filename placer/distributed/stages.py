"""Cut a plan's traced graph into pipeline stages: one stage per device, in an order
in which every value flows forward. Pure: nothing here talks to a process group, so
the split is tested without processes (tests/test_pipelining.py).

[Note: which plans are pipelines]
A plan is a pipeline when its devices can be ordered so that no value flows from a
later device to an earlier one: the graph of devices (an edge where a node on one
device reads a value made on another) is acyclic. The stage order is then a
topological order of that graph (ties: the device whose first node comes first in
fx order), and each stage runs its device's nodes in fx order. A value made in
stage i and read in stage j > i+1 passes through the stages between, as
torch.distributed.pipelining hands values only from stage i to stage i+1. A plan
keeps a parameter with all its readers, so a model whose first and last layers read
one parameter (a language model's tied embedding and output weights) is a pipeline on
one device only: the pipeline heuristic's plan for it (placer.baselines.pipeline) runs
micro-batched on the local backend, which runs any plan, and is refused here with
that parameter named.

[Note: values every stage makes for itself]
torch.distributed.pipelining sends only floating-point activations with gradients
between stages (older torch versions give every received buffer requires_grad and
expect a gradient for it). Values a model derives from its inputs and buffers alone
(attention masks, position ids, a causal mask sliced from a buffer) carry no
gradient and are often integers, so they are not sent: every stage that needs one
computes its own copy from the model inputs, which each rank receives for its
micro-batch. Such a node is "input-only": it reads only model inputs, buffers,
constants and other input-only nodes; it reads no parameter, changes nothing in
place and draws no random numbers (a copy would draw other numbers). Parameters and
buffers themselves (get_attr nodes) are no values between stages: every stage's
chunk reads what it needs where it lives (placer.runtime.chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import networkx as nx
import torch.fx as fx
from torch import nn

from graphs.capture import node_params
from graphs.errors import PlanError
from graphs.schedule import is_random, mutated_args
from placer.runtime.chunks import Chunk, build_chunks
from placer.runtime.tensors import written_tensors

__all__ = ["Stage", "Pipeline", "split_stages", "input_only_nodes", "stage_order"]

_NO_VALUE = ("placeholder", "output", "get_attr")  # nodes that are no stage's work


@dataclass(frozen=True)
class Stage:
    """One device's share of the pipeline.

    `receives` are the values the previous stage hands over and `sends` those this
    stage hands to the next (for the last stage: the model output's nodes), both in
    the pipeline's value order; `model_inputs` the placeholders its nodes read."""

    index: int
    device: str  # plan device name
    chunk: Chunk
    receives: tuple[str, ...]
    sends: tuple[str, ...]
    model_inputs: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    """A plan cut into stages over a new graph (input-only nodes copied per stage)."""

    stages: list[Stage]
    graph: fx.Graph
    placeholders: list[str]
    output: object  # the output node's argument over `graph` (fx.node.Argument)
    output_nodes: list[str]  # what the last stage returns

    def values_between(self) -> list[str]:
        """Every value some stage receives, once, in order."""
        return list(dict.fromkeys(name for s in self.stages for name in s.receives))


def input_only_nodes(graph: fx.Graph, root: nn.Module) -> set[fx.Node]:
    """The nodes every stage may compute for itself (see the module's Note), and the
    get_attr nodes of buffers and constants (`root` is the traced GraphModule)."""
    pure: set[fx.Node] = set()
    written = written_tensors(root)  # a buffer updated in forward lives on one stage: a copy would miss updates
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        reads_state = any(isinstance(t, nn.Parameter) or id(t) in written
                          for t in (attrgetter(name)(root) for name in node_params(root, node)))
        if (not reads_state and not is_random(node, root) and not mutated_args(node, root)
                and all(a.op == "placeholder" or a in pure for a in node.all_input_nodes)):
            pure.add(node)
    return pure


def stage_order(graph: fx.Graph, assignment: dict[str, str], skip: set[fx.Node], source: str = "plan",
                root: nn.Module | None = None) -> list[str]:
    """The devices in pipeline order (see the module's Note), over the nodes not in `skip`.
    `root`: the traced GraphModule, where the refusal finds a parameter its readers tie
    to one device (`_tied_cause`); None: the refusal names none.

    Raises
    ------
    PlanError
        When values flow both ways between devices: the plan is no pipeline.
    """
    body = [n for n in graph.nodes if n.op not in _NO_VALUE and n not in skip]
    first: dict[str, int] = {}
    for i, node in enumerate(body):
        first.setdefault(assignment[node.name], i)
    graph_of_devices = nx.DiGraph()
    graph_of_devices.add_nodes_from(first)
    graph_of_devices.add_edges_from((assignment[arg.name], assignment[node.name]) for node in body
                                    for arg in node.all_input_nodes
                                    if arg not in skip and arg.op not in _NO_VALUE
                                    and assignment[arg.name] != assignment[node.name])
    try:
        return list(nx.lexicographical_topological_sort(graph_of_devices, key=first.get))
    except nx.NetworkXUnfeasible:
        cycle = sorted({a for a, _ in nx.find_cycle(graph_of_devices)}, key=first.get)
        tied = _tied_cause(root, body, assignment, cycle) if root is not None else ""
        raise PlanError(f"{source} is not a pipeline: values flow both ways between {', '.join(cycle)} (its devices "
                        f"do not form contiguous stages{tied}); the local backend runs it, micro-batches included: "
                        f"run it with --backend local or --backend distributed") from None


def _tied_cause(root: nn.Module, body: list[fx.Node], assignment: dict[str, str], cycle: list[str]) -> str:
    """Why a plan can be no pipeline, where a parameter is the cause: one read by two
    nodes with a node of another of the `cycle`'s devices between them (fx order), as
    a language model's embedding and output layer read one tied weight. A plan keeps a
    parameter's readers on its device (graphs.capture.node_params), so no split of such
    a model over several devices is a pipeline. "" when no parameter is read so."""
    readers: dict[int, tuple[str, list[int]]] = {}  # parameter (by identity: tied names are one) -> readers
    for i, node in enumerate(body):
        for name in node_params(root, node):
            tensor = attrgetter(name)(root)
            if isinstance(tensor, nn.Parameter):
                readers.setdefault(id(tensor), (name, []))[1].append(i)
    for name, at in readers.values():
        device = assignment[body[at[0]].name]
        between = [body[i] for i in range(at[0] + 1, at[-1])
                   if assignment[body[i].name] != device and assignment[body[i].name] in cycle]
        if device in cycle and between:
            return (f": '{body[at[0]].name}' and '{body[at[-1]].name}' read one parameter, '{name}', which stays on "
                    f"{device} with its readers, and '{between[0].name}' runs on {assignment[between[0].name]} "
                    f"between them")
    return ""


def split_stages(root: nn.Module, graph: fx.Graph, assignment: dict[str, str], source: str = "plan") -> Pipeline:
    """Cut `graph` (traced from `root`, every body node placed by `assignment`) into
    stages: a new graph in stage order, input-only nodes copied into each stage that
    needs them, compiled into one chunk per stage (placer.runtime.chunks).

    Raises
    ------
    PlanError
        When the plan is no pipeline (`stage_order`).
    """
    pure = input_only_nodes(graph, root)
    order = stage_order(graph, assignment, pure, source, root)
    stage_of = {d: i for i, d in enumerate(order)}
    nodes = list(graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    members: list[list[fx.Node]] = [[] for _ in order]
    for node in nodes:
        if node.op not in _NO_VALUE and node not in pure:
            members[stage_of[assignment[node.name]]].append(node)

    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = new.node_copy(node)
    new_assignment = {}
    for s, device in enumerate(order):
        local: dict[fx.Node, fx.Node] = {}
        readers = members[s] + ([output] if s == len(order) - 1 else [])
        for node in _pure_closure(readers, pure, nodes):
            local[node] = new.node_copy(node, lambda a: local.get(a, env.get(a)))
            new_assignment[local[node].name] = device
        for node in members[s]:
            env[node] = new.node_copy(node, lambda a: local.get(a, env.get(a)))
            new_assignment[env[node].name] = device
        if s == len(order) - 1:
            out = new.node_copy(output, lambda a: local.get(a, env.get(a)))
    chunks = build_chunks(root, new, new_assignment, runs=True)
    return _wire(chunks, new, out, order)


def _pure_closure(readers: list[fx.Node], pure: set[fx.Node], order: list[fx.Node]) -> list[fx.Node]:
    """The input-only nodes `readers` need, directly or through each other, in fx order
    (get_attr nodes are in every stage's reach already)."""
    needed: set[fx.Node] = set()
    todo = [a for r in readers for a in r.all_input_nodes if a in pure and a.op != "get_attr"]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(a for a in node.all_input_nodes if a in pure and a.op != "get_attr")
    return [n for n in order if n in needed]


def _wire(chunks: list[Chunk], graph: fx.Graph, output: fx.Node, order: list[str]) -> Pipeline:
    """Stages over the chunks (one per device, in order): what each receives and sends."""
    if [c.device for c in chunks] != order:
        raise AssertionError(f"chunks {[c.device for c in chunks]} are not one per stage {order}")
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    output_nodes = list(dict.fromkeys(n.name for n in output.all_input_nodes))
    last = len(chunks) - 1
    made = {name: c.index for c in chunks for name in c.outputs}
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    last_use: dict[str, int] = {}
    for c in chunks:
        for name in c.inputs:
            if name in made:
                last_use[name] = max(last_use.get(name, 0), c.index)
    for name in output_nodes:
        if name in made:
            last_use[name] = last
    live = sorted(last_use, key=position.get)

    def between(s: int) -> tuple[str, ...]:  # values alive from stage s to s + 1
        return tuple(v for v in live if made[v] <= s < last_use[v])

    stages = [Stage(index=c.index, device=c.device, chunk=c, receives=between(c.index - 1) if c.index else (),
                    sends=between(c.index) if c.index < last else tuple(n for n in output_nodes if n in made),
                    model_inputs=tuple(n for n in c.inputs if n in placeholders)
                    + tuple(n for n in output_nodes if c.index == last and n in placeholders))
              for c in chunks]
    return Pipeline(stages=stages, graph=graph, placeholders=placeholders, output=output.args[0],
                    output_nodes=output_nodes)
