"""placer.runtime.executor: dataflow over the devices' workers (independent work runs
ahead of dependent work), exact numerics on fx and torch.export graphs, eager's
dropout masks, the caller's autocast on every worker, no unbounded wait (closed
executor, dead worker, time limit), copies, and pinned (or unpinned) workers."""

from __future__ import annotations

import copy
import os
import pickle
import threading
from dataclasses import replace

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphs.devices import parse_cluster
from placer.runtime.executor import ExecutionError, Executor
from placer.runtime.worker import Autocast, core_shares

TWO = ["cpu:0", "cpu:1"]


def one_thread_devices(names: list[str]) -> dict:
    cluster = parse_cluster(",".join(names))
    return {d.name: replace(d, threads=1) for d in cluster.devices}


class Placed:
    """An executor over a traced graph, called like the model (test helper)."""

    def __init__(self, model: nn.Module, assign, names=TWO, gm: fx.GraphModule | None = None, **options):
        self.gm = gm if gm is not None else fx.symbolic_trace(model)
        self.assignment = {n.name: assign(n) for n in self.gm.graph.nodes}
        self.executor = Executor.build(model, self.gm, self.assignment, one_thread_devices(names), **options)
        self.placeholders = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in self.gm.graph.nodes if n.op == "output").args[0]
        nodes: list[str] = []
        fx.node.map_arg(self.output, lambda n: nodes.append(n.name))
        self.output_nodes = list(dict.fromkeys(nodes))

    def __call__(self, *args):
        values = self.executor.run(dict(zip(self.placeholders, args)), self.output_nodes, torch.device("cpu"),
                                   torch.is_grad_enabled())
        return fx.node.map_arg(self.output, lambda n: values[n.name])

    def chunk_of(self, node: str) -> int:
        return next(c.index for c in self.executor.chunks if node in c.nodes)


class Towers(nn.Module):
    """Four independent MLP towers on one input and a head over their sum."""

    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        self.towers = nn.ModuleList(nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]) for _ in range(4))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(sum(t(x) for t in self.towers))


def tower_split(node: fx.Node) -> str:
    """The issue's held-out plan: towers 0 and 1 on cpu:0 except the tail of tower 1;
    that tail, towers 2 and 3 and the head on cpu:1."""
    target = str(node.target)
    if target.startswith(("towers.0", "towers.1")) and target != "towers.1.2":
        return "cpu:0"
    return "cpu:1"


def test_independent_work_never_waits_behind_dependent_work(one_thread):
    torch.manual_seed(0)
    model = Towers()
    ref = copy.deepcopy(model)
    placed = Placed(model, tower_split)
    ex = placed.executor
    # Each worker on its own core: unpinned (the default), the OS may start cpu:1's worker only after
    # tower 1's hand-off has arrived, and then its two ready chunks run in priority order instead.
    ex.repin(True)
    independent = placed.chunk_of("towers_2_0")
    tail = placed.chunk_of("towers_1_2")
    assert independent != tail and not ex.chunks[independent].after  # towers 2-3 wait for nothing
    assert placed.chunk_of("towers_3_2") == independent
    x = torch.randn(16, 64)
    # On a loaded host the OS may first run cpu:1's worker only after tower 1's hand-off has
    # arrived; then both chunks are ready and priority rightly takes the tail. A runtime that
    # holds independent work behind dependent work fails every step, so three steps may try.
    for _ in range(3):
        ex.timeline = []
        placed(x).sum().backward()
        ref(x).sum().backward()
        on_1 = [(e.phase, e.chunk) for e in ex.timeline if e.device == "cpu:1"]
        forward = [c for phase, c in on_1 if phase == "forward"]
        if forward.index(independent) < forward.index(tail):
            break
    assert forward.index(independent) < forward.index(tail)  # not held up by tower 1's hand-off
    backward = [c for phase, c in on_1 if phase == "backward"]
    # Ready at once: the tail first, since cpu:0 waits for its gradients (towers 2-3 first left cpu:0 idle).
    assert backward.index(tail) < backward.index(independent)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    ex.close()


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu_(self.a(x))
        g = self.b(x)
        g[:, 0] = h[:, 1]  # in place, through a view
        return self.out(self.norm(h + g))


@pytest.mark.parametrize("seed", range(4))
def test_an_exported_graph_runs_placed_exactly_like_eager(seed, one_thread):
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(5, 6)
    gm = torch.export.export(model, (x,), strict=False).module()
    ref = copy.deepcopy(gm)
    gen = torch.Generator().manual_seed(seed)
    pick = {n.name: TWO[int(torch.randint(2, (1,), generator=gen))] for n in gm.graph.nodes}
    placed = Placed(gm, lambda n: pick[n.name], gm=gm)
    assert any(getattr(n.target, "__name__", "") == "copy_.default" for n in gm.graph.nodes)  # the view update
    for param in [p for p in gm.parameters()] + [p for p in ref.parameters()]:
        param.grad = None
    out = placed(x)
    expected = ref(x)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, expected, rtol=1e-5, atol=1e-6)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(gm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(gm.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=name)  # running statistics updated once, in place
    placed.executor.close()


class Normed(nn.Module):
    """Linear layers (bf16 under CPU autocast) and a squared error (float32 under it)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.norm(self.b(torch.relu(self.a(x))))
        return self.head(h), F.mse_loss(h, torch.zeros_like(h), reduction="none")


@pytest.mark.parametrize("microbatches", [1, 2])
def test_the_callers_autocast_reaches_every_device(microbatches):
    """Autocast is per thread and chunks run on workers: the caller's must reach them."""
    torch.manual_seed(0)
    model = Normed()
    ref = copy.deepcopy(model)
    placed = Placed(model, lambda n: "cpu:0" if n.name in ("a", "relu") else "cpu:1", microbatches=microbatches)
    assert len({c.device for c in placed.executor.chunks}) == 2
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hidden = placed(x)
        expected, expected_hidden = ref(x)
    assert (out.dtype, hidden.dtype) == (expected.dtype, expected_hidden.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1.6e-2, atol=1e-2)
    out.float().sum().backward()
    expected.float().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2, msg=name)
    with torch.no_grad():
        assert placed(x)[0].dtype == torch.float32  # autocast off again: float32 as in eager
    placed.executor.close()


def test_a_worker_enters_the_callers_autocast_as_it_is():
    seen = []

    def look(state):
        with Autocast.enter(state):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                         torch.is_autocast_cache_enabled()))

    assert Autocast.of_caller(["cpu"]) is None  # off: nothing to enter
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        state = Autocast.of_caller(["cpu"])
    thread = threading.Thread(target=look, args=(state,))
    thread.start()
    thread.join()
    assert seen == [(True, torch.float16, False)]


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, tokens):
        h = self.mid(self.emb(tokens))
        return F.linear(h, self.emb.weight)


def test_parameters_are_read_inside_chunks_never_handed_between_them():
    model = TiedHead()
    placed = Placed(model, lambda n: "cpu:1" if n.name == "mid" else "cpu:0")
    for chunk in placed.executor.chunks:
        assert "emb_weight" not in chunk.inputs and "emb_weight" not in chunk.nodes
    reader = placed.executor.chunks[placed.chunk_of("linear")]
    reads = {str(n.target) for n in reader.module.graph.nodes if n.op == "get_attr"}
    assert len(reads) == 1 and getattr(reader.module, reads.pop()) is model.emb.weight  # the model's own tensor
    placed.executor.close()


class TwoDropouts(nn.Module):
    """Dropout after heavy work on one branch and after light work on the other; in
    fx order the heavy branch's dropout comes first."""

    def __init__(self):
        super().__init__()
        self.heavy = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
        self.light = nn.Linear(256, 256)

    def forward(self, x):
        return F.dropout(self.heavy(x), 0.5) - F.dropout(self.light(x), 0.5)


def test_dropout_draws_eagers_masks_whatever_runs_concurrently(one_thread):
    """The light branch's dropout is ready long before the heavy one's; drawn first, it
    would take the heavy one's random numbers."""
    model = TwoDropouts()
    placed = Placed(model, lambda n: "cpu:1" if "heavy" in n.name or n.name == "dropout" else "cpu:0")
    assert len({c.device for c in placed.executor.chunks}) == 2
    x = torch.randn(256, 256)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = model(x)
        torch.manual_seed(seed)
        assert torch.equal(placed(x), expected)
    placed.executor.close()


def test_a_closed_executor_raises_at_once():
    placed = Placed(Towers(), tower_split)
    placed.executor.close()
    with pytest.raises(ExecutionError, match="closed"):
        placed(torch.randn(2, 64))


class _Poison:
    def run(self, worker, task):
        raise SystemExit  # ends the worker's thread


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_is_reported_not_waited_for(one_thread):
    placed = Placed(Towers(), tower_split)
    worker = placed.executor.workers["cpu:1"]
    worker.queue.put((0, _Poison(), 0))
    worker._thread.join()
    with pytest.raises(ExecutionError, match="worker of cpu:1 died"):
        placed(torch.randn(2, 64)).sum().backward()
    placed.executor.close()


class Blocking(nn.Module):
    def __init__(self, gate: threading.Event):
        super().__init__()
        self.gate = gate

    def forward(self, x):
        self.gate.wait()
        return x * 2


class WithGate(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = Blocking(gate)

    def forward(self, x):
        return self.gate(self.pre(x))


def test_a_step_past_its_time_limit_raises_and_the_model_runs_again(one_thread):
    gate = threading.Event()
    model = WithGate(gate)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Blocking) or super().is_leaf_module(m, qualname)

    gm = fx.GraphModule(model, Tracer().trace(model))
    placed = Placed(model, lambda n: "cpu:1" if n.name == "gate" else "cpu:0", gm=gm)
    placed.executor.timeout_s = 0.05
    releaser = threading.Timer(1.0, gate.set)  # the barrier after the failure waits for the blocked chunk
    releaser.start()
    with pytest.raises(ExecutionError, match="limit of 0.05 s"):
        placed(torch.randn(3, 4))
    releaser.join()
    placed.executor.timeout_s = None
    assert placed(torch.randn(3, 4)).shape == (3, 4)
    placed.executor.close()


def test_an_executor_copies_and_pickles_with_workers_of_its_own(one_thread):
    torch.manual_seed(0)
    model = Towers()
    placed = Placed(model, tower_split)
    x = torch.randn(4, 64)
    expected = placed(x)
    copied = copy.deepcopy(placed.executor)
    assert copied.workers["cpu:1"] is not placed.executor.workers["cpu:1"]
    assert copied.workers["cpu:1"].alive
    loaded = pickle.loads(pickle.dumps(placed.executor))
    for ex in (copied, loaded):
        values = ex.run({"x": x}, placed.output_nodes, torch.device("cpu"), grad=False)
        torch.testing.assert_close(values[placed.output_nodes[0]], expected.detach())
        ex.close()
    placed.executor.close()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux thread affinity and two cores")
def test_virtual_cpu_workers_run_unpinned_by_default_and_on_their_own_cores_when_pinned():
    devices = {d.name: d for d in parse_cluster("cpu:0,cpu:1").devices}
    shares = core_shares(list(devices.values()))
    assert set(shares["cpu:0"]).isdisjoint(shares["cpu:1"])
    placed = Placed(Towers(), tower_split)
    placed.executor.close()
    everywhere = os.sched_getaffinity(0)
    ex = Executor(placed.executor.chunks, devices)  # the default: workers that may run on any core
    for worker in ex.workers.values():
        assert os.sched_getaffinity(worker._thread.native_id) == everywhere
    # Pinned (bench_crossing's and bench_pinning's pinned rows): new workers on their own
    # cores, with the same results; unpinned again, on any core again.
    x = torch.randn(4, 64)
    before = ex.run({"x": x}, placed.output_nodes, torch.device("cpu"), grad=False)
    ex.repin(True)
    for name, worker in ex.workers.items():
        assert os.sched_getaffinity(worker._thread.native_id) == set(shares[name])
    after = ex.run({"x": x}, placed.output_nodes, torch.device("cpu"), grad=False)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    ex.repin(False)
    for worker in ex.workers.values():
        assert os.sched_getaffinity(worker._thread.native_id) == everywhere
    ex.close()
    pinned = Executor(placed.executor.chunks, devices, pin=True)
    for name, worker in pinned.workers.items():
        assert os.sched_getaffinity(worker._thread.native_id) == set(shares[name])
    pinned.close()
    with pytest.raises(ExecutionError, match="closed"):
        ex.repin(False)


class SkipChain(nn.Module):
    """A chain whose first layer also feeds the last stage (as a GPT's mask or a
    residual does): over two stages, stage 0 is two chunks."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        h = self.a(x)
        return self.d(self.c(self.b(h)) + h)


def _towers_on_two(module: str) -> int:
    return 0 if module.startswith(("towers.0", "towers.1")) and module != "towers.1.2" else 1


def _stages_on_two(module: str) -> int:
    return 0 if module in ("a", "b") else 1


# Chunks of ~10 ms: a worker's wake-up must not decide which of two ready tasks it
# takes first. Tens of us on an idle host, but on 2 cores shared with another test
# process a worker can wait a few ms for a core: at width 512 (2.4 ms before a second
# chunk became ready on cpu:1) half the runs under such load failed, at 1024 none of 10.
@pytest.mark.parametrize("model, device_of, microbatches", [
    (lambda: Towers(width=1024), _towers_on_two, 1),
    (lambda: SkipChain(width=1024), _stages_on_two, 2),
], ids=["towers", "pipelined-chain"])
def test_the_simulators_order_per_device_is_the_runtimes(model, device_of, microbatches, tmp_path, one_thread):
    """A plan through the whole pipeline (capture, profile, group, plan, apply): every
    device runs the same chunks, for the same micro-batches, in the same order, in
    both passes."""
    from envs.sim import Simulator
    from graphs.problem import build_problem
    from graphs.workload import Workload
    from placer.plan import make_plan
    from placer.runtime import apply

    torch.manual_seed(0)
    workload = Workload(name="order", spec="test:order", model=model(), inputs=(torch.randn(256, 1024),))
    problem = build_problem(workload, "cpu:0,cpu:1", cache_dir=str(tmp_path))
    ops = problem.ops

    def device(group: int) -> int:
        modules = {ops.nodes[m].get("module", "") for m in problem.groups.nodes[group]["members"]}
        return min(device_of(p) for p in modules)

    placement = [device(g) for g in range(problem.n_groups)]
    assert set(placement) == {0, 1}
    sim = Simulator(problem).simulate(placement, microbatches, timeline=True)
    simulated: dict = {}
    for e in sim.timeline:
        if e["kind"] in ("fwd", "bwd"):
            runs = simulated.setdefault((e["device"], e["kind"]), [])
            if not runs or runs[-1][:2] != (e["chunk"], e["microbatch"]):
                runs.append((e["chunk"], e["microbatch"], set()))
            runs[-1][2].add(e["group"])

    plan = make_plan(problem, placement, "order", microbatches=microbatches,
                     schedule="gpipe" if microbatches > 1 else None)
    placed = apply(workload.fresh_model(), plan, parse_cluster("cpu:0,cpu:1"))
    group_of = {m: g for g, members in enumerate(plan.groups) for m in members}
    x = workload.inputs[0]
    placed(x).sum().backward()
    placed.executor.timeline = []
    placed(x).sum().backward()
    measured: dict = {}
    chunks = placed.executor.chunks
    for e in placed.executor.timeline:
        key = (e.device, "fwd" if e.phase == "forward" else "bwd")
        measured.setdefault(key, []).append((e.microbatch, {group_of[n] for n in chunks[e.chunk].nodes}))
    assert {k: [(i, groups) for _, i, groups in v] for k, v in simulated.items()} == measured
    if microbatches > 1:  # GPipe: stage 0 hands micro-batch 0 on before it starts micro-batch 1
        assert [i for i, _ in measured["cpu:0", "fwd"]] == [0, 0, 1, 1]
    placed.close()


def test_a_worker_that_cannot_start_says_why_at_once():
    from placer.runtime.worker import Worker

    device = parse_cluster("cpu:0,cpu:1").devices[0]
    with pytest.raises(ExecutionError, match="the worker of cpu:0 could not start"):
        Worker(device, cores=(os.cpu_count() + 4096,))  # a core this host lacks: sched_setaffinity fails
