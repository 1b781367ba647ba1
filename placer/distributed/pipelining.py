"""Run a plan whose devices form a pipeline on torch.distributed.pipelining: one
rank per device, each a `PipelineStage` built from placer's own split of the traced
graph (stages.py: the manual stage frontend, not pipelining's export-based tracer),
micro-batches scheduled by `ScheduleGPipe` or `Schedule1F1B`.

    plan = placer.load_plan("plan.json")                   # microbatches=4, schedule="1f1b"
    init_from_env(plan)                                    # torchrun: one rank per stage
    model = PipelinedModel(workload.fresh_model(), plan, workload.inputs, loss_fn=workload.loss_fn)
    optimizer = torch.optim.AdamW(model.parameters())      # this stage's parameters
    loss = model.train_step(workload.inputs); optimizer.step()

[Note: the loss inside the schedule]
1F1B starts a micro-batch's backward before the last forward, so the loss must be
computed inside the schedule, per micro-batch, on the last stage (the schedule's
`loss_fn`). placer's loss is `loss_fn(output, *inputs)` over the whole batch; the
schedule's is `loss_fn(output, target)` over one micro-batch. The target handed to
the schedule is `arange(batch)`: split like the inputs, it tells the last stage which
rows a micro-batch holds, and the last stage takes those rows of the batch inputs
(every rank holds the whole batch). Each micro-batch's loss is weighted so that
their sum is the batch's: 1/m for a loss that averages over the batch, 1 for one that
sums. Which one, `plan_pipeline` finds before any rank starts: the loss of the
example batch's output (its micro-batches' outputs gathered, so that only the loss's
own reduction is judged, not the model's), without gradients and with random numbers
held fixed, must equal the mean or the sum of its micro-batches' losses; any other
loss (normalized by a count that differs between micro-batches, such as unpadded
tokens) is refused, because no weight would make the step the full batch's. Each
step checks it again on its own batch (`train_step`), from the gathered outputs. Gradients are not rescaled by the schedule
(`scale_grads=False` where torch has the option).

[Note: model inputs on every stage]
Each stage receives the model inputs it reads as keyword arguments of the schedule's
`step`, which splits them into micro-batches alongside the first stage's, so a stage
deep in the pipeline still sees its micro-batch of, say, an attention mask without
it being sent stage to stage. Which inputs are batch-sized, and along which
dimension, is the in-process engine's rule (placer.runtime.microbatch.split, along
the plan's `batch_dims`); the others are handed whole to every micro-batch. So are
its refusals (placer.runtime.refusals, the same calls): micro-batches that would
change what the model computes (batch norm in training, buffers updated in forward,
and what the engine's probe of the model on 2-3 rows finds: a reduction over the
batch, rows mixed along the split dimension) are refused unless the plan accepts
per-micro-batch statistics (`microbatch_statistics`), an output without a batch
dimension always. `plan_pipeline` probes on the host, before any rank starts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.devices import Cluster, Device
from graphs.errors import PlanError
from graphs.trace import Traced
from graphs.trace_inputs import input_names, placeholder_dims
from placer.distributed.schedule import TensorMeta, ValueMeta, describe
from placer.distributed.share import RankShare, bind, check_shapes, chunk_reads, eager_output, rank_cluster
from placer.distributed.stages import Pipeline, Stage, split_stages
from placer.plan import Plan, load_plan, trace_for_plan
from placer.runtime import microbatch
from placer.runtime.microbatch import ONE_MICROBATCH
from placer.runtime.refusals import checked_layout, refuse_static
from placer.runtime.tensors import localize, tensor_readers, written_tensors
from placer.runtime.values import map_tensors, move, receive

__all__ = ["PipelinedModel", "PipelineSpec", "plan_pipeline", "SCHEDULES"]

LossFn = Callable[..., torch.Tensor]
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
"""Schedule name -> its class in torch.distributed.pipelining, imported where a stage is
built (importing pipelining takes seconds; a rank of the other backend never needs it)."""


@dataclass(frozen=True)
class PipelineSpec:
    """A plan checked and cut for the pipelining backend (what every rank knows alike)."""

    traced: Traced  # the plan's training capture
    pipeline: Pipeline
    meta: dict[str, ValueMeta]  # every value between stages or out of the last, at micro-batch size
    microbatches: int
    schedule: str  # a key of SCHEDULES
    batch: int  # rows of the example batch
    dims: dict[str, int]  # batch-sized model input -> the dimension it is split along
    loss_scale: float | None = None  # each micro-batch's loss weight (1/m mean, 1 sum); None: no loss checked
    output_dims: dict[str, list[int | None]] | None = None  # each output leaf's batch dimension (m > 1)


def plan_pipeline(model: nn.Module, plan: Plan, example_inputs: Sequence[torch.Tensor],
                  microbatches: int | None = None, schedule: str | None = None,
                  batch_dims: Mapping[str, int | None] | None = None,
                  microbatch_statistics: bool | None = None, loss_fn: LossFn | None = None) -> PipelineSpec:
    """Check `plan` for the pipelining backend and cut it into stages (no process
    group needed: the launcher calls it before starting ranks, every rank again).

    Parameters
    ----------
    microbatches, schedule
        Micro-batches per step and "gpipe" or "1f1b"; None: the plan's fields (1 and
        "gpipe" for a plan without them).
    batch_dims, microbatch_statistics
        The workload's: forward input -> its batch dimension (default 0; None: never
        split), and whether per-micro-batch statistics are acceptable
        (placer.runtime.microbatch); None: the plan's fields.
    loss_fn
        The training loss, `loss_fn(output, *inputs)`: with micro-batches, checked for
        how its micro-batches' losses make the batch's (`PipelineSpec.loss_scale`).

    Raises
    ------
    PlanError
        The plan was made for another model, is no pipeline, hands on a value
        pipelining cannot send, the batch does not split into `microbatches` equal
        parts, micro-batches would change what the model computes (as the
        in-process engine refuses them: placer.runtime.refusals), or the batch's loss
        is neither the mean nor the sum of its micro-batches'; one line each, with the
        fix.
    """
    source = plan.source
    traced = trace_for_plan(model, plan)
    gm = traced.gm
    pipeline = split_stages(gm, gm.graph, plan.assignment, source)
    m = microbatches or plan.microbatches
    batch_dims = placeholder_dims(traced, plan.batch_dims if batch_dims is None else batch_dims)
    microbatch_statistics = plan.microbatch_statistics if microbatch_statistics is None else microbatch_statistics
    name = (schedule or plan.schedule or "gpipe").lower()
    if name not in SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    if name == "1f1b" and m < len(pipeline.stages):
        raise PlanError(f"1F1B needs at least as many micro-batches as stages ({len(pipeline.stages)}), got {m}: "
                        f"raise the micro-batch count or use gpipe")
    if m > 1:
        refuse_static(gm.graph, gm, source, microbatch_statistics)
    batch, names = bind(traced, example_inputs), input_names(traced)
    split = microbatch.split(batch, m, batch_dims, names)
    if len(split.sizes) != m or len(set(split.sizes)) > 1:
        raise PlanError(f"a batch of {sum(split.sizes)} rows does not split into {m} equal micro-batches "
                        f"(pipelining's shapes are static): choose a micro-batch count that divides it")
    scale = 1.0 if m == 1 else None
    if m > 1:  # the in-process engine's probe, on the host (the model is not placed yet)
        chunks = [s.chunk for s in pipeline.stages]
        layout = checked_layout(chunks, [torch.device("cpu")] * len(chunks), batch, split.dims, pipeline.output_nodes,
                                source, microbatch_statistics, names,
                                marked=[p for p, d in batch_dims.items() if d is None])
        if loss_fn is not None:
            scale = _loss_scale(traced, pipeline, batch, split, layout, example_inputs, loss_fn, source)
    meta = _propagate_shapes(gm, pipeline, split.inputs[0])
    _check_sendable(pipeline, meta, source)
    return PipelineSpec(traced=traced, pipeline=pipeline, meta=meta, microbatches=m, schedule=name,
                        batch=sum(split.sizes), dims=split.dims, loss_scale=scale,
                        output_dims=layout.output_dims if m > 1 else None)


def _loss_scale(traced: Traced, pipeline: Pipeline, batch: Mapping[str, object], split: microbatch.Split,
                layout: microbatch.Layout, example_inputs: Sequence[torch.Tensor], loss_fn: LossFn,
                source: str) -> float:
    """The weight of each micro-batch's loss that makes their sum the batch's: 1/m when
    the loss of the gathered output is the mean of the m micro-batches' losses, 1 when
    it is their sum (module Note). Raises PlanError for any other loss."""
    chunks = [s.chunk for s in pipeline.stages]
    placeholder_of = {id(x): name for name, x in batch.items()}
    rows = split.sizes[0]
    runs = [microbatch.probe(chunks, [torch.device("cpu")] * len(chunks), batch, split.dims, rows, i * rows)
            for i in range(len(split.sizes))]
    gathered = {name: microbatch.gather([r.values[name] for r in runs], layout.output_dims[name])
                for name in pipeline.output_nodes}

    def loss(values: Mapping[str, object], inputs: Mapping[str, object]) -> torch.Tensor:
        out = eager_output(traced, pipeline.output, values)
        args = [inputs[placeholder_of[id(x)]] if id(x) in placeholder_of else x for x in example_inputs]
        with torch.no_grad(), torch.random.fork_rng():
            return loss_fn(out, *args).detach()

    whole = loss({**batch, **gathered}, batch)
    parts = [float(loss(r.values, r.values)) for r in runs]
    m = len(parts)
    mean, total = sum(parts) / m, sum(parts)
    rel = 1e-2 if whole.dtype in (torch.float16, torch.bfloat16) else 1e-4  # the loss's own rounding
    whole = float(whole)
    is_mean, is_sum = (math.isclose(whole, x, rel_tol=rel, abs_tol=1e-9) for x in (mean, total))
    if is_mean != is_sum:
        return 1.0 / m if is_mean else 1.0
    found = (f"equals both the mean and the sum of its {m} micro-batches' losses, so whether it averages or sums "
             f"cannot be told" if is_mean else
             f"is neither the mean ({mean:.6g}) nor the sum ({total:.6g}) of its {m} micro-batches' losses (a loss "
             f"normalized by a count that differs between micro-batches, such as unpadded tokens, or one that draws "
             f"random numbers?)")
    raise PlanError(f"{source}: the example batch's loss ({whole:.6g}) {found}; the pipelining backend computes the "
                    f"loss per micro-batch and weights each alike: use --backend local or distributed, which compute "
                    f"it on the whole batch, or {ONE_MICROBATCH}")


class PipelinedModel(RankShare):
    """This rank's stage of a plan run as a pipeline. Construct it on every rank of a
    group with one rank per stage (a collective: same model, seed, plan and example
    batch); then every rank calls `train_step` with the same batch and steps an
    optimizer over `parameters()`. `batch_dims` and `microbatch_statistics` default
    to the plan's (see `plan_pipeline`). `loss_fn(output, *inputs)` is the training
    loss `train_step` computes; with micro-batches it is required, and checked here
    for how its micro-batches' losses combine.

    Raises PlanError (one line) as `plan_pipeline` does, and when the group's size is
    not the number of stages.
    """

    def __init__(self, model: nn.Module, plan: Plan | str, example_inputs: Sequence[torch.Tensor],
                 microbatches: int | None = None, schedule: str | None = None, cluster: Cluster | None = None,
                 group: dist.ProcessGroup | None = None, batch_dims: Mapping[str, int | None] | None = None,
                 microbatch_statistics: bool | None = None, loss_fn: LossFn | None = None):
        super().__init__(model, group)
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        spec = plan_pipeline(model, self.plan, example_inputs, microbatches, schedule, batch_dims,
                             microbatch_statistics, loss_fn)
        if spec.loss_scale is None:
            raise PlanError(f"{self.plan.source}: with {spec.microbatches} micro-batches the pipelining backend "
                            f"computes the loss per micro-batch: give it to PipelinedModel(..., loss_fn=...), which "
                            f"checks how the micro-batches' losses make the batch's")
        self.loss_fn = loss_fn
        self.spec, self.pipeline, self.meta = spec, spec.pipeline, spec.meta
        stages = self.pipeline.stages
        if len(stages) != dist.get_world_size(group):
            raise PlanError(f"the plan is a pipeline of {len(stages)} stages ({', '.join(s.device for s in stages)}) "
                            f"but {dist.get_world_size(group)} ranks run it: start one rank per stage")
        self.stage: Stage = stages[self.rank]
        self.devices = _rank_devices(self.plan, stages, cluster)
        self.local_devices = {self.stage.device: self.devices[self.stage.device]}
        device = torch.device(self.devices[self.stage.device].torch_device)
        self.comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        written = set().union(*(written_tensors(s.chunk.module) for s in stages))
        readers = tensor_readers(model, chunk_reads(s.chunk for s in stages), self.plan.source, shared_buffers=True,
                                 written=written)
        owners = {s.device: (s.index, self.devices[s.device].torch_device) for s in stages}  # stage i on rank i
        self._place(readers, owners, default_device=stages[0].device)
        localize(model, self.stage.chunk.module, lambda node: device)  # after the shape pass on the host
        self.module = _StageModule(self.stage, self.meta, device, self.comm_device)
        self._build_schedule(len(stages))
        self._step_inputs: tuple = ()
        self._step_values: dict = {}  # placeholder -> value of this step's batch
        self._step_outputs: list[tuple[int, dict]] = []  # (first row, output node -> value) per micro-batch
        self._step_loss_fn: LossFn | None = None
        self.input_shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]

    def _build_schedule(self, n_stages: int) -> None:
        from torch.distributed import pipelining  # slow to import (seconds): only this backend's ranks need it
        from torch.distributed.pipelining.microbatch import TensorChunkSpec

        inputs = [x for name in self.stage.receives for x in _empty(self.meta[name])]
        outputs = [x for name in self.stage.sends for x in _empty(self.meta[name])]
        self.pipe_stage = pipelining.PipelineStage(self.module, self.stage.index, n_stages, self.comm_device,
                                                   input_args=tuple(inputs), output_args=tuple(outputs),
                                                   group=self.group)
        self._keywords = {f"input{i}": name for i, name in enumerate(self.stage.model_inputs) if name in self.spec.dims}
        cls = getattr(pipelining, SCHEDULES[self.spec.schedule])
        options = {"scale_grads": False} if "scale_grads" in inspect.signature(cls.__init__).parameters else {}
        if any(self.spec.dims[name] for name in self._keywords.values()):
            options["kwargs_chunk_spec"] = {k: TensorChunkSpec(self.spec.dims[name]) for k, name in self._keywords.items()}
        self.schedule = cls(self.pipe_stage, self.spec.microbatches, loss_fn=self._microbatch_loss, **options)
        self._step_options = {"return_outputs": False} if "return_outputs" in inspect.signature(cls.step).parameters \
            else {}

    # -- a training step -------------------------------------------------------------

    def train_step(self, inputs: Sequence[torch.Tensor], loss_fn: LossFn | None = None) -> float:
        """Forward, loss and backward of one batch, pipelined in micro-batches over all
        ranks (every rank calls it with the same batch). Gradients accumulate in this
        rank's parameters' .grad. Returns the batch's loss on every rank. `loss_fn`:
        the one the model was built with (None: that one); another only without
        micro-batches.

        Raises PlanError for a batch of other shapes than the example batch's (the
        pipeline's shapes are static), for no loss_fn at all, for another loss with micro-batches,
        and PlanError on every rank, after the step, when this batch's loss is not what
        its micro-batches' weighted losses make (checked on the last stage from their
        gathered outputs: a masked mean whose counts differ between micro-batches here
        though not in the example batch): its gradients are then wrong, so zero them."""
        if loss_fn is None or loss_fn == self.loss_fn:  # == : a bound method is made anew on each access
            loss_fn = self.loss_fn
        elif self.spec.microbatches > 1:
            raise PlanError("with micro-batches, train_step takes the loss_fn the PipelinedModel was built with "
                            "(checked for how its micro-batches' losses combine): pass that one, or none")
        if loss_fn is None:  # PlanError, as the constructor's for a loss it needs (a caller catches one type)
            raise PlanError(f"{self.plan.source}: train_step needs a loss_fn: pass one, or give it to "
                            f"PipelinedModel(..., loss_fn=...)")
        check_shapes(inputs, self.input_shapes, "the pipeline")
        self._step_inputs, self._step_loss_fn = tuple(inputs), loss_fn
        self._step_values = values = bind(self.spec.traced, inputs)
        self.module.keywords = self._keywords
        self.module.whole = {n: values[n] for n in self.stage.model_inputs if n not in self.spec.dims}
        split = {k: values[name] for k, name in self._keywords.items()}
        losses: list[torch.Tensor] = []
        self._step_outputs = []
        with self.count_saved(self.stage.device):
            self.schedule.step(**split, target=torch.arange(self.spec.batch), losses=losses, **self._step_options)
        total = float(sum(x.detach().float().sum() for x in losses)) if losses else 0.0
        whole, rel = self._whole_loss(loss_fn) if losses and self.spec.microbatches > 1 else (total, 0.0)
        loss = torch.tensor([total, whole, rel], dtype=torch.float64, device=self.comm_device)
        dist.broadcast(loss, self.global_rank(len(self.pipeline.stages) - 1), group=self.group)
        total, whole, rel = loss.tolist()
        if math.isfinite(whole) and not math.isclose(total, whole, rel_tol=rel, abs_tol=1e-9):  # nan: the caller's
            raise PlanError(f"{self.plan.source}: this batch's loss ({whole:.6g}) is not what its micro-batches' "
                            f"weighted losses make ({total:.6g}), as it was on the example batch (a loss normalized by "
                            f"a count that differs between micro-batches here?): this step's gradients are wrong; "
                            f"zero them, and train this loss with --backend local or distributed, or {ONE_MICROBATCH}")
        return total

    def _whole_loss(self, loss_fn: LossFn) -> tuple[float, float]:
        """The loss of this step's batch from its micro-batches' outputs, gathered (last
        stage), and the relative tolerance of its dtype."""
        parts = [values for _, values in sorted(self._step_outputs, key=lambda item: item[0])]
        gathered = {name: microbatch.gather([p[name] for p in parts], self.spec.output_dims[name]) for name in parts[0]}
        out = eager_output(self.spec.traced, self.pipeline.output, {**self._step_values, **gathered})
        with torch.no_grad(), torch.random.fork_rng():
            loss = loss_fn(out, *self._step_inputs)
        return float(loss), 1e-2 if loss.dtype in (torch.float16, torch.bfloat16) else 1e-4

    def _microbatch_loss(self, output: tuple, rows: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one micro-batch (see the module's Note), on the last stage."""
        batch = {name: self._rows(name, x, rows) for name, x in self._step_values.items()}
        leaves = iter(output if isinstance(output, tuple) else (output,))
        values = {name: batch[name] if name in batch else _rebuild(self.meta[name], leaves)
                  for name in self.pipeline.output_nodes}
        self._step_outputs.append((int(rows[0]), {name: map_tensors(torch.Tensor.detach, v)
                                                  for name, v in values.items() if name not in batch}))
        out = eager_output(self.spec.traced, self.pipeline.output, values)
        placeholder_of = {id(x): name for name, x in self._step_values.items()}
        inputs = [batch[placeholder_of[id(x)]] if id(x) in placeholder_of else x for x in self._step_inputs]
        return self._step_loss_fn(out, *inputs) * self.spec.loss_scale

    def _rows(self, name: str, x, rows: torch.Tensor):
        """The rows of input `name` that a micro-batch holds (all of a non-batch input)."""
        return x.index_select(self.spec.dims[name], rows.to(x.device)) if name in self.spec.dims else x


class _StageModule(nn.Module):
    """One stage's forward as pipelining calls it: the received tensor leaves
    positionally, this stage's batch inputs (one micro-batch) as keywords; returns the
    tensor leaves of what it hands on. The chunk's module is registered, so the
    stage's parameters are this module's."""

    def __init__(self, stage: Stage, meta: dict[str, ValueMeta], device: torch.device, comm: torch.device):
        super().__init__()
        self.stage = stage
        self.chunk = stage.chunk.module
        self.meta = meta
        self.device = device
        self.comm = comm
        self.whole: dict = {}  # model inputs handed whole to every micro-batch (set per step)
        self.keywords: dict[str, str] = {}  # keyword -> placeholder name

    def forward(self, *received: torch.Tensor, **batch_inputs) -> tuple[torch.Tensor, ...]:
        values = dict(self.whole)
        values.update({self.keywords[k]: v for k, v in batch_inputs.items()})
        leaves = iter(received)
        for name in self.stage.receives:
            values[name] = _rebuild(self.meta[name], leaves)
        chunk = self.stage.chunk
        args = [receive(values[name], self.device, detach=False, copy=name in chunk.mutated_inputs)[0]
                for name in chunk.inputs]
        values.update(zip(chunk.outputs, self.chunk(*args)))
        return tuple(move(x, self.comm).contiguous() for name in self.stage.sends
                     for x in tree_flatten(values[name])[0] if isinstance(x, torch.Tensor))


# -- set-up helpers ----------------------------------------------------------------------

def _rank_devices(plan: Plan, stages: list[Stage], cluster: Cluster | None) -> dict[str, Device]:
    """Plan device name -> Device. Stage i runs on rank i; a plan that names owners
    (`rankR:`) must name stage i's device rank i."""
    cluster = rank_cluster(plan, len(plan.devices), cluster)
    devices = dict(zip(plan.devices, cluster.devices))
    if plan.devices[0].startswith("rank"):
        wrong = [(s.index, s.device) for s in stages if devices[s.device].rank != s.index]
        if wrong:
            raise PlanError(f"pipeline stage {wrong[0][0]} runs on {wrong[0][1]}, but the pipelining backend runs stage "
                            f"i on rank i: name that device rank{wrong[0][0]}:...")
    return devices


def _propagate_shapes(gm: nn.Module, pipeline: Pipeline, inputs: dict) -> dict[str, ValueMeta]:
    """Run the stages once on the host over one micro-batch's `inputs` (placeholder ->
    value) and describe every value that crosses a stage boundary or leaves the last
    stage. Buffers and the RNG are restored afterwards."""
    values = dict(inputs)
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for stage in pipeline.stages:
            chunk = stage.chunk
            args = [receive(values[n], torch.device("cpu"), detach=True, copy=n in chunk.mutated_inputs)[0]
                    for n in chunk.inputs]
            values.update(zip(chunk.outputs, chunk.module(*args)))
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    wanted = pipeline.values_between() + [n for n in pipeline.output_nodes if n not in pipeline.placeholders]
    return {name: describe(values[name]) for name in wanted}


def _check_sendable(pipeline: Pipeline, meta: dict[str, ValueMeta], source: str) -> None:
    """Every tensor a stage hands on must be a floating-point activation with a gradient
    (stages.py's Note); other values are constants of the shape pass."""
    for stage in pipeline.stages[:-1]:
        for name in stage.sends:
            bad = [leaf for leaf in meta[name].leaves if isinstance(leaf, TensorMeta)
                   and not (leaf.dtype.is_floating_point and leaf.requires_grad)]
            if bad:
                raise PlanError(f"{source}: value {name!r} ({bad[0].dtype}, no gradient) flows from stage {stage.index} "
                                f"({stage.device}) onward, and torch.distributed.pipelining sends only activations "
                                f"with gradients; run it with --backend distributed")


def _empty(meta: ValueMeta) -> list[torch.Tensor]:
    """Meta tensors standing for a value's tensor leaves (pipelining's static shapes)."""
    return [torch.empty(leaf.shape, dtype=leaf.dtype, device="meta").requires_grad_(leaf.requires_grad)
            for leaf in meta.leaves if isinstance(leaf, TensorMeta)]


def _rebuild(meta: ValueMeta, tensors) -> object:
    """A value from its tensor leaves (taken in order from the iterator `tensors`) and
    the constants of the shape pass."""
    return tree_unflatten([next(tensors) if isinstance(leaf, TensorMeta) else leaf for leaf in meta.leaves], meta.spec)
