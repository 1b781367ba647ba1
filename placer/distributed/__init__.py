"""placer on torch.distributed: a plan run with each device owned by a rank
(backend.py), the ranks started by torchrun or spawned here (launch.py), and many
placements measured at once by a pool of worker processes (pool.py).

Inside a torchrun-launched script (experiments/train_distributed.py):

    plan = placer.load_plan("plan.json")
    init_from_env(plan)
    model = DistributedModel(workload.fresh_model(), plan, workload.inputs)
    optimizer = torch.optim.AdamW(model.parameters())   # this rank's parameters
    loss = model.train_step(workload.inputs, workload.loss_fn); optimizer.step()
"""

from placer.distributed.backend import DistributedModel, merge_checkpoints, rank_cluster, save_checkpoint
from placer.distributed.launch import (LocalRank, RankFailed, init_from_env, measure_distributed, run_local,
                                       train_distributed, train_step, world_size_of)
from placer.distributed.pool import MeasurementPool, WorkerStartError

__all__ = ["DistributedModel", "merge_checkpoints", "save_checkpoint", "rank_cluster", "LocalRank", "RankFailed",
           "init_from_env", "measure_distributed", "run_local", "train_distributed", "train_step", "world_size_of",
           "MeasurementPool", "WorkerStartError"]
