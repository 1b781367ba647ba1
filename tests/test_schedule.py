"""graphs.schedule: the work-conserving chunk partition (exact on small DAGs, acyclic
on many random ones) and the ordering edges that keep side effects in eager's order,
on fx graphs and on torch.export graphs."""

from __future__ import annotations

import doctest
import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphs.schedule
from graphs.schedule import chunk_order, is_random, mutated_args, ordering_edges, partition, pass_order


def test_doctests():
    assert doctest.testmod(graphs.schedule).failed == 0


def naive_keys(n, edges, device):
    """F and B straight from their definitions (closure over same-device paths)."""
    preds = {v: [u for u, w in edges if w == v] for v in range(n)}
    succs = {u: [w for x, w in edges if x == u] for u in range(n)}

    def closure(v, nbrs):
        seen, todo = {v}, [v]
        while todo:
            x = todo.pop()
            for y in nbrs[x]:
                if device[y] == device[v] and y not in seen:
                    seen.add(y)
                    todo.append(y)
        return seen

    keys = []
    for v in range(n):
        anc, desc = closure(v, preds), closure(v, succs)
        f = frozenset((u, w) for u, w in edges if w in anc and device[u] != device[w])
        b = frozenset((u, w) for u, w in edges if u in desc and device[u] != device[w])
        keys.append((device[v], f, b))
    return keys


def random_dag(rng: random.Random, n: int, p: float, devices: int):
    edges = sorted({(u, v) for v in range(n) for u in range(v) if rng.random() < p})
    return edges, [rng.randrange(devices) for _ in range(n)]


@pytest.mark.parametrize("seed", range(60))
def test_partition_groups_exactly_the_nodes_with_equal_keys_and_the_chunk_graph_is_acyclic(seed):
    rng = random.Random(seed)
    n = rng.randrange(2, 40)
    edges, device = random_dag(rng, n, rng.choice([0.05, 0.15, 0.4]), rng.choice([2, 3]))
    part = partition(n, edges, device)
    chunk = part.chunk_of
    keys = naive_keys(n, edges, device)
    for u in range(n):
        for v in range(n):
            assert (chunk[u] == chunk[v]) == (keys[u] == keys[v])
        # A chunk hands work on in a pass when some member reaches another device, by any path.
        _, f, b = keys[u]
        assert part.hands_on_forward[chunk[u]] == bool(b)
        assert part.hands_on_backward[chunk[u]] == bool(f)
    order = chunk_order(chunk, edges)  # raises on a cycle
    assert sorted(order) == list(range(max(chunk) + 1))
    assert [min(v for v in range(n) if chunk[v] == c) for c in range(max(chunk) + 1)] == sorted(
        min(v for v in range(n) if chunk[v] == c) for c in range(max(chunk) + 1))  # ids by lowest node


def test_towers_split_where_a_value_crosses_and_nowhere_else():
    # Two towers a0->a1->a2 (device 0) and b0->b1->b2 (device 1), a head h (device 1)
    # reading a2 and b2: each tower is one chunk; the head waits for a2.
    edges = [(0, 1), (1, 2), (3, 4), (4, 5), (2, 6), (5, 6)]
    chunks = partition(7, edges, [0, 0, 0, 1, 1, 1, 1]).chunk_of
    assert chunks == [0, 0, 0, 1, 1, 1, 2]
    # The head's tower on device 1 is independent of tower a: not fused behind it.
    assert chunks[3] != chunks[6]


def test_a_node_that_needs_a_crossing_does_not_hold_up_independent_work_before_it_in_fx_order():
    # fx order: x (dev 0), y (dev 1, reads x), z (dev 1, independent), w (dev 1, reads y and z)
    assert partition(4, [(0, 1), (1, 3), (2, 3)], [0, 1, 1, 1]).chunk_of == [0, 1, 2, 1]


def test_chunks_that_hand_work_to_another_device_run_first_when_ready_at_once():
    # Towers a (device 0) and b (device 1); the head h (device 1) reads a2 and b2:
    # backward, h's gradients make tower b and tower a's hand-off ready at once.
    # n0 (device 1) -> a (device 0): chunk of n0 hands on forward; a hands on backward.
    edges = [(0, 1), (1, 2), (2, 3), (4, 5), (3, 6), (5, 6)]
    part = partition(7, edges, [1, 0, 0, 0, 1, 1, 1])
    assert part.chunk_of == [0, 1, 1, 1, 2, 2, 3]
    assert pass_order(part, backward=False) == [0, 1, 2, 3]  # 0 and 1 hand on; then fx order
    # Backward: 1 (whose gradients device 1's chunk 0 waits for) and 3 (the head: device 0
    # waits for its gradients) first, in reverse fx order; then the rest.
    assert pass_order(part, backward=True) == [3, 1, 2, 0]
    assert pass_order(partition(3, [(0, 1), (1, 2)], [0, 0, 0]), backward=True) == [0]


def test_chunk_order_refuses_a_cycle():
    with pytest.raises(ValueError, match="cycle"):
        chunk_order([0, 1, 0], [(0, 1), (1, 2)])


# -- ordering edges ---------------------------------------------------------------

class Dropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.a(x)) + F.dropout(self.b(x), 0.3, training=True) + F.dropout(x, 0.1, training=False)


def test_random_ops_form_one_chain_in_fx_order():
    m = Dropouts()
    gm = fx.symbolic_trace(m)
    assert [n.name for n in gm.graph.nodes if is_random(n, m)] == ["drop", "dropout"]
    assert ("drop", "dropout") in ordering_edges(gm.graph, m)
    m.eval()  # the module's dropout stops; the one called with training=True does not
    assert [n.name for n in gm.graph.nodes if is_random(n, m)] == ["dropout"]


class InPlace(nn.Module):
    """Reads a value, updates it in place, reads it again."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        before = y * 2
        y.add_(1)
        return before + y


def test_an_update_of_a_value_runs_after_earlier_readers_and_before_later_ones():
    m = InPlace()
    gm = fx.symbolic_trace(m)
    update = next(n for n in gm.graph.nodes if n.target == "add_")
    assert [a.name for a in mutated_args(update, m)] == ["lin"]
    edges = set(ordering_edges(gm.graph, m))
    assert ("mul", "add_") in edges  # the earlier reader first
    assert ("add_", "add") in edges  # the later reader after


class Counter(nn.Module):
    """Reads a buffer, updates it in place, reads it again."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        before = x * self.count
        self.count.add_(1)
        return self.lin(before) + x * self.count


def test_an_update_of_a_buffer_in_an_exported_graph_is_ordered_between_its_readers():
    m = Counter()
    gm = torch.export.export(m, (torch.randn(3, 4),), strict=False).module()
    nodes = list(gm.graph.nodes)
    update = next(n for n in nodes if getattr(n.target, "__name__", "") == "add_.Tensor")
    readers = [n for n in nodes if getattr(n.target, "__name__", "") == "mul.Tensor"]
    assert [a.op for a in mutated_args(update, gm)] == ["get_attr"]
    edges = set(ordering_edges(gm.graph, gm))
    assert (readers[0].name, update.name) in edges
    assert update in readers[1].all_input_nodes  # export reads the update itself: a data edge, not repeated
    assert (update.name, readers[1].name) not in edges


def test_export_graphs_in_place_and_random_aten_ops():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.BatchNorm1d(4))
    gm = torch.export.export(m, (torch.randn(3, 4),), strict=False).module()
    by_target = {getattr(n.target, "__name__", str(n.target)): n for n in gm.graph.nodes}
    assert [a.name for a in mutated_args(by_target["relu_.default"], gm)] == ["linear"]
    assert is_random(by_target["dropout.default"], gm)
    norm = by_target["batch_norm.default"]
    assert {a.name for a in mutated_args(norm, gm)} == {"bn_running_mean", "bn_running_var"} or \
        {a.target for a in mutated_args(norm, gm)} == {"3.running_mean", "3.running_var"}
