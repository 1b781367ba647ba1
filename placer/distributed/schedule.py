"""The static schedule of a plan run over torch.distributed ranks: who runs which
chunk, which values cross ranks, and at which point of the global walk each message
is sent. Pure data and pure functions: nothing here talks to a process group, so the
schedule is tested without processes (tests/test_schedule.py).

[Note: why the global walk cannot deadlock]
Every rank walks the same global schedule, chunk 0..N-1 forward and N-1..0 backward,
and issues each cross-rank message at the same point of that walk on both sides: a
forward value when its producer chunk is reached (`Crossing.produced_at`), its
gradient when the first of its consumers on the receiving rank is reached
(`Crossing.first_use`; in the backward walk, the last of them to run). Sends never
block; a rank blocks only on a receive whose sender sits earlier in the walk, so the
lowest unfinished chunk always has its inputs (fx order makes the chunk graph
acyclic: placer.runtime.chunks). Both sides of every pair of ranks issue their
messages in the same order, which is what NCCL's in-order matching needs; gloo gets
a distinct tag per message besides (`with_meta` numbers them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten

from graphs.devices import Device
from placer.runtime.chunks import Chunk

__all__ = ["TensorMeta", "ValueMeta", "Crossing", "Schedule", "build_schedule", "describe"]


@dataclass(frozen=True)
class TensorMeta:
    """A tensor as the shape pass saw it: what a receiver allocates."""

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
        """Indices of the tensor leaves: the ones sent."""
        return [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, TensorMeta)]

    @property
    def grad_tensors(self) -> list[int]:
        """Indices of the tensor leaves whose gradients flow back."""
        return [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, TensorMeta) and leaf.requires_grad]


def describe(value: Any) -> ValueMeta:
    """The ValueMeta of a value: tensors become TensorMeta, everything else stays a constant.

    Examples
    --------
    >>> describe((torch.zeros(2, 3, requires_grad=True), 4)).leaves
    (TensorMeta(shape=torch.Size([2, 3]), dtype=torch.float32, requires_grad=True), 4)
    """
    flat, spec = tree_flatten(value)
    return ValueMeta(spec, tuple(TensorMeta(x.shape, x.dtype, x.requires_grad) if isinstance(x, torch.Tensor) else x
                                 for x in flat))


@dataclass(frozen=True)
class Crossing:
    """A value that one rank produces and another consumes: sent once per step
    forward (at `produced_at`) and its gradient once backward (at `first_use`)."""

    value: str
    src: int
    dst: int
    produced_at: int  # chunk index of its producer
    first_use: int  # lowest index of its consumers on dst (len(chunks): the loss)
    tag: int = 0  # first gloo tag of its messages; each tensor leaf and phase gets its own (with_meta)


@dataclass(frozen=True)
class Schedule:
    """What every rank knows alike: chunks, their owners, and the crossings."""

    chunks: list[Chunk]
    owner: list[int]  # chunk index -> rank; owner[len(chunks)] is the loss rank
    devices: list[Device]  # chunk index -> the device it runs on
    producer: dict[str, int]  # node -> chunk index
    crossings: list[Crossing]
    meta: dict[str, ValueMeta] = field(default_factory=dict)  # crossing value -> its leaves (with_meta)

    @property
    def loss_index(self) -> int:
        return len(self.chunks)

    @property
    def loss_rank(self) -> int:
        return self.owner[self.loss_index]

    def with_meta(self, meta: dict[str, ValueMeta]) -> Schedule:
        """A new schedule whose crossings carry their values' leaves and their own
        block of gloo tags: one per tensor leaf forward, one per gradient backward."""
        tag, numbered = 0, []
        for c in self.crossings:
            numbered.append(replace(c, tag=tag))
            tag += 2 * len(meta[c.value].leaves)
        return replace(self, crossings=numbered, meta=dict(meta))

    def sent_forward_at(self, k: int) -> list[Crossing]:
        """Crossings whose value is sent when the forward walk reaches chunk k."""
        return self._by_point["produced_at"].get(k, [])

    def sent_backward_at(self, k: int) -> list[Crossing]:
        """Crossings whose gradient is sent when the backward walk reaches chunk k."""
        return self._by_point["first_use"].get(k, [])

    @cached_property
    def _by_point(self) -> dict[str, dict[int, list[Crossing]]]:
        index: dict[str, dict[int, list[Crossing]]] = {"produced_at": {}, "first_use": {}}
        for c in self.crossings:
            for point, at in index.items():
                at.setdefault(getattr(c, point), []).append(c)
        return index


def build_schedule(chunks: list[Chunk], devices: list[Device], output_nodes: list[str]) -> Schedule:
    """Owners and crossings of `chunks`.

    Parameters
    ----------
    chunks : list of Chunk
        The plan's chunks in fx order (placer.runtime.chunks.build_chunks).
    devices : list of Device
        devices[k] is chunk k's device; its `rank` is the chunk's owner.
    output_nodes : list of str
        The nodes the model's output reads; the loss consumes them.

    Returns
    -------
    Schedule
        The loss goes to the owner of the last chunk that produces a model output.
        Crossings are ordered by producer chunk, then by the producer's output
        order, then by destination rank; their tags are 0 until `with_meta`.
    """
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
    crossings = [Crossing(name, owner[producer[name]], dst, producer[name], first_use[(name, dst)])
                 for name, dst in keys]
    return Schedule(chunks=chunks, owner=owner, devices=devices, producer=producer, crossings=crossings)
