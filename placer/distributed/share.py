"""Which rank owns which device (`rank_cluster`), what one rank holds of a model
placed over ranks, and what a training loop asks of it: its parameters (for its
optimizer), its share of the state_dict (for checkpoints), the bytes it holds (for
measurement). Shared by both distributed frontends, DistributedModel (backend.py)
and PipelinedModel (pipelining.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from operator import attrgetter
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from graphs.capture import node_params
from graphs.devices import Cluster, Device, parse_cluster
from graphs.errors import PlanError
from graphs.trace import Traced
from placer.plan import Plan, trace_for_plan
from placer.runtime.chunks import Chunk
from placer.runtime.values import count_saved

__all__ = ["RankShare", "rank_cluster", "tensor_owners", "capture", "bind", "eager_output"]

Owner = tuple[int, str, torch.device]  # (owner rank, plan device name, torch device)


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


def capture(model: nn.Module, plan: Plan) -> Traced:
    """The plan's training capture of `model` (placer.plan.trace_for_plan, which checks
    the fingerprint), every node of it placed.

    Raises
    ------
    PlanError
        The plan was made for another model, or leaves a node unplaced.
    """
    traced = trace_for_plan(model, plan, mode="train")
    unplaced = [n.name for n in traced.gm.graph.nodes
                if n.op not in ("placeholder", "output", "get_attr") and n.name not in plan.assignment]
    if unplaced:
        raise PlanError(f"{plan.source} does not place node {unplaced[0]!r} ({len(unplaced)} unplaced)")
    return traced


def bind(traced: Traced, inputs: Sequence[Any]) -> dict[str, Any]:
    """Placeholder name -> value for the call `model(*inputs)`.

    Raises
    ------
    ValueError
        The capture does not cover the call (other shapes, say): one line saying why.
    """
    values = traced.bind(tuple(inputs), {})
    if values is None:
        raise ValueError(f"the plan's capture does not cover this batch: {traced.why_not(tuple(inputs), {})}")
    return values


def eager_output(traced: Traced, leaves: Sequence[Any], values: Mapping[str, Any]) -> Any:
    """The model's output as eager returns it, from a graph's flat output `leaves`
    (nodes, read from `values`, or constants)."""
    return traced.unflatten([values[leaf.name] if isinstance(leaf, fx.Node) else leaf for leaf in leaves])


def tensor_owners(model: nn.Module, chunks: Sequence[Chunk], where: Callable[[Chunk], tuple[int, Device]],
                  source: str, rank: int | None = None) -> tuple[dict[int, Owner], dict[int, torch.device]]:
    """Who owns each of the model's parameters and buffers: the rank and device of the
    first chunk that reads it (`where(chunk)`: its rank and device).

    With `rank`, a buffer that chunks on several devices read (a causal mask every
    pipeline stage slices) is allowed: its first reader owns it, and the second
    result maps it to this rank's device where this rank reads it too (a read-only
    copy). Without, and for parameters always, a tensor read on two devices is an error.

    Returns
    -------
    owners : id(tensor) -> (rank, plan device name, torch device)
    copies : id(tensor) -> torch device of this rank's read-only copy

    Raises
    ------
    PlanError
        A parameter (or, without `rank`, a buffer) is read on two devices.
    """
    mine = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    owners: dict[int, Owner] = {}
    copies: dict[int, torch.device] = {}
    first_name: dict[int, str] = {}
    for chunk in chunks:
        owner_rank, device = where(chunk)
        here = (owner_rank, chunk.device, torch.device(device.torch_device))
        gm = chunk.module
        for node in gm.graph.nodes:
            for name in node_params(gm, node):
                tensor = attrgetter(name)(gm)
                if id(tensor) not in mine:
                    continue  # a constant the capture stowed, not the model's
                first_name.setdefault(id(tensor), name)
                seen = owners.setdefault(id(tensor), here)
                if seen[1] == chunk.device:
                    continue
                if rank is None or isinstance(tensor, nn.Parameter):
                    raise PlanError(f"{source} splits parameter {first_name[id(tensor)]!r} across {seen[1]} and "
                                    f"{chunk.device}: nodes that share a parameter must share a device")
                if owner_rank == rank:
                    copies[id(tensor)] = here[2]
    return owners, copies


class RankShare:
    """A model's tensors split over ranks: each parameter and buffer has one owner
    rank; other ranks free its storage unless they keep a read-only copy (a buffer
    several pipeline stages read)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None):
        self.model = model
        self.group = group
        self.rank = dist.get_rank(group)
        self.tensor_owner: dict[int, int] = {}  # id(parameter or buffer) -> owner rank
        self.tensor_device: dict[int, str] = {}  # id(tensor this rank owns) -> plan device name
        # Activation accounting (measurement): per plan device, storage -> bytes saved for backward.
        self.saved: dict[str, dict[int, int]] | None = None

    def _place(self, owners: Mapping[int, Owner], copies: Mapping[int, torch.device], default_device: str) -> None:
        """Move each tensor this rank owns to its device and free the others' storage.

        `owners`: id(tensor) -> (owner rank, plan device name, torch device) for every
        tensor some node reads; rank 0 owns the rest, on `default_device`. `copies`:
        id(tensor) -> device of a read-only copy this rank keeps without owning it.
        Tensors keep their identity (`.data` is replaced), so the model, its traced
        graph and optimizers made later all see the moved ones, and tied parameters
        stay tied."""
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            owner = owners.get(id(tensor))
            self.tensor_owner[id(tensor)] = owner[0] if owner else 0
            if self.tensor_owner[id(tensor)] == self.rank:
                self.tensor_device[id(tensor)] = owner[1] if owner else default_device
        with torch.no_grad():
            for tensor in dict.fromkeys(list(self.model.parameters()) + list(self.model.buffers())):
                key = id(tensor)
                if key in owners and self.tensor_owner[key] == self.rank:
                    tensor.data = tensor.data.to(owners[key][2])
                elif key in copies:
                    tensor.data = tensor.data.to(copies[key])
                elif self.tensor_owner[key] != self.rank:
                    tensor.data = torch.empty(0, dtype=tensor.dtype)  # lives on its owner's rank only

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
        plan device (the local runtime's way of counting)."""
        held: dict[str, int] = {}
        for t in self.owned_tensors():
            state = optimizer.state.get(t, {}) if optimizer is not None else {}
            parts = [t, t.grad] + [v for v in state.values() if isinstance(v, torch.Tensor)]
            device = self.tensor_device[id(t)]
            held[device] = held.get(device, 0) + sum(x.numel() * x.element_size() for x in parts if x is not None)
        return held

    def count_saved(self, device: str) -> AbstractContextManager:
        """Count what autograd saves for backward on `device` (plan name) while `saved` is
        a dict (measurement's warm-up), parameters and buffers excluded."""
        if self.saved is None:
            return count_saved(None, set())
        own = {t.untyped_storage().data_ptr() for t in self.owned_tensors()}
        return count_saved(self.saved.setdefault(device, {}), own)

    def saved_bytes(self) -> dict[str, int]:
        """Bytes saved for backward per plan device, each storage once, over the counted steps."""
        return {device: sum(record.values()) for device, record in (self.saved or {}).items()}

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The entries of the model's state_dict that this rank owns (on the host)."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(self.model.named_buffers(remove_duplicate=False))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()
                if k in named and self.tensor_owner.get(id(named[k])) == self.rank}

    def global_rank(self, rank: int) -> int:
        """A rank of the model's group in the default group (what point-to-point
        operations take, whatever their group)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)
