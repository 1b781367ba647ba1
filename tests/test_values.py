"""placer.runtime.values: a received value is a fresh leaf where gradients flow back,
copied when the chunk changes it, gradients sum with None as zero, and saved bytes
count each storage once."""

from __future__ import annotations

import torch

from placer.runtime.values import SavedBytes, add_grads, count_saved, map_tensors, receive, run_backward

CPU = torch.device("cpu")


def test_receive_detaches_into_leaves_and_copies_what_the_chunk_changes():
    x = torch.randn(3, requires_grad=True) * 2
    value, leaves = receive((x, 4, x.detach()), CPU, detach=True, copy=False)
    assert value[1] == 4 and leaves[1] is None and leaves[2] is None
    assert value[0].is_leaf and value[0].requires_grad and leaves[0] is value[0]
    assert value[0].data_ptr() == x.data_ptr()  # no copy on the host
    copied, leaves = receive(x, CPU, detach=True, copy=True)
    assert copied.data_ptr() != x.data_ptr() and leaves[0].data_ptr() == x.data_ptr()
    same, leaves = receive(x, CPU, detach=False, copy=False)
    assert same is x and leaves == [None]


def test_add_grads_treats_none_as_zero():
    a, b = torch.ones(2), torch.full((2,), 2.0)
    assert add_grads(None, [a, None]) == [a, None]
    total = add_grads([a, None], [b, b])
    assert torch.equal(total[0], torch.full((2,), 3.0)) and total[1] is b


def test_saved_bytes_count_each_storage_once_while_held():
    book, record = SavedBytes(["cpu:0"]), {}
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with count_saved(record, excluded={w.untyped_storage().data_ptr()}):
        y = (x @ w).tanh()
    assert record == {y.untyped_storage().data_ptr(): 4 * 8 * 4, x.untyped_storage().data_ptr(): 4 * 8 * 4}
    book.hold("cpu:0", dict(record))
    book.hold("cpu:0", dict(record))  # a second holder of the same storages
    assert book.live["cpu:0"] == book.peak["cpu:0"] == 256
    book.release("cpu:0", dict(record))
    assert book.live["cpu:0"] == 256
    book.release("cpu:0", dict(record))
    assert book.live["cpu:0"] == 0 and book.peak["cpu:0"] == 256


def test_run_backward_is_autograd_backward():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    run_backward([x @ w], [torch.ones(2, 3)])
    expected = x.t() @ torch.ones(2, 3)
    torch.testing.assert_close(w.grad, expected)
    assert map_tensors(lambda t: t * 0, (w, "k"))[1] == "k"
