"""Values between chunks: moving them to a device, receiving them as a chunk's
detached inputs, summing gradients, and counting what autograd saves.

One implementation for the local executor and the distributed backend (the pattern
of torch.distributed.pipelining's `_null_coalesce_accumulate`: a value's gradient is
the sum over its consumers, where a consumer that sent none counts as zero).

[Note: moving]
A tensor crossing to a CUDA device is copied with non_blocking=True on the
consumer's stream after that stream waits on the producer's event (host tensors are
pinned first, so the copy is asynchronous). To the host, the producer's event is
synchronized first. Virtual CPU devices share memory: nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from placer.runtime.worker import NOTHING

__all__ = ["move", "receive", "add_grads", "count_saved", "SavedBytes", "map_tensors", "run_backward"]


def move(x: torch.Tensor, device: torch.device, event: torch.cuda.Event | None = None,
         stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """`x` on `device`, ready to use on `stream` (None: the host or the current
    stream). `event` marks when the producer finished writing `x` (None: it was
    ready when handed over)."""
    if x.device == device:
        return x
    if device.type == "cuda":
        stream = stream if stream is not None else torch.cuda.current_stream(device)
        if event is not None:
            stream.wait_event(event)
        if x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        with torch.cuda.stream(stream):
            return x.to(device, non_blocking=True)
    if event is not None:
        event.synchronize()
    return x.to(device)


def receive(value: Any, device: torch.device, *, detach: bool, copy: bool, event: torch.cuda.Event | None = None,
            stream: torch.cuda.Stream | None = None) -> tuple[Any, list[torch.Tensor | None]]:
    """A value as a consuming chunk sees it: on `device` and, with `detach`, detached
    from the producer's autograd graph, as a fresh leaf where gradients must flow back.
    With `copy` (the chunk changes it in place), tensors are cloned.

    Returns the value and, per pytree leaf of it, the leaf tensor whose .grad is the
    gradient to send back (None where none flows)."""
    if isinstance(value, torch.Tensor):  # the common case, without pytree
        here, leaf = _receive_tensor(value, device, detach, copy, event, stream)
        return here, [leaf]
    flat, spec = tree_flatten(value)
    args, leaves = [], []
    for x in flat:
        leaf = None
        if isinstance(x, torch.Tensor):
            x, leaf = _receive_tensor(x, device, detach, copy, event, stream)
        args.append(x)
        leaves.append(leaf)
    return tree_unflatten(args, spec), leaves


def _receive_tensor(x: torch.Tensor, device: torch.device, detach: bool, copy: bool, event, stream):
    leaf = None
    here = x.detach() if detach else x
    if here.device != device:
        here = move(here, device, event, stream)
    if detach and x.requires_grad:
        leaf = here.requires_grad_()
    return (here.clone() if copy else here), leaf


def add_grads(total: list | None, grads: list, device: torch.device | None = None,
              event: torch.cuda.Event | None = None, stream: torch.cuda.Stream | None = None) -> list:
    """Elementwise sum of two gradient lists (None: no gradient), moving `grads` to
    `device` first (None: leave them where they are)."""
    if device is not None:
        grads = [None if g is None else move(g, device, event, stream) for g in grads]  # a new list
    elif total is None:
        grads = list(grads)
    if total is None:
        return grads
    return [a if b is None else b if a is None else a + b for a, b in zip(total, grads)]


def run_backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """torch.autograd.backward(tensors, grads) for a chunk: the engine called directly,
    without autograd.backward's argument checks (the runtime made the gradients
    itself: one per tensor, same shape). About a fifth of a small chunk's backward
    call on a CPU; falls back to the public call where the engine is not reachable."""
    if _ENGINE is None:
        torch.autograd.backward(tensors, grads)
    else:
        _ENGINE.run_backward(tuple(tensors), tuple(grads), False, False, (), True, True)


_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def count_saved(record: dict[int, int] | None, excluded: set[int]) -> ContextManager:
    """A context in which autograd's saved tensors are noted in `record` (storage
    pointer -> bytes; each storage once), except storages in `excluded` (parameters
    and buffers, which are not activations). `record` None: count nothing."""
    if record is None:
        return NOTHING

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            record[ptr] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, _identity)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SavedBytes:
    """Activations saved for backward, live and at their peak, per device: a chunk's
    storages (`count_saved`'s record) are held from its forward to its backward, each
    storage counted once however many chunks hold it."""

    def __init__(self, devices: list[str]):
        self.live = {d: 0 for d in devices}
        self.peak = {d: 0 for d in devices}
        self._refs: dict[str, dict[int, int]] = {d: {} for d in devices}

    def hold(self, device: str, saved: dict[int, int]) -> None:
        refs = self._refs[device]
        for ptr, nbytes in saved.items():
            if refs.get(ptr, 0) == 0:
                self.live[device] += nbytes
            refs[ptr] = refs.get(ptr, 0) + 1
        self.peak[device] = max(self.peak[device], self.live[device])

    def release(self, device: str, saved: dict[int, int]) -> None:
        refs = self._refs[device]
        for ptr, nbytes in saved.items():
            refs[ptr] -= 1
            if refs[ptr] == 0:
                del refs[ptr]
                self.live[device] -= nbytes
        saved.clear()


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`value` with `fn` applied to every tensor in it (pytree leaves)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    flat, spec = tree_flatten(value)
    return tree_unflatten([fn(x) if isinstance(x, torch.Tensor) else x for x in flat], spec)
