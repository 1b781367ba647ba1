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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.devices import Cluster
from placer.distributed.schedule import Crossing, Schedule, TensorMeta, ValueMeta, build_schedule, describe
from placer.distributed.share import RankShare, bind, check_shapes, chunk_reads, eager_output, rank_cluster
from placer.plan import Plan, load_plan, trace_for_plan
from placer.runtime.chunks import Chunk, build_chunks
from placer.runtime.tensors import localize, tensor_readers, written_tensors
from placer.runtime.values import add_grads, move, receive

LossFn = Callable[..., torch.Tensor]


# -- the placed model on one rank --------------------------------------------------

class DistributedModel(RankShare):
    """A model placed over torch.distributed ranks. Construct it on every rank (a
    collective: same model, same seed, same plan, same example batch); then every rank
    calls `train_step` with the same batch and steps an optimizer over `parameters()`,
    its own share (optimizer state lives with its parameters).

    Raises PlanError (one line) when the plan was made for another model, leaves a node
    unplaced, gives a device no owner, or splits a shared parameter."""

    def __init__(self, model: nn.Module, plan: Plan | str | Path, example_inputs: Sequence[torch.Tensor],
                 cluster: Cluster | None = None, group: dist.ProcessGroup | None = None):
        super().__init__(model, group)
        if not isinstance(plan, Plan):
            plan = load_plan(plan)
        self.plan = plan
        cluster = rank_cluster(plan, dist.get_world_size(group), cluster)
        device_of = dict(zip(plan.devices, cluster.devices))
        self.devices = device_of  # plan device name -> the device with its owner
        self.local_devices = {name: d for name, d in device_of.items() if d.rank == self.rank}

        self.traced = traced = trace_for_plan(model, plan)
        gm = traced.gm
        self._output_nodes = list(dict.fromkeys(leaf.name for leaf in traced.output_leaves if isinstance(leaf, fx.Node)))

        chunks = build_chunks(gm, gm.graph, plan.assignment, runs=True)
        schedule = build_schedule(chunks, [device_of[c.device] for c in chunks], self._output_nodes)
        self.schedule = schedule.with_meta(self._propagate_shapes(schedule, example_inputs))
        self.comm_device = self._communication_device(cluster)
        readers = tensor_readers(model, chunk_reads(chunks), plan.source,
                                 written=set().union(*(written_tensors(c.module) for c in chunks)))
        self._place(readers, {name: (d.rank, d.torch_device) for name, d in device_of.items()}, plan.devices[0])
        for chunk in chunks:  # after the shape pass, which runs every chunk on the host
            if device_of[chunk.device].rank == self.rank:
                localize(model, chunk.module, lambda node, d=torch.device(device_of[chunk.device].torch_device): d)
        self.input_shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]

    # -- set-up ------------------------------------------------------------------

    def _communication_device(self, cluster: Cluster) -> torch.device:
        """Where crossing tensors are sent from and received into: the host for gloo
        (CUDA values are staged through it), this rank's first GPU for NCCL."""
        if dist.get_backend(self.group) != "nccl":
            return torch.device("cpu")
        mine = [d.torch_device for d in cluster.devices if d.rank == self.rank and d.kind == "cuda"]
        return torch.device(mine[0] if mine else f"cuda:{torch.cuda.current_device()}")

    def _propagate_shapes(self, schedule: Schedule, example_inputs: Sequence[torch.Tensor]) -> dict[str, ValueMeta]:
        """Run every chunk once where the model was built, as the schedule will, and describe each
        value that crosses ranks. Buffers and the RNG are restored afterwards, so the
        pass leaves no trace in the numerics."""
        home = next((p.device for p in self.model.parameters()), torch.device("cpu"))  # not yet placed
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        values = {name: x.to(home) for name, x in bind(self.traced, example_inputs).items()}
        with torch.random.fork_rng(devices=[home] if home.type == "cuda" else []), torch.enable_grad():
            for chunk in schedule.chunks:
                args = [receive(values[name], home, detach=True, copy=name in chunk.mutated_inputs)[0]
                        for name in chunk.inputs]
                values.update(zip(chunk.outputs, chunk.module(*args)))
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        return {c.value: describe(values[c.value]) for c in schedule.crossings}

    def train_step(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn) -> float:
        """Forward, loss and backward of one batch over all ranks (every rank calls it
        with the same batch). Gradients accumulate in this rank's parameters' .grad.
        Returns the loss on every rank. Raises PlanError for a batch of other shapes
        or dtypes than the example batch's (the schedule is static)."""
        return self._run(inputs, loss_fn, backward=True)

    @torch.no_grad()
    def evaluate(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn) -> float:
        """The loss of one batch, forward only (every rank calls it). Switch dropout and
        batch norm with `model.model.eval()` on every rank, as usual."""
        return self._run(inputs, loss_fn, backward=False)

    def _run(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn, backward: bool) -> float:
        inputs = tuple(inputs)
        check_shapes(inputs, self.input_shapes, "the distributed schedule")
        step = _Step(self, inputs, loss_fn)
        step.forward()
        # Every rank learns the loss while the backward pass runs.
        loss = torch.tensor([step.loss if step.loss is not None else 0.0], dtype=torch.float64,
                            device=self.comm_device)
        shared = dist.broadcast(loss, self.global_rank(self.schedule.loss_rank), group=self.group, async_op=True)
        if backward:
            step.backward()
        step.finish()
        shared.wait()
        return float(loss.item())


class _Step:
    """One forward and backward of the global schedule on this rank."""

    def __init__(self, model: DistributedModel, inputs: tuple, loss_fn: LossFn):
        self.m = model
        self.s = model.schedule
        self.rank = model.rank
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.values: dict = bind(model.traced, inputs)  # node -> value here: model inputs, own outputs, received ones
        self.pending: dict[str, tuple] = {}  # node -> (works, buffers) of a receive not yet waited on
        self.leaves: dict[int, list[list]] = {}  # chunk -> per input, its grad-requiring leaves
        self.outs: dict[int, dict] = {}  # chunk -> its outputs
        self.grads: dict[str, list] = {}  # node -> gradient per leaf, summed over consumers seen so far
        self.pending_grads: dict[str, list] = {}  # node -> receives of its gradient from other ranks
        self.sends: list = []  # works of isends, waited on at the end (their buffers live until then)
        self.loss: float | None = None
        self._loss: torch.Tensor | None = None

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
            arg, grad_leaves = receive(self.values[name], device, detach=True, copy=name in mutated)
            args.append(arg)
            leaves.append(grad_leaves)
        self.leaves[k] = leaves
        return args

    def _run_chunk(self, chunk: Chunk) -> None:
        device = torch.device(self.s.devices[chunk.index].torch_device)
        args = self._inputs_for(chunk.index, chunk.inputs, device, chunk.mutated_inputs)
        with self.m.count_saved(chunk.device):
            outs = chunk.module(*args)
        self.outs[chunk.index] = dict(zip(chunk.outputs, outs))
        self.values.update(self.outs[chunk.index])

    def _run_loss(self) -> None:
        k = self.s.loss_index
        first = next((x for x in self.inputs if isinstance(x, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        args = self._inputs_for(k, self.m._output_nodes, device)
        out = eager_output(self.m.traced, self.m.traced.output_leaves, dict(zip(self.m._output_nodes, args)))
        self._loss = self.loss_fn(out, *self.inputs)
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
                    grads.append(move(g, t.device))
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
            total = add_grads(total, received, self._device_of(name))
        return total

    def _collect_input_grads(self, k: int, names: Sequence[str]) -> None:
        for name, leaves in zip(names, self.leaves.pop(k)):
            if name in self.s.producer:
                grads = [None if leaf is None else leaf.grad for leaf in leaves]
                if any(g is not None for g in grads):
                    self.grads[name] = add_grads(self.grads.get(name), grads, self._device_of(name))

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

    def _device_of(self, name: str) -> torch.device:
        """Where a value's gradient is summed: where its producer chunk ran, or the
        communication device when another rank produced it (the sum is sent there)."""
        k = self.s.producer[name]
        return torch.device(self.s.devices[k].torch_device) if self.s.owner[k] == self.rank else self.m.comm_device

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        t = move(t.detach(), self.m.comm_device).contiguous()
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        self.sends.append((dist.isend(t, self.m.global_rank(dst), group=self.m.group, tag=tag), t))

    def _irecv(self, leaf: TensorMeta, src: int, tag: int):
        dtype = torch.uint8 if leaf.dtype == torch.bool else leaf.dtype
        buffer = torch.empty(leaf.shape, dtype=dtype, device=self.m.comm_device)
        return buffer, dist.irecv(buffer, self.m.global_rank(src), group=self.m.group, tag=tag)

    def finish(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()


__all__ = ["DistributedModel", "rank_cluster"]
