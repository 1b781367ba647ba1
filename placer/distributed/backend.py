"""Run a plan with each device owned by a torch.distributed rank.

Every rank builds the same model (same seed), traces it exactly as the plan's capture
did and fuses the same chunks (placer.runtime.chunks), so every rank knows the whole
chunk graph. A rank runs only the chunks on devices it owns. Values that cross ranks
go forward, and their gradients backward, with point-to-point isend/irecv (gloo
between CPU ranks, NCCL between GPUs).

Why it cannot deadlock: every rank walks the same global schedule, chunk 0..N-1
forward and N-1..0 backward, and issues each cross-rank message at the same point
of that walk on both sides: a forward value when its producer chunk is reached, its
gradient when the first of its consumers on the receiving rank is reached (in the
backward walk, the last of them to run). Sends never block; a rank blocks only on a
receive whose sender sits earlier in the walk, so the lowest unfinished chunk always
has its inputs. Both sides of every pair of ranks issue their messages in the same
order, which is what NCCL's in-order matching needs; gloo gets a distinct tag per
message besides. Receives are posted early, so transfers overlap the compute that
does not need them.

Shapes, dtypes and whether each crossing tensor needs a gradient come from one
shape-propagation pass over the whole model at construction (on the host, with the
example batch, restoring buffers and the RNG afterwards). The schedule is therefore
specialised to the example batch's shapes, as pipeline schedules are; a batch of
another shape is refused. Non-tensor values that cross ranks (sizes, say) are taken
from that pass as constants.

The loss is computed on the rank that owns the last chunk producing a model output
(the "loss rank"); model outputs made elsewhere are sent there as if to a consumer
chunk, and the loss value is broadcast so every rank's train_step returns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from graphs.capture import node_params
from graphs.trace import fingerprint, trace_model
from graphs.devices import Cluster, Device, parse_cluster
from graphs.errors import PlanError
from placer.plan import Plan, load_plan
from placer.runtime.chunks import Chunk, build_chunks

LossFn = Callable[..., torch.Tensor]


# -- the static schedule ---------------------------------------------------------

@dataclass(frozen=True)
class TensorMeta:
    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool


@dataclass(frozen=True)
class ValueMeta:
    """One fx value as the shape pass saw it: its pytree leaves, each a TensorMeta
    or a constant (an int, None, a dtype...)."""

    spec: TreeSpec
    leaves: tuple

    @property
    def tensors(self) -> list[int]:
        return [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, TensorMeta)]

    @property
    def grad_tensors(self) -> list[int]:
        return [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, TensorMeta) and leaf.requires_grad]


@dataclass(frozen=True)
class Crossing:
    """A value that one rank produces and another consumes: sent once per step
    forward (at `produced_at`) and its gradient once backward (at `first_use`)."""

    value: str
    src: int
    dst: int
    produced_at: int  # chunk index of its producer
    first_use: int  # lowest index of its consumers on dst (len(chunks): the loss)
    tag: int  # first gloo tag of its messages; each tensor leaf and phase gets its own


@dataclass
class Schedule:
    """What every rank knows alike: chunks, their owners, and the crossings."""

    chunks: list[Chunk]
    owner: list[int]  # chunk index -> rank; owner[len(chunks)] is the loss rank
    devices: list[Device]  # chunk index -> the device it runs on
    producer: dict[str, int]  # node -> chunk index
    crossings: list[Crossing]
    meta: dict[str, ValueMeta] = field(default_factory=dict)
    _index: dict = field(default_factory=dict, repr=False)

    @property
    def loss_index(self) -> int:
        return len(self.chunks)

    @property
    def loss_rank(self) -> int:
        return self.owner[self.loss_index]

    def sent_forward_at(self, k: int) -> list[Crossing]:
        return self._at("produced_at").get(k, [])

    def sent_backward_at(self, k: int) -> list[Crossing]:
        return self._at("first_use").get(k, [])

    def _at(self, point: str) -> dict[int, list[Crossing]]:
        """Crossings by the chunk where they are sent, in crossing order (cached; the
        crossings are final once DistributedModel has numbered them)."""
        if point not in self._index:
            self._index[point] = {}
            for c in self.crossings:
                self._index[point].setdefault(getattr(c, point), []).append(c)
        return self._index[point]


def build_schedule(chunks: list[Chunk], devices: list[Device], output_nodes: list[str]) -> Schedule:
    """Owners and crossings of `chunks` (devices[k]: chunk k's device, with its rank).
    The loss goes to the owner of the last chunk that produces a model output."""
    producer = {node: c.index for c in chunks for node in c.outputs}
    makers = [producer[n] for n in output_nodes if n in producer]
    owner = [d.rank for d in devices] + [devices[max(makers)].rank if makers else devices[-1].rank]
    loss_index = len(chunks)
    consumers = [(c.index, name) for c in chunks for name in c.inputs] + [(loss_index, n) for n in output_nodes]
    first_use: dict[tuple[str, int], int] = {}
    for k, name in consumers:
        if name in producer and owner[k] != owner[producer[name]]:
            key = (name, owner[k])
            first_use[key] = min(first_use.get(key, k), k)
    order = {name: i for c in chunks for i, name in enumerate(c.outputs)}
    keys = sorted(first_use, key=lambda key: (producer[key[0]], order[key[0]], key[1]))
    crossings = [Crossing(name, owner[producer[name]], dst, producer[name], first_use[(name, dst)], tag=0)
                 for name, dst in keys]
    return Schedule(chunks=chunks, owner=owner, devices=devices, producer=producer, crossings=crossings)


# -- the placed model on one rank --------------------------------------------------

def rank_cluster(plan: Plan, world_size: int, cluster: Cluster | None = None) -> Cluster:
    """The plan's devices with owners: `cluster` (device i of the plan is device i of
    the cluster), the plan's own `rankR:` names, or else device i on rank i mod world_size."""
    if cluster is None:
        names = plan.devices if plan.devices[0].startswith("rank") else [
            f"rank{i % world_size}:{name}" for i, name in enumerate(plan.devices)]
        cluster = parse_cluster(",".join(names))
    if len(cluster) != len(plan.devices):
        raise PlanError(f"the plan has {len(plan.devices)} devices but the cluster {cluster.spec()} has {len(cluster)}")
    bad = [d.name for d in cluster.devices if d.rank is None or d.rank >= world_size]
    if bad:
        raise PlanError(f"devices {bad} have no owner among ranks 0..{world_size - 1}: write rankR:DEVICE")
    return cluster


class DistributedModel:
    """A model placed over torch.distributed ranks. Construct it on every rank (a
    collective: same model, same seed, same plan, same example batch); then every rank
    calls `train_step` with the same batch and steps an optimizer over `parameters()`,
    its own share (optimizer state lives with its parameters)."""

    def __init__(self, model: nn.Module, plan: Plan | str | Path, example_inputs: Sequence[torch.Tensor],
                 cluster: Cluster | None = None, group: dist.ProcessGroup | None = None):
        if not isinstance(plan, Plan):
            plan = load_plan(plan)
        source = plan.path.name if plan.path is not None else "plan"
        self.group = group
        self.rank = dist.get_rank(group)
        self.model = model
        self.plan = plan
        cluster = rank_cluster(plan, dist.get_world_size(group), cluster)
        device_of = dict(zip(plan.devices, cluster.devices))
        self.devices = device_of  # plan device name -> the device with its owner

        traced = trace_model(model, leaf_paths=plan.leaf_paths, allow_fallback=False)
        gm = traced.gm
        fp = fingerprint(model, gm)
        if fp != plan.fingerprint:
            raise PlanError(f"{source} was made for another model (fingerprint {plan.fingerprint}, this model {fp})")
        body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        unplaced = [n.name for n in body if n.name not in plan.assignment]
        if unplaced:
            raise PlanError(f"{source} does not place node {unplaced[0]!r} ({len(unplaced)} unplaced)")
        self._placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self._output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        outputs: list[str] = []
        fx.node.map_arg(self._output, lambda n: outputs.append(n.name))
        self._output_nodes = list(dict.fromkeys(outputs))

        chunks = build_chunks(model, gm.graph, plan.assignment)
        self.schedule = build_schedule(chunks, [device_of[c.device] for c in chunks], self._output_nodes)
        self.schedule.meta = self._propagate_shapes(example_inputs)
        self._number_messages()
        self._comm_device = self._communication_device(cluster)
        self.tensor_owner: dict[int, int] = {}  # id(parameter or buffer) -> owner rank
        self.tensor_device: dict[int, str] = {}  # id(tensor this rank owns) -> plan device name
        self._place_tensors(gm, body, device_of, source)
        # Activation accounting (measure): bytes saved for backward per plan device, when a dict.
        self.saved_bytes: dict[str, int] | None = None
        self.input_shapes = [tuple(x.shape) for x in example_inputs]

    # -- set-up ------------------------------------------------------------------

    def _communication_device(self, cluster: Cluster) -> torch.device:
        """Where crossing tensors are sent from and received into: the host for gloo
        (CUDA values are staged through it), this rank's first GPU for NCCL."""
        if dist.get_backend(self.group) != "nccl":
            return torch.device("cpu")
        mine = [d.torch_device for d in cluster.devices if d.rank == self.rank and d.kind == "cuda"]
        return torch.device(mine[0] if mine else f"cuda:{torch.cuda.current_device()}")

    def _propagate_shapes(self, example_inputs: Sequence[torch.Tensor]) -> dict[str, ValueMeta]:
        """Run every chunk once where the model was built, as the schedule will, and describe each
        value that crosses ranks. Buffers and the RNG are restored afterwards, so the
        pass leaves no trace in the numerics."""
        home = next((p.device for p in self.model.parameters()), torch.device("cpu"))  # not yet placed
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        values = dict(zip(self._placeholders, (x.to(home) for x in example_inputs)))
        with torch.random.fork_rng(devices=[home] if home.type == "cuda" else []), torch.enable_grad():
            for chunk in self.schedule.chunks:
                args = [_as_input(values[name], home, name in chunk.mutated_inputs)[0]
                        for name in chunk.inputs]
                values.update(zip(chunk.outputs, chunk.module(*args)))
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        meta = {}
        for c in self.schedule.crossings:
            flat, spec = tree_flatten(values[c.value])
            meta[c.value] = ValueMeta(spec, tuple(
                TensorMeta(x.shape, x.dtype, x.requires_grad) if isinstance(x, torch.Tensor) else x for x in flat))
        return meta

    def _number_messages(self) -> None:
        """Give each crossing its own block of gloo tags: one per tensor leaf forward,
        one per gradient backward."""
        tag, numbered = 0, []
        for c in self.schedule.crossings:
            numbered.append(replace(c, tag=tag))
            tag += 2 * len(self.schedule.meta[c.value].leaves)
        self.schedule.crossings = numbered
        self.schedule._index.clear()

    def _place_tensors(self, gm: fx.GraphModule, body: list[fx.Node], device_of: dict[str, Device],
                       source: str) -> None:
        """Move each parameter and buffer that this rank's nodes read to their device;
        free the storage of parameters other ranks own. Fills tensor_owner (rank 0
        owns what no node reads) and tensor_device."""
        owner: dict[int, tuple[str, Device]] = {}
        plan_name = {}
        for node in body:
            device = device_of[self.plan.assignment[node.name]]
            for name in node_params(gm, node):
                tensor = _get_tensor(self.model, name)
                plan_name.setdefault(id(tensor), self.plan.assignment[node.name])
                first, seen = owner.setdefault(id(tensor), (name, device))
                if seen.rank != device.rank or seen.torch_device != device.torch_device:
                    raise PlanError(f"{source} splits parameter {first!r} across {seen.name} and {device.name}: "
                                    f"nodes that share a parameter must share a device")
        ranks = self.tensor_owner
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            ranks[id(tensor)] = owner[id(tensor)][1].rank if id(tensor) in owner else 0
            if ranks[id(tensor)] == self.rank:
                self.tensor_device[id(tensor)] = plan_name.get(id(tensor), self.plan.devices[0])
        with torch.no_grad():
            for p in self.model.parameters():
                if ranks[id(p)] != self.rank:
                    p.data = torch.empty(0, dtype=p.dtype)  # lives on its owner's rank only
                elif id(p) in owner:
                    p.data = p.data.to(owner[id(p)][1].torch_device)
        for module in self.model.modules():
            for key, b in module._buffers.items():
                if b is not None and id(b) in owner and ranks[id(b)] == self.rank:
                    moved = b.to(owner[id(b)][1].torch_device)
                    module._buffers[key] = moved
                    ranks[id(moved)] = ranks.pop(id(b))
                    self.tensor_device[id(moved)] = self.tensor_device.pop(id(b))

    # -- what a training loop uses ---------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters: build the optimizer over these (may be empty)."""
        return [p for p in self.model.parameters() if self.tensor_owner[id(p)] == self.rank]

    def owned_tensors(self) -> list[torch.Tensor]:
        """This rank's parameters and buffers."""
        return [t for t in list(self.model.parameters()) + list(self.model.buffers())
                if self.tensor_owner.get(id(t)) == self.rank]

    def held_bytes(self, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        """Bytes of this rank's parameters, buffers, gradients and optimizer state, per
        plan device (measure.py's way of counting)."""
        held: dict[str, int] = {}
        for t in self.owned_tensors():
            state = optimizer.state.get(t, {}) if optimizer is not None else {}
            parts = [t, t.grad] + [v for v in state.values() if isinstance(v, torch.Tensor)]
            device = self.tensor_device[id(t)]
            held[device] = held.get(device, 0) + sum(x.numel() * x.element_size() for x in parts if x is not None)
        return held

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The entries of the model's state_dict that this rank owns (on the host)."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(self.model.named_buffers(remove_duplicate=False))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()
                if k in named and self.tensor_owner.get(id(named[k])) == self.rank}

    def train_step(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn) -> float:
        """Forward, loss and backward of one batch over all ranks (every rank calls it
        with the same batch). Gradients accumulate in this rank's parameters' .grad.
        Returns the loss on every rank."""
        return self._run(inputs, loss_fn, backward=True)

    @torch.no_grad()
    def evaluate(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn) -> float:
        """The loss of one batch, forward only (every rank calls it). Switch dropout and
        batch norm with `model.model.eval()` on every rank, as usual."""
        return self._run(inputs, loss_fn, backward=False)

    def _run(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn, backward: bool) -> float:
        inputs = tuple(inputs)
        if [tuple(x.shape) for x in inputs] != self.input_shapes:
            raise ValueError(f"batch shapes {[tuple(x.shape) for x in inputs]} differ from the example batch's "
                             f"{self.input_shapes}: the distributed schedule is built for one batch shape")
        step = _Step(self, dict(zip(self._placeholders, inputs)), loss_fn)
        step.forward()
        # Every rank learns the loss while the backward pass runs.
        loss = torch.tensor([step.loss if step.loss is not None else 0.0], dtype=torch.float64,
                            device=self._comm_device)
        shared = dist.broadcast(loss, self.global_rank(self.schedule.loss_rank), group=self.group, async_op=True)
        if backward:
            step.backward()
        step.finish()
        shared.wait()
        return float(loss.item())

    def global_rank(self, rank: int) -> int:
        """A rank of the model's group in the default group (what point-to-point
        operations take, whatever their group)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _output_value(self, values: dict) -> object:
        return fx.node.map_arg(self._output, lambda n: values[n.name])


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


class _Step:
    """One forward and backward of the global schedule on this rank."""

    def __init__(self, model: DistributedModel, inputs: dict, loss_fn: LossFn):
        self.m = model
        self.s = model.schedule
        self.rank = model.rank
        self.loss_fn = loss_fn
        self.values: dict = dict(inputs)  # node -> value here: model inputs, own outputs, received ones
        self.pending: dict[str, tuple] = {}  # node -> (works, buffers) of a receive not yet waited on
        self.leaves: dict[int, list[list]] = {}  # chunk -> per input, its grad-requiring leaves
        self.outs: dict[int, dict] = {}  # chunk -> its outputs
        self.grads: dict[str, list] = {}  # node -> gradient per leaf, summed over consumers seen so far
        self.pending_grads: dict[str, list] = {}  # node -> receives of its gradient from other ranks
        self.sends: list = []  # works of isends, waited on at the end (their buffers live until then)
        self.loss: float | None = None
        self._loss: torch.Tensor | None = None
        self.counted: set[int] = set()  # storages whose saved bytes are counted

    # forward -------------------------------------------------------------------

    def forward(self) -> None:
        for k in range(len(self.s.chunks) + 1):
            if self.s.owner[k] == self.rank:
                self._run_loss() if k == self.s.loss_index else self._run_chunk(self.s.chunks[k])
            for c in self.s.sent_forward_at(k):
                if c.src == self.rank:
                    self._send_value(c)
                elif c.dst == self.rank:
                    self._post_receive(c)

    def _inputs_for(self, k: int, names: Sequence[str], device: torch.device, mutated=frozenset()) -> list:
        args, leaves = [], []
        for name in names:
            if name in self.pending:
                self._wait_value(name)
            arg, grad_leaves = _as_input(self.values[name], device, name in mutated)
            args.append(arg)
            leaves.append(grad_leaves)
        self.leaves[k] = leaves
        return args

    def _run_chunk(self, chunk: Chunk) -> None:
        device = torch.device(self.s.devices[chunk.index].torch_device)
        args = self._inputs_for(chunk.index, chunk.inputs, device, chunk.mutated_inputs)
        with self._counting_saved(chunk):
            outs = chunk.module(*args)
        self.outs[chunk.index] = dict(zip(chunk.outputs, outs))
        self.values.update(self.outs[chunk.index])

    def _counting_saved(self, chunk: Chunk):
        """Count the bytes each chunk saves for backward (each storage once, parameters
        and buffers not), when the model asks for it (measurement's warm-up)."""
        counts = self.m.saved_bytes
        if counts is None:
            return nullcontext()
        device = self.m.plan.assignment[chunk.nodes[0]]
        own = {t.untyped_storage().data_ptr() for t in self.m.owned_tensors()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in own and storage.data_ptr() not in self.counted:
                self.counted.add(storage.data_ptr())
                counts[device] = counts.get(device, 0) + storage.nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _run_loss(self) -> None:
        k = self.s.loss_index
        placeholders = self.m._placeholders
        first = next((self.values[n] for n in placeholders if isinstance(self.values[n], torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        args = self._inputs_for(k, self.m._output_nodes, device)
        out = self.m._output_value(dict(zip(self.m._output_nodes, args)))
        self._loss = self.loss_fn(out, *(self.values[n] for n in placeholders))
        self.loss = float(self._loss.detach())

    def _send_value(self, c: Crossing) -> None:
        flat, _ = tree_flatten(self.values[c.value])
        for j, i in enumerate(self.s.meta[c.value].tensors):
            self._isend(flat[i].detach(), c.dst, c.tag + j)

    def _post_receive(self, c: Crossing) -> None:
        meta = self.s.meta[c.value]
        works, buffers = [], []
        for j, i in enumerate(meta.tensors):
            buffer, work = self._irecv(meta.leaves[i], c.src, c.tag + j)
            buffers.append(buffer)
            works.append(work)
        self.pending[c.value] = (works, buffers)

    def _wait_value(self, name: str) -> None:
        works, buffers = self.pending.pop(name)
        meta = self.s.meta[name]
        flat = list(meta.leaves)
        for work, i, buffer in zip(works, meta.tensors, buffers):
            work.wait()
            leaf = meta.leaves[i]
            flat[i] = buffer.view(torch.bool) if leaf.dtype == torch.bool else buffer
            flat[i].requires_grad_(leaf.requires_grad)
        self.values[name] = tree_unflatten(flat, meta.spec)

    # backward ------------------------------------------------------------------

    def backward(self) -> None:
        for k in reversed(range(len(self.s.chunks) + 1)):
            if self.s.owner[k] == self.rank:
                self._backward_loss() if k == self.s.loss_index else self._backward_chunk(self.s.chunks[k])
            for c in self.s.sent_backward_at(k):
                if c.dst == self.rank:
                    self._send_grad(c)
                elif c.src == self.rank:
                    self._post_grad_receive(c)

    def _backward_loss(self) -> None:
        if self._loss.requires_grad:  # not when no parameter or input needs a gradient
            self._loss.backward()
        self._collect_input_grads(self.s.loss_index, self.m._output_nodes)

    def _backward_chunk(self, chunk: Chunk) -> None:
        tensors, grads = [], []
        for name in chunk.outputs:
            total = self._gradient_of(name)
            if total is None:
                continue
            for t, g in zip(tree_flatten(self.outs[chunk.index][name])[0], total):
                if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                    tensors.append(t)
                    grads.append(_to(g, t.device))
        if tensors:
            torch.autograd.backward(tensors, grads)
        self._collect_input_grads(chunk.index, chunk.inputs)
        del self.outs[chunk.index]

    def _gradient_of(self, name: str) -> list | None:
        """The gradient of a value this rank produced: its local consumers' sum plus
        what other ranks' consumers sent."""
        total = self.grads.pop(name, None)
        for works, buffers, indices in self.pending_grads.pop(name, []):
            received: list = [None] * len(self.s.meta[name].leaves)
            for work, i, buffer in zip(works, indices, buffers):
                work.wait()
                received[i] = buffer
            total = _add(total, received)
        return total

    def _collect_input_grads(self, k: int, names: Sequence[str]) -> None:
        for name, leaves in zip(names, self.leaves.pop(k)):
            if name in self.s.producer:
                grads = [None if leaf is None else leaf.grad for leaf in leaves]
                if any(g is not None for g in grads):
                    self.grads[name] = _add(self.grads.get(name), grads)

    def _send_grad(self, c: Crossing) -> None:
        """Every gradient the producer expects, zeros where no consumer here made one."""
        meta = self.s.meta[c.value]
        grads = self.grads.pop(c.value, None) or [None] * len(meta.leaves)
        for j, i in enumerate(meta.grad_tensors):
            g = grads[i]
            leaf = meta.leaves[i]
            self._isend(torch.zeros(leaf.shape, dtype=leaf.dtype) if g is None else g, c.src,
                        c.tag + len(meta.leaves) + j)

    def _post_grad_receive(self, c: Crossing) -> None:
        meta = self.s.meta[c.value]
        works, buffers = [], []
        for j, i in enumerate(meta.grad_tensors):
            buffer, work = self._irecv(meta.leaves[i], c.dst, c.tag + len(meta.leaves) + j)
            works.append(work)
            buffers.append(buffer)
        self.pending_grads.setdefault(c.value, []).append((works, buffers, meta.grad_tensors))

    # plumbing ------------------------------------------------------------------

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = _to(t.detach(), self.m._comm_device).contiguous()
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        self.sends.append((dist.isend(t, self.m.global_rank(dst), group=self.m.group, tag=tag), t))

    def _irecv(self, leaf: TensorMeta, src: int, tag: int):
        dtype = torch.uint8 if leaf.dtype == torch.bool else leaf.dtype
        buffer = torch.empty(leaf.shape, dtype=dtype, device=self.m._comm_device)
        return buffer, dist.irecv(buffer, self.m.global_rank(src), group=self.m.group, tag=tag)

    def finish(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()


def _as_input(value, device: torch.device, copy_it: bool):
    """A value as a consuming chunk sees it: on its device, detached from the producer's
    graph, a fresh leaf where gradients must flow back (placer.runtime's contract).
    Returns (value, per leaf: the grad-requiring leaf or None)."""
    flat, spec = tree_flatten(value)
    args, grad_leaves = [], []
    for x in flat:
        leaf = None
        if isinstance(x, torch.Tensor):
            here = _to(x.detach(), device)
            if x.requires_grad:
                leaf = here.requires_grad_()
            x = here.clone() if copy_it else here
        args.append(x)
        grad_leaves.append(leaf)
    return tree_unflatten(args, spec), grad_leaves


def _add(total: list | None, grads: list) -> list:
    if total is None:
        return list(grads)
    return [a if b is None else b if a is None else a + _to(b, a.device) for a, b in zip(total, grads)]


def _get_tensor(model: nn.Module, qualname: str) -> torch.Tensor:
    path, _, attr = qualname.rpartition(".")
    return getattr(model.get_submodule(path), attr)


# -- checkpoints -------------------------------------------------------------------

def save_checkpoint(model: DistributedModel, directory: str | Path) -> Path:
    """Write this rank's share of the state_dict to DIRECTORY/rank{R}.pt (call on every rank)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{model.rank}.pt"
    torch.save(model.state_dict(), path)
    return path


def merge_checkpoints(directory: str | Path) -> dict[str, torch.Tensor]:
    """The ranks' shares in DIRECTORY merged into one state_dict that loads into the
    unplaced model (`model.load_state_dict(merge_checkpoints(d))`)."""
    shares = sorted(Path(directory).glob("rank*.pt"))
    if not shares:
        raise PlanError(f"{directory}: no rank*.pt checkpoint shares")
    merged: dict[str, torch.Tensor] = {}
    for path in shares:
        merged.update(torch.load(path, map_location="cpu", weights_only=True))
    return merged


__all__ = ["DistributedModel", "Schedule", "Crossing", "build_schedule", "rank_cluster", "save_checkpoint",
           "merge_checkpoints"]
