"""Start the ranks: join a group torchrun made (`init_from_env`), or start local ranks
on this host (`run_local`, for tests, the CLI and measurement; placer.runtime.processes).
Every rank builds its model from the workload with a factory: `distributed_model`
(backend.py, any plan) or `Pipelined` (pipelining.py, plans whose devices form a pipeline).

torchrun (one host or several) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in each process; `init_from_env` joins with init_method="env://". Several
hosts are the same thing with --nnodes and a reachable --rdzv-endpoint (docs/distributed.md).
"""

from __future__ import annotations

import functools
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from graphs.devices import host_cores
from graphs.errors import PlacerError
from graphs.workload import Workload, load_workload
from placer.distributed.backend import DistributedModel
from placer.distributed.share import rank_cluster
from placer.distributed.checkpoint import save_checkpoint
from placer.distributed.pipelining import PipelinedModel, plan_pipeline
from placer.plan import Plan, with_workload_options
from placer.runtime import processes
from placer.runtime.timing import Measurement, summarize, time_steps

RankModel = DistributedModel | PipelinedModel
ModelFactory = Callable[[Workload, Plan], RankModel]


def distributed_model(workload: Workload, plan: Plan) -> DistributedModel:
    """The distributed backend's model of `workload` placed by `plan` (a ModelFactory)."""
    return DistributedModel(workload.fresh_model(), plan, workload.inputs)


@dataclass(frozen=True)
class Pipelined:
    """The pipelining backend's ModelFactory: `microbatches` and `schedule` (None: the
    plan's); the workload's loss function is checked for how micro-batches' losses
    combine (plan_pipeline)."""

    microbatches: int | None = None
    schedule: str | None = None

    def __call__(self, workload: Workload, plan: Plan) -> PipelinedModel:
        return PipelinedModel(workload.fresh_model(), plan, workload.inputs, self.microbatches, self.schedule,
                              loss_fn=workload.loss_fn)


class RankFailed(PlacerError):
    """A local rank raised, died or ran past the time limit; the message says which and why."""


def backend_for(plan: Plan, world_size: int) -> str:
    """NCCL when every device of the plan is a GPU, else gloo (CPU tensors)."""
    kinds = {d.kind for d in rank_cluster(plan, world_size).devices}
    return "nccl" if kinds == {"cuda"} else "gloo"


def init_from_env(plan: Plan, timeout_s: float = 600.0) -> int:
    """Join the process group torchrun (or a launcher that sets the same variables)
    describes; returns this process's rank. A no-op when already joined."""
    if not dist.is_initialized():
        world_size = int(os.environ["WORLD_SIZE"])
        backend = backend_for(plan, world_size)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank()


def world_size_of(plan: Plan) -> int:
    """How many ranks a plan needs: its owners if it names them, else one per device."""
    if plan.devices[0].startswith("rank"):
        return 1 + max(int(name.split(":", 1)[0][4:]) for name in plan.devices)
    return len(plan.devices)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRank:
    """What a function run on each local rank gets."""

    rank: int
    world_size: int
    workload: Workload
    model: RankModel
    _queue: Any

    def report(self, item: Any) -> None:
        """Hand `item` to the parent's on_report while the ranks still run."""
        self._queue.put(("report", self.rank, _pack(item)))


def run_local(workload_spec: str, plan: Plan, world_size: int, fn: Callable[..., Any], *args: Any,
              on_report: Callable[[Any], None] | None = None, timeout_s: float = 600.0,
              build: ModelFactory = distributed_model) -> list[Any]:
    """Run `fn(LocalRank, *args)` on `world_size` local ranks of this host (gloo or
    NCCL over loopback), each with the workload's model placed by `plan` through
    `build` (distributed_model, or a Pipelined); return each
    rank's result, in rank order. `fn` and `build` must be picklable (module-level).
    Each rank gets an equal share of the host's cores and dies with this process.
    Raises RankFailed when a rank raises, dies, or the whole run passes `timeout_s`."""
    ctx = processes.context(["torch", "placer.distributed.launch", "graphs.zoo"])
    messages = ctx.Queue()
    port = free_port()
    threads = max(1, host_cores() // world_size)
    procs = [processes.process(ctx, _rank_main, (rank, world_size, port, threads, timeout_s, workload_spec, plan,
                                                 build, fn, args, messages), name=f"placer-rank{rank}")
             for rank in range(world_size)]
    for p in procs:
        processes.start(p)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            try:
                kind, rank, item = messages.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"rank {dead[0][0]} died (exit code {dead[0][1]})") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"ranks ran past {timeout_s:g} s") from None
                continue
            if kind != "error":
                item = _unpack(item)
            if kind == "report" and on_report is not None:
                on_report(item)
            elif kind == "error":
                raise RankFailed(f"rank {rank} raised: {item}")
            elif kind == "result":
                results[rank] = item
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        messages.close()
    return [results[r] for r in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, threads: int, timeout_s: float, workload_spec: str,
               plan: Plan, build: ModelFactory, fn: Callable, args: tuple, messages) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        init_from_env(plan, timeout_s)
        workload = load_workload(workload_spec)
        model = build(workload, plan)
        result = fn(LocalRank(rank, world_size, workload, model, messages), *args)
        messages.put(("result", rank, _pack(result)))
    except Exception as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        messages.put(("error", rank, lines[-1].strip()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pack(item: Any) -> bytes:
    """Bytes, not a pickled tensor: torch.multiprocessing would pass tensors as shared
    memory whose owner may exit before the parent reads them."""
    buffer = io.BytesIO()
    torch.save(item, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# -- what the CLI calls --------------------------------------------------------------

def measure_distributed(workload_spec: str, plan: Plan, iters: int = 10, warmup: int = 3,
                        world_size: int | None = None, timeout_s: float = 600.0) -> Measurement:
    """Time `iters` training steps of the plan on local ranks (one per device unless
    the plan names owners), after `warmup`: median and IQR of the slowest rank's step,
    and every device's peak memory. A rank that fails or runs past `timeout_s` gives
    an infeasible Measurement with the reason."""
    return _measure(workload_spec, plan, world_size or world_size_of(plan), distributed_model, iters, warmup,
                    timeout_s)


def measure_pipelined(workload_spec: str, plan: Plan, iters: int = 10, warmup: int = 3,
                      microbatches: int | None = None, schedule: str | None = None,
                      timeout_s: float = 600.0) -> Measurement:
    """`measure_distributed` for the pipelining backend: one local rank per stage,
    `microbatches` and `schedule` (None: the plan's). A plan that is no pipeline
    raises PlanError here, before any rank starts."""
    plan, n_stages = _pipeline_for(workload_spec, plan, microbatches, schedule)
    return _measure(workload_spec, plan, n_stages, Pipelined(microbatches, schedule), iters, warmup, timeout_s)


def _measure(workload_spec: str, plan: Plan, world_size: int, build: ModelFactory, iters: int, warmup: int,
             timeout_s: float) -> Measurement:
    try:
        results = run_local(workload_spec, plan, world_size, _measure_rank, iters, warmup, timeout_s=timeout_s,
                            build=build)
    except RankFailed as exc:
        return Measurement(feasible=False, reason=str(exc))
    return results[0]


def train_distributed(workload_spec: str, plan: Plan, steps: int,
                      on_step: Callable[[int, float, float], None] | None = None,
                      checkpoint_dir: str | Path | None = None, world_size: int | None = None,
                      timeout_s: float = 3600.0) -> list[float]:
    """Train `steps` steps of the workload's loop (its optimizer, its batch) on local
    ranks; `on_step(step, loss, milliseconds)` is called here as rank 0 reports each
    step. With `checkpoint_dir`, each rank saves its share there at the end
    (merge_checkpoints loads them into the unplaced model). Returns the losses.
    Raises RankFailed when a rank raises, dies, or the run passes `timeout_s`."""
    return run_local(workload_spec, plan, world_size or world_size_of(plan), _train_rank, steps, checkpoint_dir,
                     on_report=(lambda item: on_step(*item)) if on_step else None, timeout_s=timeout_s)[0]


def train_pipelined(workload_spec: str, plan: Plan, steps: int,
                    on_step: Callable[[int, float, float], None] | None = None,
                    checkpoint_dir: str | Path | None = None, microbatches: int | None = None,
                    schedule: str | None = None, timeout_s: float = 3600.0) -> list[float]:
    """`train_distributed` on the pipelining backend: one local rank per stage of the
    plan, `microbatches` micro-batches per step scheduled by `schedule` ("gpipe" or
    "1f1b"; None: the plan's fields). Raises PlanError before any rank starts when
    the plan is no pipeline (the message points to the distributed backend), and
    RankFailed as `run_local` does."""
    plan, n_stages = _pipeline_for(workload_spec, plan, microbatches, schedule)
    return run_local(workload_spec, plan, n_stages, _train_rank, steps, checkpoint_dir,
                     on_report=(lambda item: on_step(*item)) if on_step else None, timeout_s=timeout_s,
                     build=Pipelined(microbatches, schedule))[0]


def pipeline_stages(workload: Workload, plan: Plan, microbatches: int | None = None,
                    schedule: str | None = None) -> int:
    """How many ranks the pipelining backend needs for `plan` (one per stage), after
    every check `plan_pipeline` makes, with the workload's micro-batch options
    (`with_workload_options`). Raises PlanError (one line) otherwise."""
    spec = plan_pipeline(workload.fresh_model(), with_workload_options(plan, workload), workload.inputs,
                         microbatches, schedule, loss_fn=workload.loss_fn)
    return len(spec.pipeline.stages)


def _pipeline_for(workload_spec: str, plan: Plan, microbatches: int | None,
                  schedule: str | None) -> tuple[Plan, int]:
    """(the plan every rank runs: with the workload's micro-batch options, its stage count)."""
    workload = load_workload(workload_spec)
    plan = with_workload_options(plan, workload)
    return plan, pipeline_stages(workload, plan, microbatches, schedule)


def _optimizer(rank: LocalRank) -> torch.optim.Optimizer | None:
    params = rank.model.parameters()
    return rank.workload.make_optimizer(params) if params else None


def _train_rank(rank: LocalRank, steps: int, checkpoint_dir: str | Path | None) -> list[float]:
    model, workload = rank.model, rank.workload
    optimizer = _optimizer(rank)
    losses = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = train_step(model, optimizer, workload)
        losses.append(loss)
        if rank.rank == 0:
            rank.report((step, loss, (time.perf_counter() - start) * 1e3))
    if checkpoint_dir is not None:
        save_checkpoint(model, checkpoint_dir)
    return losses


def train_step(model: RankModel, optimizer: torch.optim.Optimizer | None, workload: Workload) -> float:
    """One step of the user's loop: zero_grad, forward + loss + backward, optimizer step."""
    model.zero_grad()
    loss = model.train_step(workload.inputs, workload.loss_fn)
    if optimizer is not None:
        optimizer.step()
    return loss


def _measure_rank(rank: LocalRank, iters: int, warmup: int) -> Measurement:
    """Time the steps on every rank with the one timing loop (no per-rank time limit:
    ranks stay in lock-step; run_local bounds the whole run), then take each step's
    slowest rank: a step lasts until every rank has finished it."""
    model, workload = rank.model, rank.workload
    optimizer = _optimizer(rank)
    cuda = {name: d.torch_device for name, d in model.local_devices.items() if d.kind == "cuda"}
    step = functools.partial(train_step, model, optimizer, workload)
    model.saved = {}
    time_steps(step, 1, sync=list(cuda.values()))  # the first warm-up step counts saved activations
    saved, model.saved = model.saved_bytes(), None
    time_steps(step, max(1, warmup) - 1, sync=list(cuda.values()))
    slowest = torch.tensor(time_steps(step, iters, sync=list(cuda.values())), dtype=torch.float64,
                           device=model.comm_device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    peaks = model.held_bytes(optimizer)
    for device, nbytes in saved.items():
        peaks[device] = peaks.get(device, 0) + nbytes
    for name, device in cuda.items():
        peaks[name] = int(torch.cuda.max_memory_allocated(device))
    gathered: list[dict] = [{} for _ in range(rank.world_size)]
    dist.all_gather_object(gathered, peaks)
    merged = {name: 0 for name in model.plan.devices}
    for share in gathered:
        merged.update(share)
    return summarize(slowest.cpu().tolist(), merged)
