"""placer.distributed.schedule alone: owners, crossings and message tags of the
global walk, on hand-made chunks (no model, no processes)."""

from __future__ import annotations

import torch
import torch.fx as fx

from graphs.devices import parse_cluster
from placer.distributed.schedule import Crossing, TensorMeta, build_schedule, describe
from placer.runtime.chunks import Chunk


def chunk(index: int, device: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Chunk:
    return Chunk(index=index, device=device, nodes=outputs, inputs=inputs, outputs=outputs,
                 mutated_inputs=frozenset(), module=fx.GraphModule(torch.nn.Module(), fx.Graph()))


def three_chunks():
    """x -> a (rank 0) -> b (rank 1) -> c (rank 0, reads a and b); the output reads c and b."""
    cluster = parse_cluster("rank0:cpu:0,rank1:cpu:0")
    chunks = [chunk(0, "rank0:cpu:0", ("x",), ("a",)), chunk(1, "rank1:cpu:0", ("a",), ("b",)),
              chunk(2, "rank0:cpu:0", ("a", "b"), ("c",))]
    devices = [cluster.devices[0], cluster.devices[1], cluster.devices[0]]
    return chunks, devices


def test_crossings_owners_and_the_loss_rank():
    chunks, devices = three_chunks()
    s = build_schedule(chunks, devices, ["c", "b"])
    assert s.owner == [0, 1, 0, 0] and s.loss_rank == 0 and s.loss_index == 3
    # a goes to rank 1 for chunk 1; b comes back to rank 0, first used by chunk 2 (not the loss)
    assert s.crossings == [Crossing("a", 0, 1, 0, 1), Crossing("b", 1, 0, 1, 2)]
    assert s.sent_forward_at(0) == [s.crossings[0]] and s.sent_backward_at(2) == [s.crossings[1]]
    assert s.sent_forward_at(2) == []


def test_with_meta_numbers_a_block_of_tags_per_crossing_and_returns_a_new_schedule():
    chunks, devices = three_chunks()
    s = build_schedule(chunks, devices, ["c"])
    meta = {"a": describe((torch.zeros(2, requires_grad=True), 3, torch.ones(1))), "b": describe(torch.zeros(4))}
    numbered = s.with_meta(meta)
    assert [c.tag for c in numbered.crossings] == [0, 6]  # a: 3 leaves, forward and backward
    assert [c.tag for c in s.crossings] == [0, 0] and s.meta == {}  # the original is unchanged
    assert numbered.sent_forward_at(1) == [numbered.crossings[1]]


def test_describe_keeps_constants_and_marks_what_needs_a_gradient():
    meta = describe({"h": torch.zeros(2, 3, requires_grad=True), "n": 5, "mask": torch.ones(2, dtype=torch.bool)})
    assert meta.leaves[1] == 5
    assert meta.tensors == [0, 2] and meta.grad_tensors == [0]
    assert meta.leaves[2] == TensorMeta(torch.Size([2]), torch.bool, False)
