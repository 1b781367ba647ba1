"""Run chunks on per-device workers, forward and backward, concurrently across devices.

Forward: every device's worker runs its chunks in chunk (fx) order; a chunk starts
when its inputs are ready. Each chunk sees its inputs *detached* (requiring grad
where the value does), so it records its own small autograd graph on its own device.

Backward: the CPU autograd engine would run a whole backward pass on the thread that
called it, one op after another. So the placed graph is one autograd Function
(`PlacedGraph`) whose backward replays the chunks in reverse order on their device
workers: each calls torch.autograd.backward on its outputs with the gradients its
consumers sent back, and sends its inputs' gradients on upstream. Parameters are
leaves of the chunk graphs, so their .grad accumulates as usual.

The calling thread is itself the worker of one CPU device whose thread count it
already has (a lone `cpu:0`, typically): no hand-off, and no second OpenMP team
competing for the same cores. When autograd calls PlacedGraph.backward on a CUDA
device's thread, that device's chunks run there instead (see Executor.backward).

Transfers: tensors crossing devices move with .to(device, non_blocking=True) after
the consumer's stream waits on the producer's CUDA event (host tensors are pinned
first). Virtual CPU devices share memory: nothing is copied between them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.devices import Device
from placer.runtime.chunks import Chunk


@dataclass(frozen=True)
class ChunkEvent:
    """One chunk's run in the debug timeline (time.perf_counter seconds)."""

    chunk: int
    device: str
    phase: str  # "forward" or "backward"
    thread: str  # the thread that ran it: its device's worker, or the caller's
    start: float
    end: float


class Worker:
    """A daemon thread that runs one device's work in submission order.

    CPU workers set their own intra-op thread count (per thread in torch), so virtual
    CPU devices each get their share of cores; CUDA workers run on their own stream."""

    def __init__(self, device: Device):
        self.device = device
        self.torch_device = torch.device(device.torch_device)
        self.stream = torch.cuda.Stream(self.torch_device) if device.kind == "cuda" else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"placer-{device.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        if self.device.kind == "cpu":
            torch.set_num_threads(self.device.threads)
        else:
            torch.cuda.set_device(self.torch_device)
        while (item := self._queue.get()) is not None:
            fn, future = item
            run(fn, future)

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    def context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def record_event(self) -> torch.cuda.Event | None:
        """A CUDA event after the work queued so far on this worker's stream."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def close(self) -> None:
        """Stop the thread and wait for it: a thread still exiting while the interpreter
        shuts down can abort the process from torch's thread-local destructors."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def run(fn: Callable, future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to whoever waits on the future, raised there as itself
        future.set_exception(exc)


def move(x: torch.Tensor, event: torch.cuda.Event | None, device: torch.device,
         stream: torch.cuda.Stream | None) -> torch.Tensor:
    """`x` on `device`, ready to use on `stream` (None: the host). `event` marks when
    the producer finished writing `x` (None: it was ready when handed over)."""
    if x.device == device:
        return x
    if device.type == "cuda":
        if event is not None:
            stream.wait_event(event)
        if x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        with torch.cuda.stream(stream):
            return x.to(device, non_blocking=True)
    if event is not None:
        event.synchronize()
    return x.to(device)


@dataclass
class Produced:
    """What a chunk hands on: forward values (node -> value) or backward gradients
    (input node -> list of gradients, one per tensor leaf of the value)."""

    values: dict
    event: torch.cuda.Event | None


@dataclass
class ChunkState:
    """What one chunk keeps between its forward and its backward in one step."""

    inputs: list[list[torch.Tensor | None]]  # per input: its grad-requiring leaves (None elsewhere)
    saved: dict[int, int] = field(default_factory=dict)  # storage pointer -> bytes saved for backward


@dataclass
class StepState:
    chunks: dict[int, ChunkState]
    outputs: dict[int, Produced]  # chunk index -> its forward outputs
    input_devices: dict[str, torch.device]  # model input -> where its gradient goes


class Executor:
    """The schedule of a placed model's chunks over its devices' workers."""

    def __init__(self, chunks: list[Chunk], devices: dict[str, Device]):
        self.chunks = chunks
        used = {c.device for c in chunks}
        self.workers = {name: Worker(d) for name, d in devices.items() if name in used}  # in cluster order
        self.producer = {node: c.index for c in chunks for node in c.outputs}
        self.consumers: dict[str, list[int]] = {}
        for c in chunks:
            for name in c.inputs:
                self.consumers.setdefault(name, []).append(c.index)
        # Debug timeline: set to a list to record a ChunkEvent per chunk run.
        self.timeline: list[ChunkEvent] | None = None
        # Activation accounting (measure.py): bytes saved for backward, live and peak, per device.
        self.count_activations = False
        self.excluded_storages: set[int] = set()  # parameters and buffers: not activations
        self.live_bytes = {name: 0 for name in self.workers}
        self.peak_bytes = {name: 0 for name in self.workers}
        self._live_refs: dict[str, dict[int, int]] = {name: {} for name in self.workers}
        self._anchor = torch.empty(0, requires_grad=True)  # makes outputs require grad (PlacedGraph)

    # -- forward -------------------------------------------------------------

    def run(self, inputs: dict, output_nodes: list[str], out_device: torch.device, grad: bool) -> dict:
        """One forward call of the placed model: the value of each of `output_nodes`
        (node or placeholder name -> value), on `out_device`. `inputs`: placeholder name
        -> value. With `grad`, the values are attached to autograd through one
        PlacedGraph node, whose backward runs the chunks' backward on their workers."""
        if grad and not self.runs_whole_on_caller():
            tensor_inputs = [name for name, v in inputs.items() if isinstance(v, torch.Tensor)]
            call = Call(self, inputs, tensor_inputs, output_nodes, out_device)
            outs = PlacedGraph.apply(call, self._anchor, *(inputs[n] for n in tensor_inputs))
            tensors = dict(zip(call.refs, outs))
            return {name: tree_unflatten([tensors.get((name, i), x) for i, x in enumerate(flat)], spec)
                    for name, (flat, spec) in call.structure.items()}
        values, _ = self.forward(inputs, grad=grad, attached=True)
        values = {**inputs, **values}
        stream = torch.cuda.current_stream(out_device) if out_device.type == "cuda" else None
        return {name: _map_tensors(lambda t: move(t, None, out_device, stream), values[name]) for name in output_nodes}

    def runs_whole_on_caller(self) -> bool:
        """Whether every chunk runs on the calling thread (one device, see
        _caller_device). Then nothing could run concurrently, and plain autograd can
        take the backward pass: chunks are called attached, with no PlacedGraph
        around them (no overhead). Not while counting activations, which needs
        the per-chunk backward."""
        return len(self.workers) == 1 and self._caller_device() is not None and not self.count_activations

    def forward(self, inputs: dict, grad: bool, attached: bool = False) -> tuple[dict, StepState]:
        """Run every chunk. `inputs`: placeholder name -> value. Returns the values of
        every chunk output (node -> value, on its device) and the state backward needs.
        `attached`: hand values between chunks as they are, so that autograd links the
        chunks itself (only when runs_whole_on_caller), instead of detached per chunk."""
        self._streams_wait_for_caller()
        state = StepState(chunks={}, outputs={}, input_devices={
            name: v.device for name, v in inputs.items() if isinstance(v, torch.Tensor)})
        futures: dict[int, Future] = {}
        self._schedule(self.chunks, lambda chunk: self._forward_chunk(chunk, inputs, futures, state, grad, attached),
                       futures, self._caller_device())
        state.outputs = {k: f.result() for k, f in futures.items()}
        self._caller_waits_for_streams()
        values = {}
        for produced in state.outputs.values():
            values.update(produced.values)
        return values, state

    def _forward_chunk(self, chunk: Chunk, inputs: dict, futures: dict[int, Future], state: StepState,
                       grad: bool, attached: bool) -> Produced:
        worker = self.workers[chunk.device]
        args, leaves = [], []
        with torch.set_grad_enabled(grad):  # per thread; a caller inside PlacedGraph.forward has it off
            for name in chunk.inputs:
                if name in self.producer:
                    produced = futures[self.producer[name]].result()
                    value, event = produced.values[name], produced.event
                else:
                    value, event = inputs[name], None
                arg, grad_leaves = self._receive(value, event, worker, grad and not attached,
                                                 copy=name in chunk.mutated_inputs)
                args.append(arg)
                leaves.append(grad_leaves)
            chunk_state = ChunkState(inputs=leaves)
            start = time.perf_counter()
            with worker.context(), self._saved_tensor_counter(chunk_state, grad and not attached):
                outs = chunk.module(*args)
        event = worker.record_event()
        self._record(chunk, "forward", start)
        if grad and not attached:
            state.chunks[chunk.index] = chunk_state
            self._hold(chunk.device, chunk_state)
        return Produced(values=dict(zip(chunk.outputs, outs)), event=event)

    def _receive(self, value, event, worker: Worker, detach: bool, copy: bool):
        """A value as the consuming chunk sees it: on its device and, with `detach`,
        detached from the producer's graph, a fresh leaf where gradients must flow back."""
        flat, spec = tree_flatten(value)
        args, grad_leaves = [], []
        for x in flat:
            leaf = None
            if isinstance(x, torch.Tensor):
                x_here = move(x.detach() if detach else x, event, worker.torch_device, worker.stream)
                if detach and x.requires_grad:
                    leaf = x_here.requires_grad_()
                x = x_here.clone() if copy else x_here
            args.append(x)
            grad_leaves.append(leaf)
        return tree_unflatten(args, spec), grad_leaves

    def _saved_tensor_counter(self, chunk_state: ChunkState, grad: bool):
        if not (grad and self.count_activations):
            return nullcontext()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.excluded_storages:
                chunk_state.saved[ptr] = storage.nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _hold(self, device: str, chunk_state: ChunkState) -> None:
        """Count a chunk's saved tensors as live on its device (each storage once)."""
        refs = self._live_refs[device]
        for ptr, nbytes in chunk_state.saved.items():
            if refs.get(ptr, 0) == 0:
                self.live_bytes[device] += nbytes
            refs[ptr] = refs.get(ptr, 0) + 1
        self.peak_bytes[device] = max(self.peak_bytes[device], self.live_bytes[device])

    def _release(self, device: str, chunk_state: ChunkState) -> None:
        refs = self._live_refs[device]
        for ptr, nbytes in chunk_state.saved.items():
            refs[ptr] -= 1
            if refs[ptr] == 0:
                del refs[ptr]
                self.live_bytes[device] -= nbytes
        chunk_state.saved.clear()

    # -- backward ------------------------------------------------------------

    def backward(self, state: StepState, output_grads: dict[str, list],
                 engine_device: torch.device | None = None) -> dict[str, list]:
        """Run every chunk's backward in reverse order on its device's worker (or the
        caller, as in forward).

        `output_grads`: node -> gradient per tensor leaf of its value (None: none) for
        the values the model returned. Returns, for each model input, its gradients in
        the same form (summed over its consumers, on the input's own device).

        `engine_device`: the CUDA device whose autograd thread is calling, if any. Its
        chunks must run on this thread: a worker's backward on that device would queue
        behind this very call and never run.
        """
        self._streams_wait_for_caller()
        futures: dict[int, Future] = {}
        on_engine = [name for name, w in self.workers.items() if w.torch_device == engine_device]
        self._schedule(list(reversed(self.chunks)), lambda chunk: self._backward_chunk(chunk, state, output_grads, futures),
                       futures, on_engine[0] if on_engine else self._caller_device())
        self._caller_waits_for_streams()
        input_grads: dict[str, list] = {}
        for chunk in self.chunks:
            produced = futures[chunk.index].result()
            for name, grads in produced.values.items():
                if name in state.input_devices:
                    device = state.input_devices[name]
                    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
                    input_grads[name] = _add(input_grads.get(name), grads, produced.event, device, stream)
        return input_grads

    def _backward_chunk(self, chunk: Chunk, state: StepState, output_grads: dict[str, list],
                        futures: dict[int, Future]) -> Produced:
        worker = self.workers[chunk.device]
        chunk_state = state.chunks.get(chunk.index)
        if chunk_state is None:  # ran without grad (nothing it computed needs one)
            return Produced(values={}, event=None)
        outs = state.outputs[chunk.index].values
        tensors, grads = [], []
        for name in chunk.outputs:
            total = output_grads.get(name)
            if total is not None:
                total = [None if g is None else move(g, None, worker.torch_device, worker.stream) for g in total]
            for consumer in self.consumers.get(name, []):
                produced = futures[consumer].result()
                if name in produced.values:
                    total = _add(total, produced.values[name], produced.event, worker.torch_device, worker.stream)
            if total is None:
                continue
            for t, g in zip(tree_flatten(outs[name])[0], total):
                if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                    tensors.append(t)
                    grads.append(g)
        start = time.perf_counter()
        with worker.context():
            if tensors:
                torch.autograd.backward(tensors, grads)
            sent = {name: [None if leaf is None else leaf.grad for leaf in leaves]
                    for name, leaves in zip(chunk.inputs, chunk_state.inputs)}
        event = worker.record_event()
        self._record(chunk, "backward", start)
        self._release(chunk.device, chunk_state)
        return Produced(values={k: v for k, v in sent.items() if any(g is not None for g in v)}, event=event)

    # -- plumbing ------------------------------------------------------------

    def _schedule(self, chunks: list[Chunk], task: Callable[[Chunk], Produced], futures: dict[int, Future],
                  inline: str | None) -> None:
        """Run `task` for each chunk, in this order per device, and wait for all. The
        chunks of device `inline` run on the calling thread, after the others are queued."""
        here = []
        for chunk in chunks:
            fn = (lambda chunk=chunk: task(chunk))
            if chunk.device == inline:
                futures[chunk.index] = Future()
                here.append((fn, futures[chunk.index]))
            else:
                futures[chunk.index] = self.workers[chunk.device].submit(fn)
        for fn, future in here:
            run(fn, future)
        self._wait(futures, [c.index for c in chunks])

    def _caller_device(self) -> str | None:
        """A CPU device whose chunks the calling thread runs itself, saving the hand-off
        to a worker: one whose thread count the caller already has (a lone `cpu` or
        `cpu:0`, typically). Its OpenMP team is then the caller's own, rather than a
        second team that competes with it for the same cores."""
        threads = torch.get_num_threads()
        return next((name for name, w in self.workers.items() if w.device.kind == "cpu" and w.device.threads == threads),
                    None)

    def _wait(self, futures: dict[int, Future], order: list[int]) -> None:
        """Wait for every task; re-raise the first failure in schedule order (tasks that
        depend on a failed one fail with the same exception, so this is the root)."""
        for k in order:
            futures[k].exception()
        for k in order:
            exc = futures[k].exception()
            if exc is not None:
                raise exc

    def _record(self, chunk: Chunk, phase: str, start: float) -> None:
        if self.timeline is not None:
            self.timeline.append(ChunkEvent(chunk.index, chunk.device, phase, threading.current_thread().name,
                                            start, time.perf_counter()))

    def _streams_wait_for_caller(self) -> None:
        """Worker streams see everything the caller queued before (inputs, optimizer step)."""
        for w in self.workers.values():
            if w.stream is not None:
                w.stream.wait_stream(torch.cuda.current_stream(w.torch_device))

    def _caller_waits_for_streams(self) -> None:
        for w in self.workers.values():
            if w.stream is not None:
                torch.cuda.current_stream(w.torch_device).wait_stream(w.stream)

    def close(self) -> None:
        for w in self.workers.values():
            w.close()


def _map_tensors(fn, value):
    flat, spec = tree_flatten(value)
    return tree_unflatten([fn(x) if isinstance(x, torch.Tensor) else x for x in flat], spec)


def _add(total: list | None, grads: list, event, device: torch.device, stream) -> list:
    """Elementwise sum of two gradient lists (None: no gradient), moving `grads` to `device`."""
    grads = [None if g is None else move(g, event, device, stream) for g in grads]
    if total is None:
        return list(grads)
    return [a if b is None else b if a is None else a + b for a, b in zip(total, grads)]


@dataclass
class Call:
    """One forward call of a placed model, as PlacedGraph needs it."""

    executor: Executor
    inputs: dict  # placeholder name -> value
    tensor_inputs: list[str]  # placeholders whose values are tensors, in PlacedGraph's argument order
    output_nodes: list[str]  # the nodes (or placeholders) the model's output reads
    out_device: torch.device  # where outputs are returned (the inputs' device, like accelerate)
    # Filled in by PlacedGraph.forward: each output node's value as (leaves, spec), and
    # which leaves are the tensors PlacedGraph returns, in order.
    structure: dict = field(default_factory=dict)
    refs: list[tuple[str, int]] = field(default_factory=list)


class PlacedGraph(torch.autograd.Function):
    """The whole placed graph as one autograd node whose backward runs the chunks'
    backward concurrently on their workers (see the module doc)."""

    @staticmethod
    def forward(ctx, call: Call, anchor: torch.Tensor, *tensor_inputs: torch.Tensor):
        ctx.set_materialize_grads(False)  # outputs the loss ignores cost no backward work
        values, state = call.executor.forward(call.inputs, grad=True)
        values = {**call.inputs, **values}
        ctx.call, ctx.state = call, state
        stream = torch.cuda.current_stream(call.out_device) if call.out_device.type == "cuda" else None
        outs, constant = [], []
        for name in call.output_nodes:
            flat, spec = tree_flatten(values[name])
            call.structure[name] = (flat, spec)
            for i, t in enumerate(flat):
                if isinstance(t, torch.Tensor):
                    out = move(t, None, call.out_device, stream).detach()
                    call.refs.append((name, i))
                    outs.append(out)
                    if not t.requires_grad:
                        constant.append(out)
        ctx.mark_non_differentiable(*constant)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        call, state = ctx.call, ctx.state
        ctx.state = None  # free the chunk graphs' bookkeeping once used
        output_grads: dict[str, list] = {}
        for (name, i), g in zip(call.refs, grads):
            if g is not None:
                slot = output_grads.setdefault(name, [None] * len(call.structure[name][0]))
                slot[i] = g if slot[i] is None else slot[i] + g
        cuda = [g.device for g in grads if g is not None and g.device.type == "cuda"]
        input_grads = call.executor.backward(state, output_grads, engine_device=cuda[0] if cuda else None)
        result = []
        for name in call.tensor_inputs:
            direct = output_grads.get(name, [None])[0]  # the model returned this input itself
            g = (input_grads.get(name) or [None])[0]
            result.append(direct if g is None else g if direct is None else g + direct)
        return (None, None, *result)
