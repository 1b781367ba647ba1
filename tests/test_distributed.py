"""placer.distributed on CPU only: two gloo ranks over loopback, separate processes
that talk only over TCP as if they were hosts, and the measurement pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from graphs.capture import node_params
from graphs.trace import trace_model
from graphs.workload import load_workload
from graphs.devices import host_cores, parse_cluster
from placer.distributed import (DistributedModel, LocalRank, merge_checkpoints, measure_distributed, rank_cluster,
                                run_local, save_checkpoint, train_distributed)
from placer.distributed.schedule import build_schedule
from placer.distributed.launch import free_port
from placer.runtime.pool import MeasurementPool
from graphs.errors import DeviceSpecError, PlanError
from placer.plan import Plan, plan_from_assignment
from placer.runtime.chunks import build_chunks

ROOT = Path(__file__).resolve().parents[1]
SPEC = "zoo:transformer"
TWO = ["cpu:0", "cpu:1"]


def alternating_plan(spec: str, blocks: int = 5, devices: list[str] = TWO) -> Plan:
    """The fx graph cut into `blocks` contiguous runs dealt to the devices in turn:
    values cross ranks both ways. Nodes that share a parameter go with its first user."""
    w = load_workload(spec)
    model = w.fresh_model()
    gm = trace_model(model, leaf_modules=w.leaf_modules).gm
    nodes = list(gm.graph.nodes)
    device_of, first_user = {}, {}
    for i, node in enumerate(nodes):
        device = devices[(i * blocks // len(nodes)) % len(devices)]
        for name in node_params(gm, node):
            path, _, attr = name.rpartition(".")
            device = first_user.setdefault(id(getattr(gm.get_submodule(path), attr)), device)
        device_of[node.name] = device
    return plan_from_assignment(model, lambda n: device_of[n.name], devices, leaf_modules=w.leaf_modules)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-7, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def reference_steps(spec: str, steps: int) -> tuple[list[float], dict, torch.nn.Module]:
    """The unplaced model's losses, first-step gradients and final weights, one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = load_workload(spec)
        model = w.fresh_model()
        optimizer = w.make_optimizer(model.parameters())
        losses, grads = [], {}
        for step in range(steps):
            optimizer.zero_grad()
            loss = w.loss_fn(model(*w.inputs), *w.inputs)
            loss.backward()
            if step == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            losses.append(loss.item())
        return losses, grads, model
    finally:
        torch.set_num_threads(before)


# -- the schedule and the device syntax (no processes) -------------------------------

def test_crossings_go_forward_in_the_global_order_and_the_loss_sits_with_the_last_output():
    w = load_workload(SPEC)
    plan = alternating_plan(SPEC)
    model = w.fresh_model()
    gm = trace_model(model, leaf_paths=plan.leaf_paths, allow_fallback=False).gm
    chunks = build_chunks(model, gm.graph, plan.assignment)
    devices = dict(zip(plan.devices, rank_cluster(plan, 2).devices))
    outputs = [a.name for a in next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes]
    schedule = build_schedule(chunks, [devices[c.device] for c in chunks], outputs)

    assert {c.src for c in schedule.crossings} == {0, 1}  # both directions
    assert [c.produced_at for c in schedule.crossings] == sorted(c.produced_at for c in schedule.crossings)
    for c in schedule.crossings:
        assert c.src != c.dst and c.produced_at < c.first_use
        assert schedule.owner[c.produced_at] == c.src and schedule.owner[c.first_use] == c.dst
    assert schedule.loss_rank == schedule.owner[max(schedule.producer[n] for n in outputs)]


def test_devices_gain_an_owner_rank():
    cluster = parse_cluster("rank0:cpu:0,rank1:cpu:0,rank1:cuda:7")  # cuda:7 lives on rank 1's host
    assert [d.rank for d in cluster.devices] == [0, 1, 1]
    assert [d.local_name for d in cluster.devices] == ["cpu:0", "cpu:0", "cuda:7"]
    assert cluster.devices[2].torch_device == "cuda:7" and cluster.devices[0].is_virtual_cpu
    assert parse_cluster("cpu:0").devices[0].rank is None
    with pytest.raises(DeviceSpecError, match="an owner"):
        parse_cluster("rank0:cpu:0,cpu:1")
    plan = alternating_plan(SPEC)
    assert rank_cluster(plan, 2).names == ["rank0:cpu:0", "rank1:cpu:1"]
    with pytest.raises(PlanError, match="no owner"):
        rank_cluster(plan, 2, parse_cluster("rank0:cpu:0,rank2:cpu:0"))


# -- two local ranks ----------------------------------------------------------------

def _step_and_save(rank: LocalRank, directory: str) -> tuple[float, float, dict[str, torch.Tensor]]:
    """One step of the workload's loop, then the loss forward only; this rank's
    first-step gradients; its checkpoint share."""
    model: DistributedModel = rank.model
    torch.set_num_threads(1)
    optimizer = rank.workload.make_optimizer(model.parameters())
    model.zero_grad()
    loss = model.train_step(rank.workload.inputs, rank.workload.loss_fn)
    mine = {id(p) for p in model.parameters()}
    grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if id(p) in mine and p.grad is not None}
    optimizer.step()
    save_checkpoint(model, directory)
    return loss, model.evaluate(rank.workload.inputs, rank.workload.loss_fn), grads


def test_two_ranks_give_the_unplaced_models_loss_gradients_and_checkpoint(tmp_path):
    plan = alternating_plan(SPEC, blocks=5, devices=["cpu:0", "cpu:1", "cpu:2"])  # rank 0 owns cpu:0 and cpu:2
    (loss0, after0, grads0), (loss1, after1, grads1) = run_local(SPEC, plan, 2, _step_and_save, str(tmp_path),
                                                                 timeout_s=120)
    losses, grads, trained = reference_steps(SPEC, 2)

    assert loss0 == loss1 and loss0 == pytest.approx(losses[0], rel=1e-5)
    assert after0 == after1 and after0 == pytest.approx(losses[1], rel=1e-5)  # the optimizer stepped every share
    assert grads0 and grads1 and not set(grads0) & set(grads1)  # each parameter on one rank only
    assert set(grads0) | set(grads1) == set(grads)
    for name, g in {**grads0, **grads1}.items():
        assert_close_rel(g, grads[name], f"grad of {name}")
    _, _, trained = reference_steps(SPEC, 1)
    unplaced = load_workload(SPEC).fresh_model()
    unplaced.load_state_dict(merge_checkpoints(tmp_path))  # strict: every key, nothing else
    for name, p in trained.state_dict().items():
        assert_close_rel(unplaced.state_dict()[name].float(), p.float(), f"checkpoint {name}")


def test_measured_step_time_and_each_devices_memory():
    plan = alternating_plan(SPEC)
    m = measure_distributed(SPEC, plan, iters=3, warmup=1, timeout_s=120)
    assert m.feasible and m.reason is None
    assert len(m.times_ms) == 3 and m.median_ms > 0 and m.iqr_ms >= 0
    assert set(m.peak_bytes) == set(TWO) and all(b > 0 for b in m.peak_bytes.values())


def test_train_distributed_reports_each_step_from_the_ranks():
    plan = alternating_plan(SPEC)
    seen = []
    losses = train_distributed(SPEC, plan, 2, on_step=lambda step, loss, ms: seen.append((step, loss, ms)))
    assert losses == pytest.approx(reference_steps(SPEC, 2)[0], rel=1e-5)
    assert [(step, loss) for step, loss, _ in seen] == list(zip([1, 2], losses)) and all(ms > 0 for *_, ms in seen)


def test_a_failing_rank_is_reported_not_hung():
    plan = alternating_plan(SPEC)
    m = measure_distributed("zoo:rnnlm", plan, iters=1, warmup=1, timeout_s=60)  # a plan for another model
    assert not m.feasible and "another model" in m.reason


# -- two "hosts": separate processes that share only a TCP address -------------------------

def test_two_processes_over_tcp_train_like_the_unplaced_model(tmp_path):
    spec, steps = "zoo:rnnlm", 2
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / "train_distributed.py"), "--workload", spec,
             "--steps", str(steps), "--checkpoint", str(tmp_path)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    losses = [float(line.split()[3]) for line in outputs[0].splitlines() if line.startswith("step ")]
    expected, _, trained = reference_steps(spec, steps)
    assert losses == pytest.approx(expected, rel=1e-5)
    assert {p.name for p in tmp_path.iterdir()} == {"rank0.pt", "rank1.pt"}
    merged = merge_checkpoints(tmp_path)
    for name, p in trained.state_dict().items():
        assert_close_rel(merged[name].float(), p.float(), f"checkpoint {name}")


# -- ranks die with their parent (issue 11) ------------------------------------------------

def _write_pid_and_sleep(rank: LocalRank, directory: str) -> None:
    path = Path(directory) / f"rank{rank.rank}.pid"
    path.with_suffix(".tmp").write_text(str(os.getpid()))
    path.with_suffix(".tmp").rename(path)  # whole: the test reads every rank*.pid it sees
    time.sleep(600)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper that may never come in a container."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_die_when_their_launcher_is_killed(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from placer.distributed import run_local\n"
        "from tests.test_distributed import SPEC, _write_pid_and_sleep, alternating_plan\n"
        "if __name__ == '__main__':\n"
        f"    run_local(SPEC, alternating_plan(SPEC), 2, _write_pid_and_sleep, {str(tmp_path)!r}, timeout_s=600)\n")
    launcher = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        assert len(pids) == 2, "the ranks did not start"
        launcher.kill()  # SIGKILL: no handler, no cleanup in the launcher
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "a rank outlived its launcher"
    finally:
        launcher.kill()
        for p in tmp_path.glob("rank*.pid"):
            if _alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)


# -- the measurement pool ------------------------------------------------------------
# One worker: on a CPU host a pool of more would measure the plan's CPU devices on a share
# of the cores (placer.runtime.pool.check_workers, tests/test_pool.py). A failed candidate
# is retried on the fresh worker that replaces the one it failed on.

def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _measure_while(pool: MeasurementPool, plans: list[Plan], act) -> list:
    """measure_many on a thread; `act(worker)` on the first worker seen measuring."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(results=pool.measure_many(plans)))
    thread.start()
    _until(lambda: any(w.task is not None for w in pool.workers), "a worker to measure")
    act(next(w for w in pool.workers if w.task is not None))
    thread.join(timeout=120)
    assert not thread.is_alive()
    return out["results"]


def test_a_killed_pool_worker_loses_no_candidate():
    plans = [alternating_plan(SPEC, blocks) for blocks in (2, 3)]
    with MeasurementPool(SPEC, TWO, n_workers=1, iters=2, timeout_s=20.0, warmup=1) as pool:
        pid = pool.workers[0].pid
        results = _measure_while(pool, plans, lambda w: os.kill(w.pid, signal.SIGKILL))
        assert all(m.feasible and m.median_ms > 0 for m in results), [m.reason for m in results]
        assert set(results[0].peak_bytes) == set(TWO)
        assert len(pool.events) == 1 and "died (exit code -9) measuring candidate" in pool.events[0]
        assert len(pool.workers) == 1 and pool.workers[0].pid != pid  # replaced
        assert [m.feasible for m in pool.measure_many(plans[:1])] == [True]


def test_workers_started_from_a_thread_that_ends_live_on():
    # Linux's parent-death signal follows the thread that started a process (prctl(2)): a
    # worker replaced from a search thread was killed when that thread ended.
    plans = [alternating_plan(SPEC, 2)]
    box: dict = {}

    def start_and_measure():
        box["pool"] = MeasurementPool(SPEC, TWO, n_workers=1, iters=1, timeout_s=20.0, warmup=0)
        box["first"] = box["pool"].measure_many(plans)  # the worker is ready: its signal request is made

    thread = threading.Thread(target=start_and_measure)
    thread.start()
    thread.join(timeout=120)
    with box["pool"] as pool:
        assert box["first"][0].feasible
        pool.workers[0].process.join(timeout=1.0)
        assert pool.workers[0].process.is_alive()
        assert pool.measure_many(plans)[0].feasible and pool.events == []


@pytest.mark.slow
def test_a_hung_worker_is_replaced_and_a_candidate_that_fails_twice_is_infeasible():
    plans = [alternating_plan(SPEC, 2)]
    # timeout_s bounds each step (far above a step of this model) and makes 4.5 s the hang limit
    with MeasurementPool(SPEC, TWO, n_workers=1, iters=2, timeout_s=2.0, warmup=1) as pool:
        def hang_then_kill(first):
            os.kill(first.pid, signal.SIGSTOP)
            _until(lambda: pool.workers[0].task is not None and pool.workers[0].pid != first.pid,
                   "the retry, on the replacement")
            os.kill(pool.workers[0].pid, signal.SIGKILL)

        (failed,) = _measure_while(pool, plans, hang_then_kill)
        assert not failed.feasible, failed.reason
        assert "hung for more than 4.5 s" in failed.reason and "died" in failed.reason, failed.reason
        assert len(pool.events) == 2 and "hung for more than 4.5 s" in pool.events[0]
        assert pool.measure_many(plans)[0].feasible  # on the second replacement


_POOL_SCRIPT = """import signal, sys, time
sys.path.insert(0, {root!r})
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with Ctrl-C ignored; a terminal's has it
from placer.runtime.pool import MeasurementPool
from tests.test_distributed import SPEC, alternating_plan
if __name__ == '__main__':
    pool = MeasurementPool(SPEC, {devices!r}, n_workers=1, iters=1, timeout_s=20.0, warmup=0)
    pool.measure_many([alternating_plan(SPEC, 2, {devices!r})])  # its worker is ready, past its die-with-parent request
    try:  # the test's Ctrl-C may come as soon as the pid is written, before a line after this one
        print(pool.workers[0].pid, flush=True)
        time.sleep(600)
    except KeyboardInterrupt:
        pool.close()
        print('closed', pool.workers[0].process.exitcode, flush=True)
"""


def _pool_owner(tmp_path: Path, devices: list[str] = TWO) -> tuple[subprocess.Popen, int]:
    """A process (a session of its own) that holds a one-worker pool on `devices`, and the worker's pid."""
    script = tmp_path / "pool_owner.py"
    script.write_text(_POOL_SCRIPT.format(root=str(ROOT), devices=devices))
    owner = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = owner.stdout.readline()  # blocks until the pool has measured, or the owner ended
    if not line.strip().isdigit():
        owner.kill()
        pytest.fail(f"the pool did not start: {line}{owner.communicate(timeout=60)[1]}")
    return owner, int(line)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_with_their_parent(tmp_path):
    owner, worker = _pool_owner(tmp_path)
    try:
        assert _alive(worker)
        owner.kill()  # SIGKILL: the parent gets no chance to stop its worker
        owner.communicate(timeout=60)
        _until(lambda: not _alive(worker), "the orphaned worker to die", timeout=20)
    finally:
        owner.kill()
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_ignore_ctrl_c_and_the_parent_stops_them_and_repeat_no_warning(tmp_path):
    # more virtual CPU devices than cores: the parent warns; its worker, parsing the same devices, must not
    owner, worker = _pool_owner(tmp_path, [f"cpu:{i}" for i in range(host_cores() + 1)])
    try:
        os.killpg(owner.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        stdout, stderr = owner.communicate(timeout=60)
        assert owner.returncode == 0, stderr
        assert stdout.split() == ["closed", "0"], stderr  # the worker ended at close(), not of the signal
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
        assert stderr.count("virtual CPU devices on") == 1, stderr
        assert not _alive(worker)
    finally:
        owner.kill()
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
