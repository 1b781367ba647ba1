"""Micro-batches (GPipe: Huang et al. 2019, "GPipe: Efficient Training of Giant
Neural Networks using Pipeline Parallelism"): split a batch, gather the outputs,
and refuse models that micro-batches would change.

The executor runs the forward of every micro-batch, gathers the outputs into one
batch, and runs the backward of every micro-batch when autograd asks for it, so a
user's `loss_fn(placed(x)).backward()` is unchanged. Because the loss is computed on
the gathered output, its gradient is the full batch's whatever its reduction (mean,
sum, a weighting): each micro-batch's backward receives its slice of that gradient
and the parameters' gradients accumulate to the full batch's (up to float rounding).

What micro-batches do change, and so what is refused unless the workload accepts
per-micro-batch statistics (`microbatch_statistics = True`):

- layers that compute over the batch: BatchNorm in training; any reduction across
  the batch inside the model (x.mean(), x.sum(0), x[0]), or mixing of its rows that
  keeps the shape (softmax over the batch);
- buffers (or parameters, as Embedding's max_norm renormalizes) updated in forward:
  they would be updated once per micro-batch;
- and, always refused, an output without a batch dimension (a loss computed inside
  the model): micro-batches' values of it cannot be put back together.

The batch-level checks run the model on a few rows (`probe`: no gradient, random
generators and buffers restored after): on 2 and 3 rows a dimension whose size
follows the number of rows is a batch dimension, and a node whose inputs have one
and whose output has none reduced over the batch. Values are compared too: the
outputs of rows 0-1 and of rows 1-2, each run alone, must be those rows of the
3-row outputs, else the model mixes values along the split dimension without
changing shapes (softmax over the batch; a running mean, RNN or attention over time
when a batch-second model is split along its steps: name its batch dimension in
`batch_dims`). The probe holds random numbers fixed (dropout keeps every value;
other draws return constants), so dropout does not read as mixing; a random op
with data inputs it cannot hold fixed (torch.bernoulli of probabilities, multinomial)
skips the value comparison, which `Layout.unchecked` says. Dropout draws other masks
than eager for the same seed (the random generator is used in another order).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphs.errors import PlanError
from graphs.schedule import written_state
from graphs.trace import module_label
from graphs.trace_inputs import BATCH_FREE, reads_inputs
from placer.runtime.chunks import _Lookup
from placer.runtime.probe import Probe, probe

__all__ = ["Split", "split_dims", "split", "gather", "split_grads", "join_grads", "Reader", "ONE_MICROBATCH",
           "accepting", "static_refusal", "leaf_refusal", "Layout", "layout", "Probe", "probe", "batch_layout"]

Reader = Literal["plan", "workload"]
"""Who reads a refusal, and so what its advice may name: whoever holds a plan
(placer.apply and the backends read only the plan: its `microbatches` and
`microbatch_statistics`) or a workload's author (placer optimize's note: optimize keeps
one micro-batch itself for a model it refuses; the workload's `microbatch_statistics`)."""

# The one wording of each fix a refusal offers (new-user trial 10: advice naming a field the reader does not hold)
ONE_MICROBATCH = "set the plan's microbatches to 1 (the same placement, one micro-batch)"


def accepting(reader: Reader, what: str = "statistics per micro-batch") -> str:
    """The advice ending a refusal that `microbatch_statistics` lifts, for `reader`;
    `what` is what the flag accepts (batch statistics, an update of a parameter)."""
    if reader == "plan":
        return f"{ONE_MICROBATCH} or its microbatch_statistics to true ({what})"
    return f"set microbatch_statistics = True in the workload to accept {what}"


@dataclass(frozen=True)
class Split:
    """A batch split into micro-batches: `inputs[i]` are micro-batch i's placeholder
    values, `sizes[i]` its rows; `dims` the inputs that were split, and along which
    dimension (other inputs are handed to every micro-batch whole)."""

    inputs: list[dict[str, Any]]
    sizes: list[int]
    dims: dict[str, int]


def split_dims(inputs: Mapping[str, Any], batch_dims: Mapping[str, int | None],
               names: Mapping[str, str] | None = None) -> dict[str, int]:
    """The inputs a batch is split along and the dimension of each: every tensor input as
    long along its batch dimension (`batch_dims`, default 0) as the first is along its own,
    also one not batched but as long by chance, unless `batch_dims` maps it to None (such
    an input does not define the batch either); {} without a tensor input with dimensions.
    `inputs`, `batch_dims`: by placeholder; `names`: placeholder -> the forward input it
    holds (graphs.trace_inputs.input_names), as messages name inputs. Raises PlanError
    for a dimension an input lacks."""
    tensors = [(name, v) for name, v in inputs.items()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and batch_dims.get(name, 0) is not None]
    short = next(((n, v) for n, v in tensors if batch_dims.get(n, 0) >= v.dim()), None)
    if short is not None:
        raise PlanError(f"batch_dims names dimension {batch_dims[short[0]]} of input {_named(short[0], names)!r}, "
                        f"which has {short[1].dim()} (shape {list(short[1].shape)}): name the dimension its batch "
                        f"lies along")
    if not tensors:
        return {}
    name0, first = tensors[0]
    rows = first.shape[batch_dims.get(name0, 0)]
    return {name: batch_dims.get(name, 0) for name, v in tensors if v.shape[batch_dims.get(name, 0)] == rows}


def split(inputs: Mapping[str, Any], m: int, batch_dims: Mapping[str, int | None],
          names: Mapping[str, str] | None = None) -> Split:
    """Split every batch-sized tensor input (`split_dims`, which takes `names`) into at
    most `m` micro-batches with torch.chunk: equal sizes but the last, and fewer than
    `m` when the batch is small (4 rows in 3 -> 2, 2)."""
    dims = split_dims(inputs, batch_dims, names)
    name0 = next(iter(dims), None)
    if name0 is None or inputs[name0].shape[dims[name0]] == 0:  # nothing to split (an empty batch: one call)
        return Split([dict(inputs)], [0], {})
    pieces = {name: torch.chunk(inputs[name], m, dim) for name, dim in dims.items()}
    count = len(pieces[name0])
    parts = [{name: pieces[name][i] if name in pieces else v for name, v in inputs.items()} for i in range(count)]
    return Split(parts, [p.shape[dims[name0]] for p in pieces[name0]], dims)


def _named(placeholder: str, names: Mapping[str, str] | None) -> str:
    """The forward input a placeholder holds, as messages name it (`split_dims`)."""
    return (names or {}).get(placeholder, placeholder)


def gather(values: Sequence[Any], dims: Sequence[int | None]) -> Any:
    """One value from micro-batches' values: tensor leaf k concatenated along
    `dims[k]`; other leaves (equal in every micro-batch) taken from the first."""
    flats = [tree_flatten(v)[0] for v in values]
    spec = tree_flatten(values[0])[1]
    out = [torch.cat([f[k] for f in flats], dims[k]) if dims[k] is not None else flats[0][k]
           for k in range(len(flats[0]))]
    return tree_unflatten(out, spec)


def split_grads(output_grads: Mapping[str, list], sizes: Sequence[int],
                output_dims: Mapping[str, list[int | None]]) -> list[dict[str, list]]:
    """The gathered outputs' gradients (node -> one per tensor leaf) cut back into
    micro-batches of `sizes` rows along each leaf's batch dimension. Outputs without
    dimensions here (model inputs returned as they are) are left out."""
    per_micro: list[dict[str, list]] = [{} for _ in sizes]
    for name, grads in output_grads.items():
        if (dims := output_dims.get(name)) is None:
            continue
        pieces = [None if g is None else torch.split(g, list(sizes), dims[k]) for k, g in enumerate(grads)]
        for i in range(len(sizes)):
            per_micro[i][name] = [None if p is None else p[i] for p in pieces]
    return per_micro


def join_grads(per_micro: Sequence[torch.Tensor | None], pieces: Sequence[torch.Tensor], dim: int | None) -> torch.Tensor:
    """A model input's gradient from its micro-batches' (None: zero): concatenated
    along `dim` where the input was split into `pieces`, else summed."""
    if dim is None:
        return sum(g for g in per_micro if g is not None)
    return torch.cat([g if g is not None else torch.zeros_like(p) for g, p in zip(per_micro, pieces)], dim)


def _where(node: fx.Node) -> str:
    """The module a node belongs to, for messages."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    return module_label(node) or f"node '{node.name}'"


def static_refusal(graph: fx.Graph, root: nn.Module, source: str, extra_roots: Sequence[nn.Module] = (), *,
                   reader: Reader = "workload", leaves: bool = True) -> str | None:
    """Why micro-batches would change what the model computes, seen from the graph
    alone (batch norm in training, buffers or parameters updated in forward), with
    advice for `reader`; None if nothing.

    Parameters
    ----------
    graph : the capture's graph.
    root, extra_roots : the module the graph's targets name (the traced GraphModule,
        typically), and where targets `root` lacks are found (chunks.build_chunks).
    source : how the message names the plan or workload.
    reader : who reads the message (`Reader`): the workload's author by default
        (placer.microbatch_policy), "plan" for whoever holds a plan.
    leaves : also judge the modules the graph calls whole by their flags now
        (`leaf_refusal`); False where that is left to a call in the capture's mode.
    """
    root = _Lookup(root, extra_roots)
    reason = leaf_refusal(graph, root, source, reader) if leaves else None
    if reason:
        return reason
    for node in graph.nodes:  # a capture froze these in its mode (graphs.trace)
        if node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", ""):
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            if training is not False:
                return _batch_statistics(node, "", source, reader)
    for node in graph.nodes:  # after batch norm, whose num_batches_tracked update comes first and matters less
        for base in written_state(node, root):  # also through views, chains of updates and no_grad blocks
            parameter = isinstance(root.fetch(str(base.target)), nn.Parameter)  # Embedding's max_norm renormalizes
            return (f"{source}: {_where(node)} updates {'parameter' if parameter else 'buffer'} '{base.target}' in "
                    f"forward, which micro-batches would update once each; "
                    f"{accepting(reader, 'an update per micro-batch' if parameter else 'statistics per micro-batch')}")
    return None


def leaf_refusal(graph: fx.Graph, root: nn.Module, source: str, reader: Reader) -> str | None:
    """Why micro-batches would change a module the graph calls whole (an fx leaf, such
    as a BatchNorm listed in the workload's `leaf_modules`): batch norm in training now,
    with advice for `reader`; None if none is. Such a module reads its training flag
    when it runs, not when it was captured, so a call in the capture's mode (its first
    micro-batched call: refusals.checked_layout) judges it as it will run. `root`: the
    module the graph's targets name."""
    for node in graph.nodes:
        if node.op == "call_module":
            norms = [m for m in root.get_submodule(str(node.target)).modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
            if norms:
                return _batch_statistics(node, f" ({type(norms[0]).__name__})", source, reader)
    return None


def _batch_statistics(node: fx.Node, kind: str, source: str, reader: Reader) -> str:
    return (f"{source}: {_where(node)}{kind} computes batch statistics in training, over each micro-batch alone; "
            f"{accepting(reader)}")


@dataclass(frozen=True)
class Layout:
    """What `probe` learnt: the batch dimension of each output tensor leaf (None:
    not a tensor); `reduction`, why micro-batches would change the values (the
    first node that reduces over the batch, else an output whose rows mix along the
    split dimension; None if neither), refused unless the workload accepts
    per-micro-batch statistics; `unchecked`, why the values were not compared (a
    random op the probe cannot hold fixed; None when they were)."""

    output_dims: dict[str, list[int | None]]
    reduction: str | None
    unchecked: str | None = None


def _batch_dim(a: tuple, b: tuple, rows: tuple[int, int]) -> int | None:
    """The first dimension whose size follows the number of rows (a at rows[0], b at rows[1])."""
    if len(a) != len(b):
        return None
    for d, (x, y) in enumerate(zip(a, b)):
        if x != y and x * rows[1] == y * rows[0]:
            return d
    return None


def layout(chunks: Sequence[Any], devices: Sequence[torch.device], inputs: Mapping[str, Any],
           dims: Mapping[str, int], output_nodes: Sequence[str], source: str,
           names: Mapping[str, str] | None = None, marked: Collection[str] = ()) -> Layout:
    """The batch layout of a call: `probe` on rows [0:2], [0:3] and [1:3] ([0:1],
    [0:2], [1:2] for a smaller batch); shapes compared by `batch_layout`, then values
    (`Layout.reduction` says where rows [0:2] or [1:3] alone differ from those rows of
    the 3-row outputs, along each output's batch dimension).

    Parameters
    ----------
    chunks, devices : the placed graph's chunks in order and each one's torch device.
    inputs : placeholder -> value of the whole batch.
    dims : the inputs the batch splits, and along which dimension (`split_dims`).
    output_nodes : the nodes whose values the call returns.
    source : how error messages name the plan.
    names : placeholder -> the forward input it holds, as messages name inputs.
    marked : the placeholders the plan's batch_dims mark never split (None), which its
        advice never offers to mark again, nor blames on their length.

    Messages are for whoever holds the plan (`Reader`), as only the runtime calls this.

    Raises
    ------
    PlanError : the model fails on a smaller batch (it assumes a fixed batch size), an
        output has no batch dimension, or a non-tensor output depends on the batch.
    Exception : what the model raises on the whole batch too (a wrong dtype, say), as
        eager would raise it.
    """
    name = next(iter(dims))
    whole = [n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and n not in dims]
    differing = [n for n in whole if n not in marked]  # whole for their length, or as the plan's example had them
    rows = (2, 3) if inputs[name].shape[dims[name]] >= 3 else (1, 2)
    try:  # rows [0:2], [0:3] and [1:3] (or [0:1], [0:2], [1:2])
        runs = [probe(chunks, devices, inputs, dims, n, start)
                for n, start in ((rows[0], 0), (rows[1], 0), (rows[0], 1))]
    except PlanError:
        raise
    except Exception as exc:
        probe(chunks, devices, inputs, dims, inputs[name].shape[dims[name]])  # failing whole too: eager's error
        along = _listed((f"dimension {d} of input {_named(n, names)!r}" for n, d in dims.items()
                         if d and inputs[n].is_floating_point()))
        if differing:  # e.g. EmbeddingBag's flat indices with their offsets: no common batch dimension
            cut, kept = (_listed(repr(_named(n, names)) for n in group) for group in (dims, differing))
            why = (f"only {cut} was split ({inputs[name].shape[dims[name]]} rows along dimension {dims[name]}); "
                   f"{kept} went whole to every micro-batch, its length differing: name each input's batch "
                   f"dimension in batch_dims if they share one, else the model's inputs cannot be split.")
        elif len(dims) > 1:
            why = (f"{_inputs_split(dims, names)}: is one not batched, as long as the batch by chance? If so, "
                   f"{_not_batched(dims, names)}.")
        elif along:
            why = (f"the plan's capture may fix the batch's size along {along}: torch.export keeps it "
                   f"free only in a capture made with batch_dims naming it, so make the plan again from the workload.")
        elif whole:  # marked by the user: not to blame for their length, but maybe wrongly
            why = (f"does it assume a fixed batch size, or is {_listed(repr(_named(n, names)) for n in whole)}, "
                   f"which batch_dims mark never split (None), batched too?")
        else:
            why = "does it assume a fixed batch size?"
        raise PlanError(f"{source}: the model fails on a batch of {rows[0]} rows ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); {why} "
                        f"Otherwise, {ONE_MICROBATCH}") from exc
    nodes = [n for c in chunks for n in c.module.graph.nodes]
    split = (_named(name, names), dims[name])
    fix = _name_the_batch(split, inputs[name].dim(), [_named(n, names) for n in whole],
                          {_named(n, names) for n in whole if n in marked})
    found = batch_layout(nodes, output_nodes, [runs[0].shapes, runs[1].shapes], rows, fix, source)
    if not found.reduction:
        random = next((r.random for r in runs if r.random), None)
        if random:
            return replace(found, unchecked=f"{random} draws random numbers the probe cannot hold fixed: outputs' "
                                            f"values along the split dimension were not compared")
        found = replace(found, reduction=_mixing(output_nodes, found.output_dims, runs, rows, split, fix, source))
    if found.reduction and len(dims) > 1:  # an input split by chance looks like a reduction or mixing (trial 10)
        return replace(found, reduction=f"{source}: {_inputs_split(dims, names)}: if one is not batched but as "
                       f"long as the batch by chance, {_not_batched(dims, names)}, or {ONE_MICROBATCH}: "
                       f"its microbatch_statistics would not fix it. Otherwise: "
                       f"{found.reduction.removeprefix(source + ': ')}")
    return found


def _listed(phrases: Iterable[str]) -> str:
    """Phrases for a message, each once (a nested input's placeholders are named alike)."""
    return ", ".join(dict.fromkeys(phrases))


def _inputs_split(dims: Mapping[str, int], names: Mapping[str, str] | None) -> str:
    return "micro-batches split " + _listed(f"{_named(n, names)!r} along dimension {d}" for n, d in dims.items())


def _not_batched(dims: Mapping[str, int], names: Mapping[str, str] | None) -> str:
    """How to keep one of the split inputs whole that is only as long as the batch by
    chance (new-user trial 10): None in batch_dims, which needs no new capture, or an
    example batch of another size (an input the plan's example has not batch-sized is
    never split: placer.runtime.placed._unbatched)."""
    x = _named(list(dims)[-1], names)
    return (f"mark it never split (e.g. batch_dims = {{'{x}': None}} in the workload or the plan) or make the plan "
            f"from an example batch of another size (an input it has not batch-sized is never split)")


def _mixing(output_nodes: Sequence[str], output_dims: Mapping[str, list[int | None]], runs: Sequence[Probe],
            rows: tuple[int, int], split: tuple[str, int], fix: Sequence[str], source: str) -> str | None:
    """Why an output of rows [0:a] or [1:b] run alone (runs[0], runs[2]) is not those
    rows of the b-row output (runs[1]), along its batch dimension; None if every one is."""
    a, b = rows
    for name in output_nodes:
        leaves = [tree_flatten(r.values[name])[0] for r in runs]
        for k, d in enumerate(output_dims[name]):
            if d is None:
                continue
            alone, whole, later = (leaves[0][k], leaves[1][k], leaves[2][k])
            per_row = alone.shape[d] // a
            for start, part in ((0, alone), (1, later)):
                if not _close(whole.narrow(d, start * per_row, a * per_row), part):
                    span = f"row {start}" if a == 1 else f"rows {start}-{start + a - 1}"
                    advice = ", ".join([*fix, f"else {ONE_MICROBATCH}"]) if fix else ONE_MICROBATCH
                    return (f"{source}: output '{name}' for {span} alone differs from those rows of a {b}-row batch: "
                            f"the model mixes values along dimension {split[1]} of input '{split[0]}', which "
                            f"micro-batches split; {advice}")
    return None


def _name_the_batch(split: tuple[str, int], rank: int, whole: Sequence[str], marked: Collection[str]) -> list[str]:
    """Advice for a batch split along dimension split[1] of input split[0] (of `rank`
    dimensions), which may not be where its batch lies: another of its dimensions, and
    where inputs went whole (`whole`), split[0] marked unbatched, so that the next input
    defines the batch (new-user trial 10: the other dimension of a 1-d input cannot);
    one of `whole` that batch_dims mark None (`marked`) is offered only where no other is,
    with its None moved to split[0] (both marked, nothing would split)."""
    x, dim = split
    fixes = [f"name the batch's dimension in the workload (batch_dims = {{'{x}': {1 if dim == 0 else 0}}}) and make "
             f"the plan again, if it is not {dim}"] if rank > 1 else []
    holder = next((w for w in whole if w not in marked), None)
    if holder is not None:  # None needs no new capture: the plan's own batch_dims take it too
        fixes.append(f"mark {x!r} unbatched if {holder!r} holds the batch (batch_dims = {{'{x}': None}} in the "
                     f"workload or the plan)")
    elif whole:
        fixes.append(f"if {whole[0]!r} holds the batch, move its None in batch_dims to {x!r} (batch_dims = "
                     f"{{'{x}': None}} in the workload or the plan, not {{'{whole[0]}': None}})")
    return fixes


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding: within 1e-4 (1e-3 on a GPU, where TF32 and the kernel a
    batch size picks round differently; 16 epsilons for 16-bit floats) of the larger
    finite magnitude of either; exactly for integers and booleans."""
    coarse = 1e-3 if a.device.type != "cpu" else 1e-4
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    finite = torch.cat([a[a.isfinite()].abs().flatten(), b[b.isfinite()].abs().flatten()])
    scale = finite.max().item() if finite.numel() else 0.0
    rtol = max(coarse, 16 * torch.finfo(a.dtype).eps) if a.is_floating_point() else coarse
    return torch.allclose(a, b, rtol=0.0, atol=rtol * scale, equal_nan=True)


def batch_layout(graph_nodes: Sequence[fx.Node], output_nodes: Sequence[str], seen: Sequence[dict[str, list]],
                 rows: tuple[int, int], fix: Sequence[str], source: str) -> Layout:
    """Compare the shapes `probe` saw at two numbers of rows of the batch. Raises
    PlanError when an output has no batch dimension (its message offers `fix`, ways to
    name the batch otherwise: `_name_the_batch`) or a non-tensor output depends on the batch."""
    a, b = seen
    dims: dict[str, list[int | None]] = {}
    for name in output_nodes:
        leaves = []
        for x, y in zip(a[name], b[name]):
            if isinstance(x, tuple):
                d = _batch_dim(x, y, rows)
                if d is None and not x and not reads_inputs(next(n for n in graph_nodes if n.name == name)):
                    raise PlanError(f"{source}: output '{name}' {BATCH_FREE}: {ONE_MICROBATCH}")
                if d is None and not x:  # a 0-d value: another batch dimension would not give it one
                    raise PlanError(f"{source}: output '{name}' is a scalar over the whole batch, such as a loss "
                                    f"computed inside the model (a `labels` argument), which cannot be gathered from "
                                    f"micro-batches: compute it in loss_fn from the model's outputs, or "
                                    f"{ONE_MICROBATCH}")
                if d is None:
                    raise PlanError(f"{source}: output '{name}' has no batch dimension (shape {list(x)} at {rows[0]} "
                                    f"rows); a value over the whole batch cannot be gathered from micro-batches: "
                                    f"{', '.join(['compute it in loss_fn', *fix])}, or {ONE_MICROBATCH}")
                leaves.append(d)
            elif x != y:
                raise PlanError(f"{source}: output '{name}' is {x!r} for {rows[0]} rows and {y!r} for {rows[1]}: "
                                f"it depends on the batch and cannot be gathered from micro-batches; "
                                f"{ONE_MICROBATCH}")
            else:
                leaves.append(None)
        dims[name] = leaves
    reduction = None
    for node in graph_nodes:
        if node.name not in a or node.op in ("placeholder", "get_attr"):
            continue
        out = [(x, y) for x, y in zip(a[node.name], b[node.name]) if isinstance(x, tuple)]
        ins = [(x, y) for arg in node.all_input_nodes if arg.name in a
               for x, y in zip(a[arg.name], b[arg.name]) if isinstance(x, tuple)]
        if (out and any(_batch_dim(x, y, rows) is not None for x, y in ins)
                and all(_batch_dim(x, y, rows) is None for x, y in out)):
            reduction = (f"{source}: {_where(node)} reduces over the batch (output shape {list(out[0][0])} at "
                         f"{rows[0]} rows), so each micro-batch would see only its own rows; {accepting('plan')}")
            break
    return Layout(dims, reduction)
