"""The work-conserving chunk partition, shared by the runtime and the simulator.

A placed graph runs as *chunks*: sets of same-device nodes that a device's worker
runs in one go, forward and backward. For independent work never to wait behind
dependent work, every node of a chunk must become runnable at the same moment in
both passes. Key each node v by

- its device,
- F(v): the cross-device edges into v or into a same-device ancestor of v (through
  same-device paths): what must arrive before v can run forward;
- B(v): the cross-device edges out of v or out of a same-device descendant of v:
  whose gradients must arrive before v can run backward;

and make nodes with equal keys one chunk (`partition`). A chunk then becomes ready
at once, forward when all of F has arrived and backward when all of B has, and it
runs its nodes in topological (fx) order.

Why the chunk graph is acyclic: along a same-device edge u -> v, F(u) <= F(v) and
B(u) >= B(v), and one of them changes if u and v are in different chunks, so a cycle
of same-device chunks would need equal keys. A cycle through other devices would
enter a chunk C at a node b by a cross edge (which is then in F(C), so b precedes
every member of C: b is their same-device ancestor) and leave it at a node a
(through a same-device run whose F only grows: again b precedes a); chained
around the cycle that gives a path from b back to b in the graph itself.

A device that is free runs, of its chunks ready by then, the one of highest
priority: the earliest micro-batch (backward: the latest), then `pass_order`: first
the chunks that hand work to another device in this pass (forward: B is not empty,
another device reads what they compute, directly or through later work of their
own device; backward: F is not empty, another device waits for their gradients),
then the rest; within each, the lowest member first (fx order; in backward the
reverse). Handing work on first keeps the other devices busy: without it, four
towers split 2+2 ran 1.4x instead of 1.75x, because in backward the device holding
the head ran its own towers before the small chunk whose gradients the other device
waited for. (B and F carry the rule with no cost model: any path to another device
leaves its own device first by a cross edge out of a same-device descendant.) The
rule is work-conserving (a worker idles only when nothing of its own is ready) and
the simulator follows it exactly (envs.sim).

Besides data edges, a graph carries *ordering edges* (`ordering_edges`): an in-place
update runs after the earlier readers of what it changes and before the later ones,
and random ops draw from the generator in eager's order (one chain in fx order), so
that a placed model draws exactly eager's dropout masks on CPU devices and repeats
its own draws elsewhere. Capture stores them in the OpGraph (edges with bytes 0 and
`control=True`) and the runtime adds the same ones, so both see one DAG.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Partition", "partition", "pass_order", "chunk_order", "ordering_edges", "is_random", "mutated_args", "tensor_base", "setitem",
           "after_update", "mutates_first_arg", "memory_owner", "written_state"]


class Partition(NamedTuple):
    """A placed DAG cut into chunks: `chunk_of[v]` is node v's chunk; per chunk c,
    `hands_on_forward[c]`: another device reads what c computes (its B is not empty);
    `hands_on_backward[c]`: another device waits for c's gradients (its F is not empty)."""

    chunk_of: list[int]
    hands_on_forward: list[bool]
    hands_on_backward: list[bool]


def partition(n: int, edges: Sequence[tuple[int, int]], device: Sequence[int], *,
              presorted: bool = False) -> Partition:
    """The chunks of a placed DAG (see the module doc).

    Parameters
    ----------
    n : int
        Nodes 0..n-1, numbered in a topological order (every edge goes from a lower
        to a higher number).
    edges : sequence of (u, v)
        The DAG's edges, u < v; duplicates are harmless. With `presorted`, the
        caller promises them sorted and unique (the simulator's fast path).
    device : sequence of int
        The device of each node.

    Returns
    -------
    Partition
        The chunk id of every node, and per chunk whether it hands work to another
        device in each pass. Chunk ids are numbered by their lowest node (fx order).

    Examples
    --------
    Two independent chains a0 -> a1 on device 0 and b0 -> b1 on device 1, where a1
    also reads b0: a0 runs at once, a1 once b0 has arrived.

    >>> partition(4, [(0, 2), (1, 3), (1, 2)], [0, 1, 0, 1]).chunk_of
    [0, 1, 2, 3]
    >>> partition(3, [(0, 1), (1, 2)], [0, 0, 0]).chunk_of
    [0, 0, 0]
    """
    ordered = edges if presorted else sorted(set(edges))
    bits = _bits(len(ordered))
    fwd = [0] * n
    bwd = [0] * n
    # Sets of cross-device edges as bits, numbered in the order each loop meets them
    # (small numbers: cheaper to OR and to hash than one bit per edge of the graph).
    cross = 0
    for u, v in ordered:  # by source: every F(u) is final before u's out-edges
        if device[u] == device[v]:
            fwd[v] |= fwd[u]
        else:
            fwd[v] |= bits[cross]
            cross += 1
    cross = 0
    for u, v in reversed(ordered):  # sources descending: every B(v) is final before v's in-edges
        if device[u] == device[v]:
            bwd[u] |= bwd[v]
        else:
            bwd[u] |= bits[cross]
            cross += 1
    ids: dict[tuple[int, int, int], int] = {}
    chunk_of = [ids.setdefault(key, len(ids)) for key in zip(device, fwd, bwd)]
    return Partition(chunk_of, [b != 0 for _, _, b in ids], [f != 0 for _, f, _ in ids])


def pass_order(part: Partition, backward: bool) -> list[int]:
    """The chunks in priority order for one pass (module doc): those that hand work to
    another device first, then fx order (backward: its reverse). Position k in this
    list is the k-th to run of chunks that become ready at the same moment."""
    if backward:
        hands_on = part.hands_on_backward
        return sorted(range(len(hands_on) - 1, -1, -1), key=lambda c: not hands_on[c])
    hands_on = part.hands_on_forward
    return sorted(range(len(hands_on)), key=lambda c: not hands_on[c])


_BITS: list[int] = []


def _bits(n: int) -> list[int]:
    """[1 << e for e < n] (at least), made once: the simulator partitions thousands of times."""
    while len(_BITS) < n:
        _BITS.append(1 << len(_BITS))
    return _BITS


def chunk_order(chunk_of: Sequence[int], edges: Sequence[tuple[int, int]]) -> list[int]:
    """Chunk ids in a topological order of the chunk graph (ties: lower id first).

    Raises ValueError if the chunk graph has a cycle (a partition that `partition`
    did not make)."""
    k = max(chunk_of, default=-1) + 1
    succ: list[set[int]] = [set() for _ in range(k)]
    for u, v in edges:
        a, b = chunk_of[u], chunk_of[v]
        if a != b:
            succ[a].add(b)
    waiting = [0] * k
    for targets in succ:
        for b in targets:
            waiting[b] += 1
    ready = [c for c in range(k) if waiting[c] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        c = heapq.heappop(ready)
        order.append(c)
        for b in succ[c]:
            waiting[b] -= 1
            if waiting[b] == 0:
                heapq.heappush(ready, b)
    if len(order) != k:
        raise ValueError(f"the chunk graph has a cycle through chunks {sorted(set(range(k)) - set(order))[:5]}")
    return order


# -- what a node does to memory and to the random generator ---------------------

def setitem(x, index, value):
    """`x[index] = value` that returns `x`: the form the runtime gives fx's
    operator.setitem, so that later readers can read the update."""
    x[index] = value
    return x


def after_update(base, update):
    """`base`, once `update` (an in-place change of a view of it) has run: the node the
    runtime gives later readers of `base`, so that they read the change."""
    return base


_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem, setitem,
}
_RANDOM_FUNCTIONS = {
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
    "multinomial", "normal", "poisson", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "rrelu", "native_dropout",
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial"}
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_BATCH_NORM_OPS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm",
                   "miopen_batch_norm", "_batch_norm_impl_index"}
# Tensor methods and functions whose result shares memory with their first argument.
_VIEW_NAMES = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select", "unsqueeze",
               "squeeze", "expand", "expand_as", "t", "flatten", "unflatten", "as_strided", "chunk", "split",
               "unbind", "movedim", "swapaxes", "diagonal", "detach", "contiguous", "getitem", "real", "imag"}


def _name(target) -> str:
    name = getattr(target, "__name__", "") or str(target)
    return name.split(".")[0]  # an OpOverload's "relu_.default" -> "relu_"


def _training(node: fx.Node, index: int, default: bool = True) -> bool:
    value = node.kwargs.get("training", node.args[index] if len(node.args) > index else default)
    return value is not False


def is_random(node: fx.Node, root: nn.Module) -> bool:
    """Whether running `node` draws from a random generator (dropout in training,
    torch.rand*, bernoulli_, attention with dropout_p > 0, a leaf module holding a
    dropout layer in training mode, a higher-order op whose subgraph does).

    Random code inside a leaf module that holds no dropout-like layer is not seen."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return any(isinstance(m, _RANDOM_MODULES) and m.training and getattr(m, "p", 1.0) > 0
                   or isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and m.training and m.dropout > 0
                   for m in module.modules())
    if node.op == "call_method":
        return str(node.target) in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    if isinstance(target, torch._ops.HigherOrderOperator):
        return any(is_random(inner, root) for sub in _subgraphs(node, root) for inner in sub.graph.nodes)
    name = _name(target)
    if name == "scaled_dot_product_attention":
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    if name in ("dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"):
        return _training(node, 2)
    if name == "rrelu":
        return _training(node, 3, default=False)
    return name in _RANDOM_FUNCTIONS


def _subgraphs(node: fx.Node, root: nn.Module) -> list[fx.GraphModule]:
    """The GraphModules a higher-order op runs (read by get_attr arguments)."""
    subs = []
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            obj = _fetch(root, str(arg.target))
            if isinstance(obj, fx.GraphModule):
                subs.append(obj)
    return subs


def mutated_args(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The argument nodes `node` changes in place: x.add_(y), x += y, x[i] = y,
    ReLU(inplace=True), F.relu(x, inplace=True), aten ops whose schema marks an
    argument written (aten.add_, aten.copy_), and the running statistics of a
    batch norm in training."""
    args = node.args
    first = [args[0]] if args and isinstance(args[0], fx.Node) else []
    if node.kwargs.get("inplace") is True:
        return first
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("_") else []
    if node.op == "call_module":
        return first if getattr(root.get_submodule(str(node.target)), "inplace", False) is True else []
    if node.op != "call_function":
        return []
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _hop_mutated_args(node, root)
    if isinstance(target, torch._ops.OpOverload):
        written = []
        for i, a in enumerate(target._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                value = node.kwargs.get(a.name, args[i] if i < len(args) else None)
                written.extend(x for x in (value if isinstance(value, (list, tuple)) else [value])
                               if isinstance(x, fx.Node))
        if _name(target) in _BATCH_NORM_OPS and _training(node, 5, default=False):
            written.extend(x for x in args[3:5] if isinstance(x, fx.Node))
        return written
    name = _name(target)
    if target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")):
        return first
    return []


def _hop_mutated_args(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """What a higher-order op that runs a subgraph on the arguments after it
    (wrap_with_set_grad_enabled, wrap_with_autocast: `torch.no_grad()` blocks in an
    export) changes in place: the arguments whose subgraph placeholders it updates."""
    args = list(node.args)
    at = next((i for i, a in enumerate(args) if isinstance(a, fx.Node) and a.op == "get_attr"
               and isinstance(_fetch(root, str(a.target)), fx.GraphModule)), None)
    if at is None:
        return []
    sub = _fetch(root, str(args[at].target))
    operands = dict(zip((n for n in sub.graph.nodes if n.op == "placeholder"), args[at + 1:]))
    written = [operands.get(memory_owner(a, sub)) for n in sub.graph.nodes for a in mutated_args(n, sub)]
    return list(dict.fromkeys(a for a in written if isinstance(a, fx.Node)))


def tensor_base(node: fx.Node) -> fx.Node:
    """The node whose memory `node`'s value shares, following views (x.view(...),
    x[i], aten ops whose schema says the result aliases an argument) back to the
    value that owns the memory."""
    while True:
        if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
            return node
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            returns = target._schema.returns
            if not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write):
                return node
        elif _name(target) not in _VIEW_NAMES:
            return node
        node = node.args[0]


def mutates_first_arg(node: fx.Node, root: nn.Module) -> bool:
    """Whether a node changes its first argument in place (x.add_(y), x += y, x[i] = y,
    ReLU(inplace=True), F.relu(x, inplace=True), aten.relu_); its result is then that
    argument's tensor."""
    return bool(node.args) and isinstance(node.args[0], fx.Node) and node.args[0] in mutated_args(node, root)


def memory_owner(node: fx.Node, root: nn.Module) -> fx.Node:
    """The node that owns the memory `node`'s value lives in, following views
    (`tensor_base`) and in-place updates, whose result is the tensor they change:
    in `self.ema.mul_(0.9).add_(y)` the add_ changes the buffer itself, so both
    updates' owner is the get_attr of `ema`."""
    while True:
        node = tensor_base(node)
        if not mutates_first_arg(node, root):
            return node
        node = node.args[0]


def written_state(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The get_attr nodes (parameters, buffers) whose tensors `node` changes in place,
    directly, through views or through a chain of in-place updates."""
    owners = (memory_owner(a, root) for a in mutated_args(node, root))
    return list(dict.fromkeys(o for o in owners if o.op == "get_attr"))


def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_writes(node: fx.Node, root: nn.Module) -> list[nn.Module]:
    """Batch norms in training inside a called module: they update their buffers."""
    module = root.get_submodule(str(node.target))
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


def ordering_edges(graph: fx.Graph, root: nn.Module) -> list[tuple[str, str]]:
    """Edges (earlier node, later node) that order side effects as eager runs them.

    - In-place updates: an update of a value (or of a parameter or buffer read by a
      get_attr or held by a called module) runs after the value's earlier readers
      and earlier updates, and before its later readers; an update through a view
      also after the node that made the viewed value.
    - Random ops: one chain in fx order, so they draw from the generator in eager's
      order whatever runs concurrently.

    Edges that repeat a data edge are left out. `root` is the module the graph's
    targets name."""
    memory: dict[object, tuple[fx.Node | None, list[fx.Node]]] = {}  # key -> (last writer, readers since)
    edges: dict[tuple[fx.Node, fx.Node], None] = {}
    last_random: fx.Node | None = None

    def key(node: fx.Node) -> object:
        owner = memory_owner(node, root)  # an update of a chain of updates of a buffer updates the buffer
        return ("tensor", id(_fetch(root, str(owner.target)))) if owner.op == "get_attr" else tensor_base(node)

    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        reads = {key(a) for a in node.all_input_nodes}
        mutated = mutated_args(node, root)
        writes = {key(a) for a in mutated}
        for a in mutated:  # an update through a view also reads the memory's owner itself (the runtime's
            base = tensor_base(a)  # copy of it, chunks.thread_in_place_updates)
            if base is not a and base.op != "get_attr":
                edges[base, node] = None
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            reads |= {("tensor", id(t)) for t in list(module.parameters()) + list(module.buffers())}
            writes |= {("tensor", id(b)) for m in _module_writes(node, root) for b in m.buffers()}
        for k in reads | writes:
            writer, readers = memory.get(k, (None, []))
            if writer is not None:
                edges[writer, node] = None  # read or write after write
            if k in writes:
                for r in readers:
                    edges[r, node] = None  # write after read
                memory[k] = (node, [])
            else:
                readers.append(node)
                memory[k] = (writer, readers)
        if is_random(node, root):
            if last_random is not None:
                edges[last_random, node] = None
            last_random = node
    return [(a.name, b.name) for a, b in edges if a is not b and a not in b.all_input_nodes]
