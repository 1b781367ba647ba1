"""Train with a plan whose devices are owned by torch.distributed ranks: each rank runs
the chunks on its devices, activations and gradients cross ranks point-to-point.

    # one host, two ranks (CPU: gloo; a plan over cuda:0,cuda:1: NCCL)
    torchrun --nproc-per-node 2 experiments/train_distributed.py --plan plan.json --steps 20
    # two hosts, one rank each (run on both; HOST0 reachable from HOST1)
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr HOST0 --master-port 29500 \\
        experiments/train_distributed.py --plan plan.json
    # no plan at hand: the model's fx graph is cut in two halves (--devices cpu:0,cpu:1)
    # not under torchrun: the script starts torchrun itself, one process per device
    .venv/bin/python experiments/train_distributed.py --quick
    # a pipeline on torch.distributed.pipelining: 4 micro-batches, 1F1B, one rank per stage
    .venv/bin/python experiments/train_distributed.py --backend pipelining --microbatches 4 --schedule 1f1b

Every rank builds the same model (load_workload seeds torch), takes the same batch,
and steps an optimizer over its own parameters only: optimizer state lives with its
parameters. With --checkpoint DIR each rank saves its share; rank 0 merges them
into a state_dict for the plain, unplaced model and shows that it gives the same loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from operator import attrgetter

import torch.distributed as dist
import torch.fx as fx
from torch import nn

from graphs.capture import node_params
from graphs.trace import trace_model
from graphs.workload import load_workload
from placer.distributed import (DistributedModel, PipelinedModel, init_from_env, merge_checkpoints, pipeline_stages,
                                save_checkpoint)
from placer.plan import Plan, load_plan, plan_from_assignment
from placer.runtime.processes import die_with_parent


def contiguous_plan(model: nn.Module, devices: Sequence[str], leaf_modules=(), workload: str = "",
                    inputs: tuple | None = None) -> Plan:
    """Cut the captured graph (torch.export on `inputs` where it can, else torch.fx)
    into len(devices) contiguous runs of nodes, one per device (a pipeline); nodes that
    share a parameter go with its first reader, a get_attr node with its first user.
    Nodes are matched by position, so a capture that names its constants anew each
    time (fx's `_tensor_constantN`) cuts the same way."""
    gm = trace_model(model, leaf_modules=leaf_modules, inputs=inputs).gm
    nodes = list(gm.graph.nodes)
    body = [n for n in nodes if n.op != "get_attr"]
    device_of, first_reader = {}, {}
    for i, node in enumerate(body):
        device = devices[i * len(devices) // len(body)]
        for name in node_params(gm, node):
            device = first_reader.setdefault(id(attrgetter(name)(gm)), device)
        device_of[node] = device
    for node in nodes:
        if node.op == "get_attr":
            device_of[node] = device_of[next(iter(node.users))] if node.users else devices[0]
    by_position = [device_of[n] for n in nodes]
    positions: dict[fx.Graph, dict[fx.Node, int]] = {}

    def assign(node: fx.Node) -> str:
        index = positions.setdefault(node.graph, {n: i for i, n in enumerate(node.graph.nodes)})
        return by_position[index[node]]

    return plan_from_assignment(model, assign, list(devices), inputs=inputs, leaf_modules=leaf_modules,
                                method="contiguous", workload=workload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="zoo:transformer")
    parser.add_argument("--plan", default=None, help="plan.json (default: the graph cut in contiguous halves)")
    parser.add_argument("--devices", default="cpu:0,cpu:1", help="devices of the plan made here")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint", default=None, help="directory for each rank's share of the state_dict")
    parser.add_argument("--quick", action="store_true", help="three steps: a check that it runs")
    parser.add_argument("--backend", choices=["distributed", "pipelining"], default="distributed",
                        help="distributed: any plan, one rank per device; pipelining: a plan whose devices form "
                             "a pipeline, on torch.distributed.pipelining, one rank per stage")
    parser.add_argument("--microbatches", type=int, default=None, help="pipelining: micro-batches (default: the plan's)")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default=None,
                        help="pipelining: the schedule (default: the plan's, else gpipe)")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    workload = load_workload(args.workload)
    plan = load_plan(args.plan) if args.plan else contiguous_plan(
        workload.fresh_model(), args.devices.split(","), workload.leaf_modules, args.workload, workload.inputs)
    pipelined = args.backend == "pipelining"
    if "RANK" not in os.environ:  # not launched by torchrun: be torchrun, one local rank per device (or stage)
        from torch.distributed.run import main as torchrun
        n_ranks = pipeline_stages(workload, plan, args.microbatches, args.schedule) if pipelined else len(plan.devices)
        torchrun(["--standalone", "--nproc-per-node", str(n_ranks), __file__, *sys.argv[1:]])
        return
    die_with_parent(os.getppid())  # no rank outlives torchrun

    # --- the user's own loop, on a distributed placement --------------------------
    rank = init_from_env(plan)  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    if pipelined:
        model = PipelinedModel(workload.fresh_model(), plan, workload.inputs, args.microbatches, args.schedule,
                               loss_fn=workload.loss_fn)
    else:
        model = DistributedModel(workload.fresh_model(), plan, workload.inputs)
    params = model.parameters()  # this rank's share
    optimizer = workload.make_optimizer(params) if params else None
    for step in range(1, steps + 1):
        start = time.perf_counter()
        model.zero_grad()
        loss = model.train_step(workload.inputs, workload.loss_fn)
        if optimizer is not None:
            optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss:.8f} {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)

    if args.checkpoint:
        save_checkpoint(model, args.checkpoint)
        dist.barrier()
        if rank == 0:
            unplaced = workload.fresh_model()
            unplaced.load_state_dict(merge_checkpoints(args.checkpoint))
            loss = workload.loss_fn(unplaced(*workload.inputs), *workload.inputs)
            print(f"unplaced model from the merged checkpoint: loss {loss.item():.8f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
