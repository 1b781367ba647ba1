"""placer.runtime: a placed model trains exactly like the unplaced one, runs devices
concurrently, and fails loudly and cleanly."""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import replace

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphs.capture import node_params
from graphs.trace import trace_model
from graphs.workload import Workload, load_workload
from graphs.devices import Cluster, format_size, parse_cluster
from graphs.errors import PlanError
from placer.plan import Plan, plan_from_assignment
from placer.runtime import PlacedModule, apply, measure, measure_eager
from placer.runtime.chunks import build_chunks

TWO = ["cpu:0", "cpu:1"]
THREE = ["cpu:0", "cpu:1", "cpu:2"]


# -- models -------------------------------------------------------------------

class BranchyCNN(nn.Module):
    """Two branches from one stem, an in-place ReLU and BatchNorm buffers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.a(h) + self.b(h)
        y.add_(h)  # in place on a value made by another chunk (fx turns `y += h` into an add)
        return self.head(y.mean((2, 3)))


class UnrolledRNN(nn.Module):
    """One cell reused at every step: its weights are shared by many nodes."""

    def __init__(self, steps: int = 4):
        super().__init__()
        self.steps = steps
        self.inp = nn.Linear(6, 12)
        self.cell = nn.RNNCell(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):  # x: [steps, batch, 6]
        h = x.new_zeros((x.shape[1], 12))
        outs = []
        for t in range(self.steps):
            h = self.cell(torch.tanh(self.inp(x[t])), h)
            outs.append(self.out(h))
        return torch.stack(outs), h


class TiedLM(nn.Module):
    """Embedding tied to the output projection (one parameter under two names)."""

    def __init__(self, vocab: int = 30, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.proj = nn.Linear(width, vocab, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.body(h)
        return self.proj(h) + F.linear(h, self.emb.weight).mean()


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(10, 16)
        self.bn = nn.BatchNorm1d(16)
        self.l2 = nn.Linear(16, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return self.bn2(self.l2(torch.relu(self.bn(self.l1(x))))) * self.scale


def lm_loss(logits, tokens):
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def mean_loss(out, *inputs):
    return sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))


MODELS = {
    "branchy": (BranchyCNN, lambda: (torch.randn(2, 3, 8, 8),), mean_loss),
    "rnn": (UnrolledRNN, lambda: (torch.randn(4, 3, 6),), mean_loss),
    "tied": (TiedLM, lambda: (torch.randint(0, 30, (2, 7)),), lm_loss),
    "norm": (NormNet, lambda: (torch.randn(8, 10),), mean_loss),
}


# -- helpers ------------------------------------------------------------------

def one_thread_cluster(names: list[str]) -> Cluster:
    """The devices with one thread each, so that the reference (also one thread) uses
    the same reduction order and results compare at float precision."""
    cluster = parse_cluster(",".join(names))
    return replace(cluster, devices=tuple(replace(d, threads=1) for d in cluster.devices))


def random_plan(model: nn.Module, devices: list[str], seed: int, leaf_modules=()) -> Plan:
    """A random device per node, except that nodes sharing a parameter share a device."""
    gm = trace_model(model, leaf_modules=leaf_modules).gm
    tied = nx.Graph()
    users: dict[int, list[str]] = {}
    for node in gm.graph.nodes:
        tied.add_node(node.name)
        for name in node_params(gm, node):
            path, _, attr = name.rpartition(".")
            users.setdefault(id(getattr(gm.get_submodule(path), attr)), []).append(node.name)
    for names in users.values():
        nx.add_path(tied, names)
    gen = torch.Generator().manual_seed(seed)
    device_of = {}
    for component in nx.connected_components(tied):
        device = devices[int(torch.randint(len(devices), (1,), generator=gen))]
        device_of.update(dict.fromkeys(component, device))
    return plan_from_assignment(model, lambda n: device_of[n.name], devices, leaf_modules=leaf_modules)


def assert_close_rel(actual, expected, what: str, rtol: float = 1e-5, atol: float = 1e-7):
    """max |a - e| <= rtol * max |e| + atol: relative to the tensor's scale; `atol` only
    covers gradients that are zero up to rounding (a conv bias before BatchNorm)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.detach().float() - expected.detach().float()).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def flat_outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def train_steps(model: nn.Module, inputs, loss_fn, steps: int) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(*inputs)
        loss_fn(out, *inputs).backward()
        opt.step()
        outs.append(out)
    return outs


def check_equivalent(build, inputs, loss_fn, devices, seed, leaf_modules=(), steps=2):
    """Placed and unplaced copies: same outputs, gradients and buffers, step by step.
    (Gradients agree to float rounding only: sums over a value's consumers run in
    another order. A deep BatchNorm net at batch 2 amplifies that over optimizer
    steps, so the zoo compares one step.)"""
    torch.manual_seed(0)
    ref = build()
    model = copy.deepcopy(ref)
    placed = apply(model, random_plan(model, devices, seed, leaf_modules), one_thread_cluster(devices))
    try:
        assert len({c.device for c in placed.executor.chunks}) > 1 or len(placed.executor.chunks) == 1
        ref_out = train_steps(ref, inputs, loss_fn, steps)
        placed_out = train_steps(placed, inputs, loss_fn, steps)
        for step, (a, e) in enumerate(zip(placed_out, ref_out)):
            for i, (x, y) in enumerate(zip(flat_outputs(a), flat_outputs(e))):
                assert_close_rel(x, y, f"output {i} at step {step}")
        for (name, p), (_, q) in zip(placed.named_parameters(), ref.named_parameters()):
            if q.grad is not None:
                assert_close_rel(p.grad, q.grad, f"grad of {name}")
            assert_close_rel(p, q, f"parameter {name} after {steps} steps")
        for name, b in ref.named_buffers():
            assert_close_rel(placed.get_buffer(name), b, f"buffer {name}")
    finally:
        placed.close()


# -- correctness --------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("devices,seed", [(TWO, 0), (TWO, 1), (THREE, 2)])
def test_placed_model_trains_like_the_unplaced_one(name, devices, seed, one_thread):
    build, make_inputs, loss_fn = MODELS[name]
    torch.manual_seed(1)
    check_equivalent(build, make_inputs(), loss_fn, devices, seed)


@pytest.mark.parametrize("zoo", ["rnnlm", "nmt", "transformer", "inception_v3"])
def test_zoo_models_train_like_unplaced(zoo, one_thread):
    w = load_workload(f"zoo:{zoo}")
    check_equivalent(w.fresh_model, w.inputs, w.loss_fn, THREE, seed=3, leaf_modules=w.leaf_modules, steps=1)


def test_state_dict_keys_and_values_match_the_model():
    torch.manual_seed(0)
    model = TiedLM()
    keys = list(model.state_dict())
    placed = apply(model, random_plan(model, TWO, 0))
    assert list(placed.state_dict()) == keys
    assert placed.proj.weight is placed.emb.weight  # still tied
    fresh = TiedLM()
    fresh.load_state_dict(placed.state_dict())
    placed.load_state_dict(fresh.state_dict())
    tokens = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(placed(tokens), fresh(tokens))
    placed.close()


def test_no_grad_forward_and_requires_grad_inputs(one_thread):
    torch.manual_seed(0)
    ref = NormNet().eval()
    placed = apply(copy.deepcopy(ref), random_plan(ref, TWO, 4), one_thread_cluster(TWO))
    x = torch.randn(8, 10)
    with torch.no_grad():
        out = placed(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)

    for p in list(placed.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    placed(xa).pow(2).sum().backward()
    ref(xb).pow(2).sum().backward()
    assert_close_rel(xa.grad, xb.grad, "input gradient")
    placed.close()


def test_keyword_arguments_and_tuple_outputs(one_thread):
    torch.manual_seed(0)
    ref = UnrolledRNN()
    placed = apply(copy.deepcopy(ref), random_plan(ref, TWO, 5), one_thread_cluster(TWO))
    x = torch.randn(4, 3, 6)
    seq, h = placed(x=x)
    ref_seq, ref_h = ref(x)
    torch.testing.assert_close(seq, ref_seq)
    torch.testing.assert_close(h, ref_h)
    h.sum().backward()  # only one output used: the other gets no gradient work
    ref_h.sum().backward()
    for (name, p), q in zip(placed.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None) == name.startswith("out."), name
        if q.grad is not None:
            assert_close_rel(p.grad, q.grad, f"grad of {name}")
    placed.close()


def test_the_caller_runs_the_device_with_its_own_thread_count_itself(one_thread):
    """With one thread in the caller, cpu:0's chunks (one thread) run on the caller only,
    cpu:1's on its worker or on the caller where it hands them on to an idle cpu:1
    (dataflow); pinned, on cpu:1's worker only. Results are unchanged
    (test_placed_model_trains_... too)."""
    model = BranchyCNN()
    placed = apply(model, random_plan(model, TWO, 6), one_thread_cluster(TWO))
    me = threading.current_thread().name
    for pin, cpu1 in ((False, {me, "placer-cpu:1"}), (True, {"placer-cpu:1"})):
        placed.executor.repin(pin)
        placed.executor.timeline = []
        placed(torch.randn(2, 3, 8, 8)).sum().backward()
        threads = {(e.device, e.thread) for e in placed.executor.timeline}
        assert {t for d, t in threads if d == "cpu:0"} == {me}
        assert {t for d, t in threads if d == "cpu:1"} <= cpu1
    placed.close()


def test_backward_called_from_an_autograd_device_thread_runs_that_device_inline():
    """What happens when autograd calls PlacedGraph.backward on a CUDA device thread,
    played on the CPU: the engine device's chunks must not wait for their worker."""
    torch.manual_seed(0)
    ref = BranchyCNN()
    placed = apply(copy.deepcopy(ref), random_plan(ref, TWO, 6), one_thread_cluster(TWO))
    x = torch.randn(2, 3, 8, 8)
    values, state = placed.executor.forward({"x": x}, grad=True)
    out_node = placed._output_nodes[0]
    placed.executor.timeline = []
    placed.executor.backward(state, {out_node: [torch.ones_like(values[out_node])]}, engine_device=torch.device("cpu"))
    assert {e.thread for e in placed.executor.timeline if e.device == "cpu:0"} == {threading.current_thread().name}
    ref(x).sum().backward()
    for (name, p), q in zip(placed.named_parameters(), ref.parameters()):
        assert_close_rel(p.grad, q.grad, f"grad of {name}", rtol=1e-4)  # the reference ran with more threads
    placed.close()


# -- plans that do not fit ----------------------------------------------------

def test_split_tied_parameter_is_a_plan_error():
    model = TiedLM()
    gm = trace_model(model).gm
    users = [n.name for n in gm.graph.nodes if n.target in ("emb", "emb.weight")]
    plan = plan_from_assignment(model, lambda n: "cpu:1" if n.name == users[-1] else "cpu:0", TWO)
    with pytest.raises(PlanError, match="emb.weight"):
        apply(model, plan)


def test_plan_for_another_model_is_refused(tmp_path):
    plan = random_plan(NormNet(), TWO, 0)
    path = plan.save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="plan.json was made for another model"):
        apply(BranchyCNN(), path)
    apply(NormNet(), path).close()  # the same architecture is fine


def test_plan_naming_devices_the_cluster_lacks_is_refused_unless_they_stand_one_for_one():
    """Devices as many and of the same kinds stand for the plan's one to one
    (tests/test_placed.py covers that remap); any other count is refused."""
    plan = random_plan(NormNet(), TWO, 0)
    for devices in ("cpu:0", "cpu:0,cpu:2,cpu:3"):
        with pytest.raises(PlanError, match=r"places nodes on cpu:0,cpu:1; .*as many, of the same kinds"):
            apply(NormNet(), plan, parse_cluster(devices))


# -- concurrency, errors, cleanup ----------------------------------------------

class TwoBranches(nn.Module):
    """Two independent stacks of matmuls on the same input."""

    def __init__(self, width: int = 384, depth: int = 6):
        super().__init__()
        self.left = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.right = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        return self.left(x) + self.right(x)


def _overlaps(a, b) -> bool:
    return a.start < b.end and b.start < a.end


def test_chunks_on_different_devices_overlap_forward_and_backward():
    model = TwoBranches()
    plan = plan_from_assignment(model, lambda n: "cpu:1" if str(n.target).startswith("right") else "cpu:0", TWO)
    placed = apply(model, plan, one_thread_cluster(TWO))
    left, right = (c.index for c in placed.executor.chunks[:2])
    assert {placed.executor.chunks[left].device, placed.executor.chunks[right].device} == set(TWO)
    x = torch.randn(256, 384)
    placed(x).sum().backward()  # warm-up
    placed.executor.timeline = []
    for _ in range(3):
        placed(x).sum().backward()
    events = placed.executor.timeline
    for phase in ("forward", "backward"):
        runs = [(e for e in events if e.chunk == k and e.phase == phase) for k in (left, right)]
        pairs = list(zip(*runs))
        assert any(_overlaps(a, b) for a, b in pairs), f"{phase}: branches never ran at the same time"
    placed.close()


class Boom(nn.Module):
    """A leaf that can fail in forward or backward on demand."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fail_forward = False
        self.fail_backward = False

    def forward(self, x):
        if self.fail_forward:
            raise ValueError("boom in forward")
        return _FailingBackward.apply(self.lin(x), self)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.owner.fail_backward:
            raise KeyError("boom in backward")
        return g, None


class WithBoom(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.boom = Boom()
        self.post = nn.Linear(4, 4)

    def forward(self, x):
        return self.post(self.boom(self.pre(x)))


def test_exceptions_in_chunks_reach_the_caller_and_the_model_keeps_working():
    model = WithBoom()
    plan = plan_from_assignment(model, lambda n: "cpu:1" if n.target == "boom" else "cpu:0", TWO,
                                leaf_modules=(Boom,))
    placed = apply(model, plan)
    x = torch.randn(3, 4)
    placed.boom.fail_forward = True
    with pytest.raises(ValueError, match="boom in forward"):
        placed(x)
    with torch.no_grad(), pytest.raises(ValueError, match="boom in forward"):
        placed(x)
    placed.boom.fail_forward, placed.boom.fail_backward = False, True
    loss = placed(x).sum()
    with pytest.raises(KeyError, match="boom in backward"):
        loss.backward()
    placed.boom.fail_backward = False
    placed(x).sum().backward()
    assert placed.pre.weight.grad is not None
    placed.close()


def test_close_stops_the_worker_threads():
    placed = apply(NormNet(), random_plan(NormNet(), THREE, 0))
    threads = [w._thread for w in placed.executor.workers.values()]
    assert all(t.is_alive() and t.daemon for t in threads)
    placed.close()
    assert not any(t.is_alive() for t in threads)


def test_parameters_live_on_their_devices_and_the_wrapper_is_a_module():
    model = NormNet()
    placed = apply(model, random_plan(model, TWO, 0))
    assert isinstance(placed, PlacedModule) and isinstance(placed, nn.Module)
    chunk_devices = {n: c.device for c in placed.executor.chunks for n in c.nodes}
    assert placed.tensor_devices["l1.weight"] == chunk_devices["l1"]
    assert placed.tensor_devices["bn.running_mean"] == chunk_devices["bn"]
    placed.close()


# -- chunks -------------------------------------------------------------------

def test_chunks_as_runs_are_maximal_same_device_runs_with_forward_edges_only():
    """The distributed backend's stages: runs=True cuts maximal same-device runs in fx
    order (the local runtime's dataflow chunks: tests/test_chunks.py)."""
    model = BranchyCNN()
    gm = trace_model(model).gm
    plan = random_plan(model, THREE, 7)
    chunks = build_chunks(model, gm.graph, plan.assignment, runs=True)
    body = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]  # read in chunks
    assert [n for c in chunks for n in c.nodes] == body
    assert all(a.device != b.device for a, b in zip(chunks, chunks[1:]))
    producer = {n: c.index for c in chunks for n in c.nodes}
    for c in chunks:
        assert all(producer[name] < c.index for name in c.inputs if name in producer)


def test_a_chunk_that_changes_an_input_in_place_gets_its_own_copy():
    model = BranchyCNN()
    gm = trace_model(model).gm
    iadd = next(n for n in gm.graph.nodes if n.target == "add_")
    relu = next(n for n in gm.graph.nodes if n.target == "a.1")
    split = {iadd.name, relu.name}
    chunks = build_chunks(model, gm.graph, {n.name: "cpu:1" if n.name in split else "cpu:0" for n in gm.graph.nodes})
    mutated = {name for c in chunks for name in c.mutated_inputs}
    assert mutated == {iadd.args[0].name, relu.args[0].name}


def test_an_in_place_update_in_another_chunk_is_seen_by_later_readers(one_thread):
    """BranchyCNN's head reads `y` after `y.add_(h)`: split add, add_ and the head apart."""
    torch.manual_seed(0)
    ref = BranchyCNN()
    apart = {"add_": "cpu:1", "mean": "cpu:2"}
    plan = plan_from_assignment(ref, lambda n: apart.get(n.target if n.op == "call_method" else "", "cpu:0"), THREE)
    placed = apply(copy.deepcopy(ref), plan, one_thread_cluster(THREE))
    assert len(placed.executor.chunks) >= 4
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(placed(x), ref(x))
    placed.close()


# -- measurement --------------------------------------------------------------

class Activation(nn.Module):
    """ReLU that can fail like an exhausted allocator (a leaf: it runs inside a chunk)."""

    def __init__(self):
        super().__init__()
        self.oom = False

    def forward(self, x):
        if self.oom:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1.00 GiB total capacity)")
        return torch.relu(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(100, 100)
        self.act = Activation()
        self.l2 = nn.Linear(100, 100)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def mlp_workload(oom: bool = False):
    model = MLP()
    model.act.oom = oom
    return Workload(name="mlp", spec="test:mlp", model=model, inputs=(torch.randn(64, 100),))


def mlp_plan() -> Plan:
    return plan_from_assignment(MLP(), lambda n: "cpu:1" if n.target == "l2" else "cpu:0", TWO,
                                leaf_modules=(Activation,))


def test_measure_times_steps_and_accounts_memory_per_device():
    m = measure(mlp_workload(), mlp_plan(), iters=4, warmup=1)
    assert m.feasible and m.reason is None
    assert len(m.times_ms) == 4 and m.median_ms > 0 and m.iqr_ms >= 0
    layer = (100 * 100 + 100) * 4  # one Linear's parameters, in bytes
    # parameters + gradients + SGD momentum, and saved activations: cpu:0 keeps the
    # input of l1 and the output of relu; cpu:1 the relu output again (its own input).
    assert m.peak_bytes["cpu:0"] == 3 * layer + 2 * 64 * 100 * 4
    assert m.peak_bytes["cpu:1"] == 3 * layer + 64 * 100 * 4
    assert json.loads(json.dumps(m.to_json()))["peak_bytes"] == m.peak_bytes


def test_measure_reports_a_device_over_its_cap_as_infeasible():
    cluster = parse_cluster("cpu:0,cpu:1", memory="cpu:1=64KiB")
    m = measure(mlp_workload(), mlp_plan(), cluster, iters=2, warmup=1)
    assert not m.feasible
    assert m.reason == f"cpu:1 needs {format_size(m.peak_bytes['cpu:1'])} but has 64.0 KiB"


def test_measure_survives_out_of_memory_and_timeouts_and_cleans_up():
    threads_before = threading.active_count()
    m = measure(mlp_workload(oom=True), mlp_plan(), iters=2, warmup=1)
    assert not m.feasible and m.reason.startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")
    m = measure(mlp_workload(), mlp_plan(), iters=1000, warmup=1, timeout_s=0.01)
    assert not m.feasible and m.reason.startswith("timed out")
    assert measure(mlp_workload(), mlp_plan(), iters=2, warmup=1).feasible
    assert threading.active_count() <= threads_before  # every measurement stopped its workers


def test_measure_lets_other_errors_through():
    workload = mlp_workload()
    workload.loss_fn = lambda out, x: out.sum() / 0 + None
    with pytest.raises(TypeError):
        measure(workload, mlp_plan(), iters=1, warmup=1)


def test_measure_eager_runs_the_plain_model_with_the_given_threads():
    before = torch.get_num_threads()
    m = measure_eager(mlp_workload(), threads=1, iters=3, warmup=1)
    assert m.feasible and len(m.times_ms) == 3 and m.peak_bytes == {}
    assert torch.get_num_threads() == before


# -- CUDA (run where a GPU is present) ------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def exact_cuda():
    """No TF32: GPU float32 results then match the CPU's to float rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("input_device", ["cpu", "cuda:0"])
def test_cuda_and_cpu_placement_trains_like_the_unplaced_model(name, input_device, exact_cuda):
    """Inputs on the GPU make autograd call PlacedGraph.backward on its CUDA thread."""
    build, make_inputs, loss_fn = MODELS[name]
    torch.manual_seed(0)
    ref = build()
    model = copy.deepcopy(ref)
    placed = apply(model, random_plan(model, ["cuda:0", "cpu"], seed=1), parse_cluster("cuda:0,cpu"))
    assert {p.device.type for p in placed.parameters()} <= {"cuda", "cpu"}
    inputs = tuple(x.to(input_device) for x in make_inputs())
    out = placed(*inputs)
    assert all(o.device == inputs[0].device for o in flat_outputs(out))
    loss_fn(out, *inputs).backward()
    ref_out = ref(*(x.cpu() for x in inputs))
    loss_fn(ref_out, *(x.cpu() for x in inputs)).backward()
    for x, y in zip(flat_outputs(out), flat_outputs(ref_out)):
        assert_close_rel(x.cpu(), y, "output", rtol=1e-4, atol=1e-6)
    for (n, p), q in zip(placed.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert p.grad.device == p.device
            assert_close_rel(p.grad.cpu(), q.grad, f"grad of {n}", rtol=1e-4, atol=1e-6)
    placed.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("zoo", ["rnnlm", "nmt", "transformer", "inception_v3"])
def test_zoo_on_cuda_and_cpu_measures_with_allocator_peaks(zoo):
    w = load_workload(f"zoo:{zoo}")
    plan = random_plan(w.model, ["cuda:0", "cpu"], seed=2, leaf_modules=w.leaf_modules)
    m = measure(w, plan, parse_cluster("cuda:0,cpu"), iters=3, warmup=1)
    assert m.feasible, m.reason
    assert m.peak_bytes["cuda:0"] > 0 and m.peak_bytes["cpu"] > 0
