"""Run a placed model's chunks on per-device workers, forward and backward, as dataflow.

Forward: each chunk runs once the chunks it waits for are done (dataflow.Pass), on
its device's worker. It sees its inputs *detached* (requiring grad where the value
does), so it records its own small autograd graph on its own device.

Backward: the CPU autograd engine would run a whole backward pass on the thread that
called it, one op after another. So the placed graph is one autograd Function
(`PlacedGraph`) whose backward runs every chunk's backward as dataflow in reverse:
each calls torch.autograd.backward on its outputs with the gradients its consumers
sent back, and sends its inputs' gradients on. Parameters are leaves of the chunk
graphs, so their .grad accumulates as usual.

Micro-batches (m > 1, GPipe): the forward runs every micro-batch, the outputs are
gathered into one batch, and the backward runs every micro-batch's backward
(microbatch.py says what is refused and why the gradients are the full batch's).

The calling thread is itself the worker of one CPU device whose thread count it
has: no hand-off, no second OpenMP team competing for the same cores. Building an
executor gives the caller its CPU devices' count (worker.caller_threads), the one a
plan is measured with (placer.runtime.timing). When autograd calls
PlacedGraph.backward on a CUDA device's thread, that device's chunks run there.

Grad mode and autocast are per thread: each chunk's forward runs with the caller's
(`torch.autocast` around a placed forward reaches every worker; worker.Autocast).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from functools import partial

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.devices import Device
from graphs.errors import ExecutionError, PlanError
from placer.runtime import microbatch
from placer.runtime.chunks import Chunk, buffer_turns, build_chunks
from placer.runtime.dataflow import Pass, task_keys
from placer.runtime.placed_graph import Call, PlacedGraph
from placer.runtime.refusals import capture_refusal, checked_layout
from placer.runtime.step_state import ChunkEvent, ChunkState, StepState, record_run
from placer.runtime.values import SavedBytes, add_grads, count_saved, map_tensors, move, receive, run_backward
from placer.runtime.worker import (NOTHING, Autocast, CallerPin, Worker, caller_threads, core_shares, grad_mode,
                                   own_threads)

__all__ = ["Executor", "ChunkEvent", "ExecutionError"]


class Executor:
    """The schedule of a placed model's chunks over its devices' workers.

    Options: `microbatches` (GPipe, m >= 1), `batch_dims` (placeholder -> the dimension
    its batch is split along; default 0), `input_names` (placeholder -> the forward input
    it holds, as messages name inputs), `microbatch_statistics` (accept batch statistics
    per micro-batch instead of refusing), `pin` (pin virtual CPU workers to their cores;
    off by default: unpinned workers cross cheaper, experiments/bench_pinning.py),
    `timeout_s` (limit on one pass, checked by the caller between its tasks: a chunk
    hanging on its own thread is not cut; None: as long as workers live)."""

    def __init__(self, chunks: list[Chunk], devices: Mapping[str, Device], *, microbatches: int = 1,
                 batch_dims: Mapping[str, int | None] | None = None, input_names: Mapping[str, str] | None = None,
                 microbatch_statistics: bool = False, pin: bool = False, timeout_s: float | None = None,
                 source: str = "plan", refusal: str | None = None, marked: Collection[str] = ()):
        if microbatches < 1:
            raise PlanError(f"{source}: microbatches must be at least 1, got {microbatches}")
        self.chunks, self.devices, self.microbatches = chunks, dict(devices), microbatches
        self.batch_dims, self.input_names = dict(batch_dims or {}), dict(input_names or {})
        self.microbatch_statistics, self.pin, self.timeout_s, self.source = microbatch_statistics, pin, timeout_s, source
        self.refusal = refusal  # refusals.capture_refusal: raised at the first micro-batched call, not before
        self.marked = frozenset(marked)  # placeholders the plan's batch_dims mark None, as refusals tell them
        self.producer = {node: c.index for c in chunks for node in c.outputs}
        self.consumers: dict[str, list[int]] = {}
        for c in chunks:
            for name in c.inputs:
                self.consumers.setdefault(name, []).append(c.index)
        # Per chunk, made once rather than per task: each input's (name, producing chunk
        # or None for a model input, whether the chunk changes it in place).
        self._sources = [[(n, self.producer.get(n), n in c.mutated_inputs) for n in c.inputs] for c in chunks]
        wakes = [[] for _ in chunks]
        for c in chunks:
            for a in c.after:
                wakes[a].append(c.index)
        self._rank = {False: [c.forward_rank for c in chunks], True: [c.backward_rank for c in chunks]}
        self._task_keys: dict[tuple[int, bool], list[int]] = {}
        forward, backward = self._rank[False].__getitem__, self._rank[True].__getitem__
        self._waits = [c.after for c in chunks]
        self._after = [sorted(c.after, key=backward) for c in chunks]  # backward wake order
        self._wakes = [sorted(w, key=forward) for w in wakes]
        self._first = sorted((c.index for c in chunks if not c.after), key=forward)
        self._turns = buffer_turns(chunks) if microbatches > 1 else None  # micro-batches take buffers in turn
        self._last = sorted((c.index for c in chunks if not wakes[c.index]), key=backward)
        self._layouts: dict[tuple, microbatch.Layout] = {}
        self._whole = len(chunks) == 1 and microbatches == 1  # the whole model, one pass (runs_whole_on_caller)
        self.timeline: list[ChunkEvent] | None = None  # debug: set to a list to record a ChunkEvent per chunk run
        # Activation accounting (timing.py): bytes saved for backward, live and peak, per device.
        self.count_activations = False
        self.excluded_storages: set[int] = set()  # parameters and buffers: not activations
        self.closed = False
        self._start(caller_threads(self.devices.values()))

    @classmethod
    def build(cls, model: nn.Module, gm: fx.GraphModule, assignment: dict[str, str], devices: Mapping[str, Device], *,
              groups: Sequence[Sequence[str]] | None = None, microbatches: int = 1, schedule: str | None = None,
              batch_dims: Mapping[str, int | None] | None = None, input_names: Mapping[str, str] | None = None,
              microbatch_statistics: bool = False, source: str = "plan", marked: Collection[str] = ()) -> Executor:
        """The executor of `gm` (traced from `model`) placed by `assignment` on
        `devices`, chunked over the plan's `groups` (chunks.py).

        Parameters
        ----------
        model, gm : the module the graph's targets live on, and the graph's module
            (the runtime passes the capture's GraphModule as both).
        assignment : node name -> device name, every node but placeholders and output.
        devices : device name -> Device.
        groups : the plan's groups (member node names), the partition's atoms where
            they serve; None: single nodes.
        microbatches, schedule : GPipe micro-batches per call (schedule None or "gpipe").
        batch_dims : placeholder -> the dimension its batch is split along (default 0; None: never);
            `marked`: those the plan's batch_dims (not its example batch) mark None.
        input_names : placeholder -> the forward input it holds, as messages name inputs.
        microbatch_statistics : accept batch statistics per micro-batch instead of refusing.
        source : how error messages name the plan.

        Raises
        ------
        PlanError : a schedule other than GPipe, or a gradient hook; what else micro-batches would
            change in the capture's mode is refused at its first micro-batched call (refusals.capture_refusal).
        """
        if microbatches > 1 and schedule not in (None, "gpipe"):
            raise PlanError(f"{source}: schedule {schedule!r} runs only on the pipelining backend "
                            f"(placer train --backend pipelining); placer.apply runs 'gpipe'")
        chunks = build_chunks(model, gm.graph, assignment, groups=groups, extra_roots=(gm,))
        refusal = capture_refusal(gm.graph, model, source, microbatch_statistics, (gm,)) if microbatches > 1 else None
        return cls(chunks, devices, microbatches=microbatches, batch_dims=batch_dims, input_names=input_names,
                   microbatch_statistics=microbatch_statistics, source=source, refusal=refusal, marked=marked)

    def _start(self, caller: int | None) -> None:  # then the caller has `caller` threads (None: its own)
        own = torch.get_num_threads()  # copied before the workers set the process-wide count (worker.py)
        used = {c.device for c in self.chunks}
        shares = core_shares(list(self.devices.values())) if self.pin else {}
        self.workers = {name: Worker(d, shares.get(name, ())) for name, d in self.devices.items() if name in used}
        own_threads(caller or own)
        self._chunk_workers = [self.workers[c.device] for c in self.chunks]
        self._host_only = all(w.stream is None for w in self.workers.values())
        # Per chunk and output: (its consumers, each with whether its gradients arrive on
        # this chunk's torch device, so that they are used as they are).
        self._sinks = [[tuple((k, self._chunk_workers[k].torch_device == self._chunk_workers[c.index].torch_device)
                              for k in self.consumers.get(name, ())) for name in c.outputs] for c in self.chunks]
        self._device_types = tuple({"cpu", *(w.torch_device.type for w in self.workers.values())})
        self._saved = SavedBytes(list(self.workers))
        self._anchor = torch.empty(0, requires_grad=True)  # makes outputs require grad (PlacedGraph)
        self._pin = CallerPin()  # the caller's thread, while it serves a device

    @property
    def live_bytes(self) -> dict[str, int]:
        """Activations saved for backward now, per device (while counting)."""
        return self._saved.live

    @property
    def peak_bytes(self) -> dict[str, int]:
        """The peak of live_bytes, per device, since the executor was built."""
        return self._saved.peak

    def __getstate__(self) -> dict:
        """Pickled without its threads; unpickling starts new workers."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("workers", "_chunk_workers", "_device_types", "_saved", "_anchor", "_pin",
                              "_host_only", "_sinks")}
        state["_layouts"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start(caller_threads(self.devices.values()))

    # -- forward -------------------------------------------------------------

    def run(self, inputs: dict, output_nodes: list[str], out_device: torch.device, grad: bool) -> dict:
        """One forward call of the placed model: the value of each of `output_nodes`
        (node or placeholder name -> value), on `out_device`. `inputs`: placeholder name
        -> value. With `grad`, the values are attached to autograd through one
        PlacedGraph node, whose backward runs the chunks' backward on their workers.

        Raises ExecutionError at once when the executor is closed."""
        self._check_open()
        if self.runs_whole_on_caller():  # one chunk on the caller: a plain call, plain autograd
            chunk = self.chunks[0]
            with NOTHING if grad else grad_mode(False):
                values = dict(zip(chunk.outputs, chunk.module.forward(*[inputs[n] for n in chunk.inputs])))
        elif grad:
            tensor_inputs = [name for name, v in inputs.items() if isinstance(v, torch.Tensor)]
            call = Call(self, inputs, tensor_inputs, output_nodes, out_device)
            outs = PlacedGraph.apply(call, self._anchor, *(inputs[n] for n in tensor_inputs))
            tensors = dict(zip(call.refs, outs))
            return {name: tree_unflatten([tensors.get((name, i), x) for i, x in enumerate(flat)], spec)
                    for name, (flat, spec) in call.structure.items()}
        else:
            values, _ = self.forward(inputs, grad=False, output_nodes=output_nodes)
        return {name: map_tensors(partial(move, device=out_device), values[name] if name in values else inputs[name])
                for name in output_nodes}

    def runs_whole_on_caller(self) -> bool:
        """Whether the model is one chunk that runs on the calling thread (one device,
        see _caller_device), without micro-batches: `run` then calls it directly, and
        plain autograd takes the backward pass, with no PlacedGraph around it (no
        overhead). Not while counting activations, which needs the per-chunk backward,
        nor while a debug timeline records."""
        return (self._whole and not self.count_activations and self.timeline is None
                and self._caller_device() == self.chunks[0].device)

    def forward(self, inputs: dict, grad: bool, output_nodes: Sequence[str] | None = None) -> tuple[dict, StepState]:
        """Run every chunk for every micro-batch. `inputs`: placeholder name -> value.
        Returns the values of `output_nodes` (default: every chunk output), gathered
        over micro-batches, on their devices, and the state backward needs."""
        self._check_open()
        split = (microbatch.split(inputs, self.microbatches, self.batch_dims, self.input_names) if self.microbatches > 1
                 else microbatch.Split([inputs], [0], {}))
        micro = len(split.inputs)
        names = list(output_nodes) if output_nodes is not None else list(self.producer)
        state = StepState(split=split, grad=grad, values=[{} for _ in range(micro)], events=[{} for _ in range(micro)],
                          autocast=Autocast.of_caller(self._device_types))
        state.plain = self._host_only and state.autocast is None and not (grad and self.count_activations)
        if micro > 1:
            state.output_dims = self._layout(inputs, split, names).output_dims
        self._streams_wait_for_caller()
        inline = self._caller_device()
        run = Pass(self._waits, self._wakes, self._first, self._keys(micro, False), micro, False, self._chunk_workers,
                   self.workers.get(inline), partial(self._forward_task, state), self._turns)
        self._pin.hold(self.workers[inline].cores if inline is not None else ())
        try:
            with grad_mode(grad):  # once for the caller's tasks (inside PlacedGraph.forward it is off)
                run.execute(list(self.workers.values()), self.timeout_s)
        except BaseException:
            self._pin.release()
            raise
        if not grad:
            self._pin.release()  # a training step keeps it until its backward is done
        self._caller_waits_for_streams()
        produced = [n for n in names if n in self.producer]
        if micro == 1:
            return {n: state.values[0][n] for n in produced}, state
        with torch.set_grad_enabled(grad):  # so that gathered outputs require grad as their pieces do
            return {n: microbatch.gather([v[n] for v in state.values], state.output_dims[n]) for n in produced}, state

    def _forward_task(self, state: StepState, worker: Worker, i: int, c: int) -> None:
        chunk = self.chunks[c]
        grad = state.grad
        saved = {} if grad and self.count_activations else None
        timeline = self.timeline
        start = time.perf_counter() if timeline is not None else 0.0
        if state.plain and torch.is_grad_enabled() == grad:  # the common case: no context to enter
            outs, leaves = self._forward_chunk(state, worker, i, c)
        else:  # grad mode per thread; the worker's CUDA stream; the caller's autocast; counting
            with grad_mode(grad), worker.context(), Autocast.enter(state.autocast), \
                    count_saved(saved, self.excluded_storages):
                outs, leaves = self._forward_chunk(state, worker, i, c)
        state.values[i].update(zip(chunk.outputs, outs))
        if worker.stream is not None:
            state.events[i][c] = worker.record_event()
        if timeline is not None:
            record_run(timeline, chunk, "forward", start, i)
        if grad:
            state.chunks[i, c] = ChunkState(inputs=leaves, outs=outs, saved=saved)
            if saved:
                self._saved.hold(chunk.device, saved)

    def _forward_chunk(self, state: StepState, worker: Worker, i: int, c: int) -> tuple[tuple, list]:
        """Chunk c's outputs for micro-batch i from its inputs as it receives them
        (values.receive), and its inputs' grad-requiring leaves as ChunkState keeps them."""
        device, stream, grad = worker.torch_device, worker.stream, state.grad
        values, events, inputs = state.values[i], state.events[i], state.split.inputs[i]
        args, leaves = [], []
        for name, p, copy in self._sources[c]:
            value, event = (inputs[name], None) if p is None else (values[name], events.get(p))
            arg, grad_leaves = receive(value, device, detach=grad, copy=copy, event=event, stream=stream)
            args.append(arg)
            for leaf in grad_leaves:
                if leaf is not None:
                    leaves.append((name, grad_leaves))
                    break
        return self.chunks[c].module.forward(*args), leaves

    def _layout(self, inputs: dict, split: microbatch.Split, names: list[str]) -> microbatch.Layout:
        """The batch layout of this input signature (refusals.checked_layout, once per
        signature). Raises PlanError where micro-batches would change the model."""
        key = tuple((n, tuple(s for d, s in enumerate(v.shape) if d != split.dims.get(n)), v.dtype)
                    for n, v in inputs.items() if isinstance(v, torch.Tensor))
        if key not in self._layouts:
            devices = [w.torch_device for w in self._chunk_workers]
            self._layouts[key] = checked_layout(self.chunks, devices, inputs, split.dims, names, self.source,
                                                self.microbatch_statistics, self.input_names, self.refusal, self.marked)
        return self._layouts[key]

    # -- backward ------------------------------------------------------------

    def backward(self, state: StepState, output_grads: dict[str, list],
                 engine_device: torch.device | None = None) -> dict[str, list]:
        """Run every chunk's backward, every micro-batch, as dataflow in reverse.

        `output_grads`: node -> gradient per tensor leaf of its (gathered) value (None:
        none) for the values the model returned. Returns, for each model input, its
        gradients in the same form (summed over its consumers, on the input's device).

        `engine_device`: the CUDA device whose autograd thread is calling, if any. Its
        chunks run on this thread: a worker's backward on that device would queue
        behind this very call and never run.
        """
        self._check_open()
        micro = len(state.split.inputs)
        per_micro = ([output_grads] if micro == 1
                     else microbatch.split_grads(output_grads, state.split.sizes, state.output_dims))
        state.sent = [{} for _ in range(micro)]
        self._streams_wait_for_caller()
        on_engine = [name for name, w in self.workers.items() if w.torch_device == engine_device]
        inline = on_engine[0] if on_engine else self._caller_device()
        run = Pass(self._wakes, self._after, self._last, self._keys(micro, True), micro, True, self._chunk_workers,
                   self.workers.get(inline), partial(self._backward_task, state, per_micro))
        self._pin.hold(self.workers[inline].cores if inline is not None else ())
        try:
            run.execute(list(self.workers.values()), self.timeout_s)
        finally:
            self._pin.release()
        self._caller_waits_for_streams()
        return self._input_grads(state)

    def _backward_task(self, state: StepState, per_micro: list[dict[str, list]], worker: Worker, i: int,
                       c: int) -> None:
        """`per_micro[i]`: the gradients of micro-batch i's model outputs (node -> list)."""
        chunk = self.chunks[c]
        chunk_state = state.chunks.pop((i, c), None)
        if chunk_state is None:  # ran without grad (nothing it computed needs one)
            return
        device, stream = worker.torch_device, worker.stream
        sent, events = state.sent[i], state.events[i]
        tensors, grads = [], []
        output_grads = per_micro[i]
        for name, out, sinks in zip(chunk.outputs, chunk_state.outs, self._sinks[c]):
            total = output_grads.get(name)
            if total is not None:
                total = [None if g is None else move(g, device, None, stream) for g in total]
            for consumer, here in sinks:
                theirs = sent.get(consumer)
                if theirs is not None and name in theirs:
                    if total is None and here:  # the one gradient so far, on this device: used as it is
                        total = theirs[name]
                    else:
                        total = add_grads(total, theirs[name], None if here else device, events.get(consumer), stream)
            if total is None:
                continue
            flat = [out] if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
            for t, g in zip(flat, total):
                if g is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                    tensors.append(t)
                    grads.append(g)
        timeline = self.timeline
        start = time.perf_counter() if timeline is not None else 0.0
        if tensors:
            if worker.stream is None:
                run_backward(tensors, grads)
            else:
                with worker.context():
                    run_backward(tensors, grads)
        sent[c] = {name: [None if leaf is None else leaf.grad for leaf in leaves] for name, leaves in chunk_state.inputs}
        if worker.stream is not None:
            events[c] = worker.record_event()
        if timeline is not None:
            record_run(timeline, chunk, "backward", start, i)
        if chunk_state.saved:
            self._saved.release(chunk.device, chunk_state.saved)

    def _input_grads(self, state: StepState) -> dict[str, list]:
        """Each model input's gradients: summed over its consumers, then put together
        over micro-batches (concatenated where the input was split, else summed)."""
        result: dict[str, list] = {}
        split = state.split
        for name, first in split.inputs[0].items():
            if not isinstance(first, torch.Tensor) or name not in self.consumers:
                continue
            device = first.device
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            per_micro = []
            for i, sent in enumerate(state.sent):
                total = None
                for consumer in self.consumers[name]:
                    if consumer in sent and name in sent[consumer]:
                        total = add_grads(total, sent[consumer][name], device, state.events[i].get(consumer), stream)
                per_micro.append(None if total is None else total[0])
            if all(g is None for g in per_micro):
                continue
            pieces = [p[name] for p in split.inputs]
            result[name] = [per_micro[0] if len(per_micro) == 1 else
                            microbatch.join_grads(per_micro, pieces, split.dims.get(name))]
        return result

    # -- plumbing ------------------------------------------------------------

    def _keys(self, micro: int, backward: bool) -> list[int]:
        """The tasks' priority keys of one pass (dataflow.task_keys), made once."""
        keys = self._task_keys.get((micro, backward))
        if keys is None:
            keys = self._task_keys[micro, backward] = task_keys(self._rank[backward], micro, backward)
        return keys

    def _caller_device(self) -> str | None:
        """A CPU device whose chunks the calling thread runs itself, saving the hand-off
        to a worker: the first whose thread count the caller has (module doc)."""
        threads = torch.get_num_threads()
        return next((name for name, w in self.workers.items() if w.device.kind == "cpu" and w.device.threads == threads),
                    None)

    def _streams_wait_for_caller(self) -> None:
        """Worker streams see everything the caller queued before (inputs, optimizer step)."""
        for w in self.workers.values():
            if w.stream is not None:
                w.stream.wait_stream(torch.cuda.current_stream(w.torch_device))

    def _caller_waits_for_streams(self) -> None:
        for w in self.workers.values():
            if w.stream is not None:
                torch.cuda.current_stream(w.torch_device).wait_stream(w.stream)

    def _check_open(self) -> None:
        if self.closed:
            raise ExecutionError(f"{self.source}: the placed model was closed (placed.close()); apply the plan "
                                 f"again to run it")

    def repin(self, pin: bool) -> None:
        """Restart the workers pinned to their devices' cores (`pin`) or free to run on
        any (the default; experiments/bench_crossing.py and bench_pinning.py measure both).
        Call between steps.

        Raises ExecutionError at once when the executor is closed."""
        self._check_open()
        for w in self.workers.values():
            w.close()
        self.pin = pin
        self._start(None)  # the caller keeps the count it has

    def close(self) -> None:
        """Stop the workers; any later call raises ExecutionError at once."""
        self.closed = True
        self._pin.release()
        for w in self.workers.values():
            w.close()

