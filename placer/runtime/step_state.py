"""What a training step keeps between its passes (the executor's forward and
backward), and the debug timeline's record of one chunk's run."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from placer.runtime import microbatch
from placer.runtime.chunks import Chunk
from placer.runtime.worker import Autocast

__all__ = ["ChunkEvent", "ChunkState", "StepState", "record_run"]


@dataclass(frozen=True)
class ChunkEvent:
    """One chunk's run in the debug timeline (time.perf_counter seconds)."""

    chunk: int
    device: str
    phase: str  # "forward" or "backward"
    thread: str  # the thread that ran it: its device's worker, or the caller's
    start: float
    end: float
    microbatch: int = 0


@dataclass
class ChunkState:
    """What one chunk keeps between its forward and its backward for one micro-batch."""

    inputs: list[tuple[str, list[torch.Tensor | None]]]  # per input with a grad-requiring leaf: name, leaves
    outs: tuple  # its output values, as it returned them
    saved: dict[int, int] | None  # storage pointer -> bytes saved for backward (when counting)


@dataclass
class StepState:
    """One call's pass state: its micro-batches, values, events and chunk states."""

    split: microbatch.Split
    grad: bool
    values: list[dict[str, Any]]  # per micro-batch: chunk output node -> value
    events: list[dict[int, Any]]  # per micro-batch: chunk index -> CUDA event after it (absent on the host)
    chunks: dict[tuple[int, int], ChunkState] = field(default_factory=dict)  # (micro-batch, chunk) -> state
    sent: list[dict[int, dict[str, list]]] = field(default_factory=list)  # backward: chunk -> input -> grads
    output_dims: dict[str, list[int | None]] = field(default_factory=dict)
    autocast: Autocast | None = None  # the caller's, entered around every chunk's forward
    plain: bool = False  # host devices, no autocast, no counting: a chunk's forward enters no context


def record_run(timeline: list[ChunkEvent], chunk: Chunk, phase: str, start: float, microbatch_index: int) -> None:
    """Append `chunk`'s run, from `start` (time.perf_counter seconds) to now, to `timeline`."""
    timeline.append(ChunkEvent(chunk.index, chunk.device, phase, threading.current_thread().name, start,
                               time.perf_counter(), microbatch_index))
