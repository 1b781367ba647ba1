"""Which rank owns which device (`rank_cluster`), what one rank holds of a model
placed over ranks, and what a training loop asks of it: its parameters (for its
optimizer), its share of the state_dict (for checkpoints), the bytes it holds (for
measurement). Shared by both distributed frontends, DistributedModel (backend.py)
and PipelinedModel (pipelining.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from graphs.capture import canonical_names
from graphs.devices import Cluster, parse_cluster
from graphs.errors import PlanError
from graphs.trace import Traced
from placer.plan import Plan
from placer.runtime.chunks import Chunk
from placer.runtime.refusals import gradient_hook
from placer.runtime.tensors import graph_reads, place_tensors
from placer.runtime.values import count_saved

__all__ = ["RankShare", "rank_cluster", "chunk_reads", "bind", "check_shapes", "eager_output"]


def rank_cluster(plan: Plan, world_size: int, cluster: Cluster | None = None) -> Cluster:
    """The plan's devices with owners: `cluster` (device i of the plan is device i of
    the cluster), the plan's own `rankR:` names, or else device i on rank i mod world_size.

    Raises
    ------
    PlanError
        The cluster has another number of devices than the plan, or a device has no
        owner among ranks 0..world_size - 1.
    """
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


def bind(traced: Traced, inputs: Sequence[Any]) -> dict[str, Any]:
    """Placeholder name -> value for the call `model(*inputs)`.

    Raises
    ------
    PlanError
        The capture does not cover the call (other shapes or dtypes, say): one line
        saying why, and the fix.
    """
    values = traced.bind(tuple(inputs), {})
    if values is None:
        raise PlanError(f"the plan's capture does not cover this batch ({traced.why_not(tuple(inputs), {})}): give "
                        f"every step a batch like the example batch, its shapes and dtypes")
    return values


def check_shapes(inputs: Sequence[Any], shapes: Sequence[tuple[int, ...]], built: str) -> None:
    """Refuse a batch whose tensors' shapes are not `shapes`, the example batch's, for
    which `built` ("the pipeline") was built: its schedule is static.

    Raises
    ------
    PlanError
        Naming both batches' shapes and the fix.
    """
    here = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    if here != list(shapes):
        raise PlanError(f"batch shapes {here} differ from the example batch's {list(shapes)}: {built} is built for "
                        f"one batch shape; give every step a batch of those shapes (DataLoader(drop_last=True), "
                        f"padding to one length), or build it again with an example batch of these")


def eager_output(traced: Traced, leaves: Sequence[Any], values: Mapping[str, Any]) -> Any:
    """The model's output as eager returns it, from a graph's flat output `leaves`
    (nodes, read from `values`, or constants)."""
    return traced.unflatten([values[leaf.name] if isinstance(leaf, fx.Node) else leaf for leaf in leaves])


def chunk_reads(chunks: Iterable[Chunk]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(plan device name, tensor, node name) for every parameter, buffer or constant each chunk
    reads, chunk by chunk: what placer.runtime.tensors.tensor_readers takes."""
    for chunk in chunks:
        yield from graph_reads(chunk.module, lambda node, device=chunk.device: device)


class RankShare:
    """A model's tensors split over ranks: each parameter and buffer has one owner
    rank; other ranks free its storage unless they keep a read-only copy (a buffer
    several pipeline stages read)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None):
        hooked = gradient_hook(model)
        if hooked:  # the ranks' backward would not run it (new-user trial 10): training another model
            raise PlanError(f"parameter '{hooked}' has a gradient hook, which the distributed and pipelining backends "
                            f"do not run: remove it, or use --backend local")
        self.model = model
        self.group = group
        self.rank = dist.get_rank(group)
        self.tensor_owner: dict[int, int] = {}  # id(parameter or buffer) -> owner rank
        self.tensor_device: dict[int, str] = {}  # id(tensor this rank owns) -> plan device name
        # Activation accounting (measurement): per plan device, storage -> bytes saved for backward.
        self.saved: dict[str, dict[int, int]] | None = None

    def _place(self, readers: Mapping[str, Sequence[str]], owners: Mapping[str, tuple[int, str]],
               default_device: str) -> None:
        """Take this rank's share of the model's tensors.

        `readers`: canonical name -> the plan devices that read it, first reader first
        (placer.runtime.tensors.tensor_readers); a tensor no node reads goes with
        `default_device`. `owners`: plan device name -> (the rank that runs it, its torch
        device there). A tensor belongs to the rank of its first reader. This rank moves
        its tensors to their devices, keeps a read-only copy of a buffer one of its
        devices reads but another rank owns, and frees the storage of the rest
        (placer.runtime.tensors.place_tensors: tensors keep their identity, so the
        model, its traced graph and optimizers made later all see the moved ones, and
        tied parameters stay tied)."""
        names = canonical_names(self.model)
        readers = {**{name: [default_device] for name in names.values()}, **readers}
        place_tensors(self.model, readers,
                      lambda d: torch.device(owners[d][1]) if owners[d][0] == self.rank else None)
        for key, name in names.items():
            device = readers[name][0]
            self.tensor_owner[key] = owners[device][0]
            if self.tensor_owner[key] == self.rank:
                self.tensor_device[key] = device

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
