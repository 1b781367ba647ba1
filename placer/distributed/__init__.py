"""placer on torch.distributed: a plan run with each device owned by a rank
(backend.py, any plan), a plan whose devices form a pipeline run on
torch.distributed.pipelining (pipelining.py, one rank per stage, micro-batches by
GPipe or 1F1B), the ranks started by torchrun or spawned here (launch.py). (Parallel
measurement by worker processes is placer.runtime.pool.)

Inside a torchrun-launched script (experiments/train_distributed.py):

    plan = placer.load_plan("plan.json")
    init_from_env(plan)
    model = DistributedModel(workload.fresh_model(), plan, workload.inputs)   # or PipelinedModel(..., loss_fn=...)
    optimizer = torch.optim.AdamW(model.parameters())   # this rank's parameters
    loss = model.train_step(workload.inputs, workload.loss_fn); optimizer.step()
"""

from placer.distributed.backend import DistributedModel
from placer.distributed.checkpoint import merge_checkpoints, save_checkpoint
from placer.distributed.launch import (LocalRank, Pipelined, RankFailed, distributed_model, init_from_env,
                                       measure_distributed, measure_pipelined, pipeline_stages, run_local,
                                       train_distributed, train_pipelined, train_step, world_size_of)
from placer.distributed.pipelining import PipelinedModel
from placer.distributed.share import rank_cluster

__all__ = ["DistributedModel", "PipelinedModel", "merge_checkpoints", "save_checkpoint", "rank_cluster", "LocalRank",
           "RankFailed", "Pipelined", "distributed_model", "init_from_env", "measure_distributed", "measure_pipelined", "pipeline_stages", "run_local",
           "train_distributed", "train_pipelined", "train_step", "world_size_of"]
