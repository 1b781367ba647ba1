"""The pipeline heuristic: contiguous stages, one per device, balanced by forward and
backward time under the memory caps, with the number of micro-batches the simulator
finds fastest (GPipe: Huang et al. 2019, "GPipe: Efficient Training of Giant Neural
Networks using Pipeline Parallelism").

torchgpipe's `balance_by_time` (Kim et al. 2020) times each layer and cuts the
sequence so that partitions take about equal time, on equal devices. Here:

- the sequence is the groups in id order (a topological order), and a stage's cost
  is its groups' profiled forward + backward time *on the device that runs it*, so
  a GPU stage takes more groups than a CPU stage;
- the cut is an exact min-max split (baselines.common.contiguous_split: the slowest
  stage as fast as it can be, to float precision) under each device's memory cap,
  where activations count every micro-batch in flight (PlacementProblem.
  activation_factor);
- on unlike devices every order in which stages may meet the devices is tried;
- each micro-batch count m the profile knows (else 1, 2, 4, 8) is simulated
  (envs.sim, GPipe with the profile's micro-batch costs) and the fastest
  (placement, m) returned. The optimizer step is left out of the balance: it runs
  after the whole backward, on every device at once.

A parameter stays on one device with all its readers (graphs.capture.node_params),
which `repair` restores after the cut. A model whose first and last layers read one
parameter (a language model's tied embedding and output weights) then has its first
and last stage on one device, and its values flow back to it: a plan that the
simulator and the local runtime run micro-batched (GPipe over the chunk graph, any
order of devices), but no chain of stages, which is what the pipelining backend needs
(torch.distributed.pipelining hands values from stage i to stage i+1 only;
placer.distributed.stages refuses such a plan, naming the parameter). No split over
several devices of such a model is a chain, so the heuristic does not look for one.
"""

from __future__ import annotations

import numpy as np

from envs.sim import Simulator, microbatch_tables
from graphs.devices import format_size
from graphs.errors import InfeasibleError
from graphs.problem import Candidate, PlacementProblem
from placer.baselines.common import capacities, contiguous_split
from placer.baselines.repair import repair
from placer.baselines.simple import _device_orders

__all__ = ["pipeline", "microbatch_choices", "interleaved_stages"]

DEFAULT_MICROBATCHES = (1, 2, 4, 8)


def microbatch_choices(problem: PlacementProblem) -> list[int]:
    """The micro-batch counts worth trying: those the profile timed on some kind of the
    cluster (the simulator refuses a count on a kind that lacks it), else 1, 2, 4, 8;
    never more than the batch has rows."""
    known = sorted(set().union(*(t for t in microbatch_tables(problem).values() if t)))
    choices = known if len(known) > 1 else list(DEFAULT_MICROBATCHES)
    rows = problem.batch_size
    return [m for m in choices if rows is None or m <= rows]


def pipeline(problem: PlacementProblem, seed: int = 0) -> Candidate:
    """Contiguous stages balanced by forward + backward time under the memory caps,
    and the micro-batch count that the simulator finds fastest for them.

    Parameters
    ----------
    problem : PlacementProblem
        Grouped graph (groups in a topological order) and cluster.
    seed : int
        Unused: the heuristic is deterministic (the baselines' signature).

    Returns
    -------
    Candidate
        The placement (group -> device index) and its number of micro-batches.

    Raises
    ------
    InfeasibleError
        When no contiguous split fits the memory caps for any micro-batch count.
    """
    c = problem.costs
    times = c.fwd_ms + c.bwd_ms
    caps = capacities(problem)
    simulator = Simulator(problem)
    best: tuple[float, Candidate] | None = None
    for m in microbatch_choices(problem):
        memory = c.param_bytes + c.grad_bytes + c.opt_bytes + c.act_bytes * problem.activation_factor(m)
        for order in _device_orders(problem):
            blocks = contiguous_split(times[:, order], memory, caps[order])
            if blocks is None:
                continue
            placement = repair(problem, np.asarray(order)[blocks])  # colocation may cut across stages
            result = simulator.simulate(placement, microbatches=m)
            if result.feasible and (best is None or result.step_ms < best[0]):
                best = (result.step_ms, Candidate(tuple(int(d) for d in placement), m))
    if best is None:
        need = float((c.memory_bytes).sum())
        raise InfeasibleError(f"no contiguous split into stages fits the devices' memory ({problem.cluster.spec()}; "
                              f"the model needs {format_size(need)} in all): raise the caps or use a non-pipelined method")
    return best[1]


def interleaved_stages(problem: PlacementProblem, chunks: int, microbatches: int) -> Candidate:
    """Megatron-LM's interleaved stages (Narayanan et al. 2021, "Efficient Large-Scale Language
    Model Training on GPU Clusters Using Megatron-LM"): the groups, in id order (a topological
    order), cut into chunks x devices contiguous stages of about equal forward + backward time on
    device 0's kind, stage i on device i mod devices. Each device then holds `chunks` smaller
    stages in round-robin order, which shortens the pipeline's fill and drain (the bubble) at the
    cost of more crossings. The cut is the min-max one (`contiguous_split`): a group slower than a
    stage's share sets the bottleneck, and stages after the last needed one stay empty.

    Not a heuristic of its own (measured on two devices it gained 1.04-1.06x over `pipeline` at
    best, docs/results.md "Interleaved stages"): RL's first round starts from these plans, and
    experiments/probe_interleave.py measures them. Memory caps are not checked (a plan that does
    not fit scores inf); colocation is kept (`repair`).

    Returns the Candidate: placement [groups] device index, and `microbatches`.
    """
    times = problem.costs.fwd_ms[:, 0] + problem.costs.bwd_ms[:, 0]
    stages = chunks * problem.n_devices
    blocks = contiguous_split(np.repeat(times[:, None], stages, axis=1), np.zeros(len(times)), np.full(stages, np.inf))
    placement = repair(problem, np.asarray(blocks) % problem.n_devices)  # colocation may cut across stages
    return Candidate(tuple(int(d) for d in placement), microbatches)
