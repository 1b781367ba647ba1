"""The micro-batch refusals every backend applies alike: the in-process engine
(executor.py) and the pipelining backend (placer.distributed.pipelining) call these,
so that a model micro-batches would change is refused the same way, with the same
message, whichever runs it (microbatch.py says what is refused and why).

- `capture_refusal`, from a capture's graph alone: a parameter with a gradient hook
  (`gradient_hook`, raised at once), and batch norm in training or buffers (or
  parameters) updated in forward, returned. A capture freezes the mode it was made in
  (graphs.trace), and placer.apply places the training capture of every model, also of
  one that only ever runs in eval mode, where batch norm reads its running statistics
  and micro-batches are exact: so the engine raises this reason at the capture's first
  micro-batched call (`checked_layout`), which only a call in the capture's mode makes.
  `refuse_static` raises it at once, for the pipelining backend, which only trains.
- `checked_layout`, from a probe of the model on a few rows (microbatch.layout):
  reductions over the batch and rows mixed along the split dimension; and a warning
  where the probe could not compare values (a random op it cannot hold fixed).

Their advice is for whoever holds the plan (`PLAN_ADVICE`, microbatch.Reader): placer.apply
reads only the plan; a workload's options are merged into it only where placer runs
the two together (placer.plan.with_workload_options). `hook_refusal` also serves
placer optimize, whose note advises the workload's author.

A module the capture calls whole (an fx leaf: a BatchNorm listed in the workload's
`leaf_modules`) reads its training flag when it runs, not when it was captured: it
is judged at the capture's first micro-batched call (`checked_layout`), in the
capture's mode, so that a model applied in eval and then trained gets the batch-norm
refusal as the others do (microbatch.leaf_refusal).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.errors import PlanError
from placer.runtime import microbatch
from placer.runtime.chunks import Chunk
from placer.runtime.microbatch import ONE_MICROBATCH, Reader

__all__ = ["Refused", "PLAN_ADVICE", "capture_refusal", "refuse_static", "checked_layout", "gradient_hook",
           "hook_refusal"]

# What a plan's holder can change; the cause comes first in each message
PLAN_ADVICE = microbatch.accepting("plan")


class Refused(PlanError):
    """A plan the runtime refuses to run on this model: its micro-batches would change
    what the model computes. A measurement of it is infeasible, with this as its reason
    (placer.runtime.timing), not a crash."""


def gradient_hook(*modules: nn.Module) -> str | None:
    """The name of the first parameter of `modules` with a gradient hook
    (Tensor.register_hook, register_post_accumulate_grad_hook), else None. Micro-batches
    would run it once each, on each one's share of the gradient (new-user trial 10: a
    clamp made a gradient 3x the model's), and the distributed backends do not carry it."""
    for module in modules:
        for name, parameter in module.named_parameters():
            if parameter._backward_hooks or getattr(parameter, "_post_accumulate_grad_hooks", None):
                return name
    return None


def hook_refusal(source: str, *modules: nn.Module, reader: Reader = "workload") -> str | None:
    """Why micro-batches are refused for `modules`: a parameter with a gradient hook
    (`gradient_hook`), with advice for `reader` (microbatch.Reader: the workload's author
    by default, as placer.microbatch_policy asks); None if none has one."""
    hooked = gradient_hook(*modules)
    fix = f"{ONE_MICROBATCH}, or remove the hook" if reader == "plan" else "remove the hook to allow micro-batches"
    return hooked and (f"{source}: parameter '{hooked}' has a gradient hook, which micro-batches would run once each, "
                       f"on each one's share of the gradient; {fix}")


def capture_refusal(graph: fx.Graph, root: nn.Module, source: str, microbatch_statistics: bool,
                    extra_roots: Sequence[nn.Module] = (), leaves: bool = False) -> str | None:
    """Why micro-batches would change what a capture computes in the mode it was made
    in (`microbatch.static_refusal`: batch norm in training, a buffer or parameter
    updated in forward), with `PLAN_ADVICE`; None where nothing does, or the plan
    accepts per-micro-batch statistics. `graph`: the capture's; `root`, `extra_roots`:
    where its targets are found; `leaves`: judge modules called whole by their flags
    now (else `checked_layout` does, at a call in the capture's mode). The engine
    raises it at the capture's first micro-batched call (module docstring).

    Raises
    ------
    Refused : a parameter with a gradient hook (`hook_refusal`), in any mode.
    """
    hooked = hook_refusal(source, root, *extra_roots, reader="plan")
    if hooked:
        raise Refused(hooked)
    return None if microbatch_statistics else microbatch.static_refusal(graph, root, source, extra_roots,
                                                                        reader="plan", leaves=leaves)


def refuse_static(graph: fx.Graph, root: nn.Module, source: str, microbatch_statistics: bool,
                  extra_roots: Sequence[nn.Module] = ()) -> None:
    """Refuse micro-batches of a capture at once (`capture_refusal`), for a backend that
    runs it only in the mode it was made in.

    Raises
    ------
    Refused : a gradient hook, batch norm in training (also in a module called whole,
        by its flag now) or a buffer or parameter updated in forward (one line, with
        the fix).
    """
    reason = capture_refusal(graph, root, source, microbatch_statistics, extra_roots, leaves=True)
    if reason:
        raise Refused(reason)


def checked_layout(chunks: Sequence[Chunk], devices: Sequence[torch.device], inputs: Mapping[str, Any],
                   dims: Mapping[str, int], output_nodes: Sequence[str], source: str,
                   microbatch_statistics: bool, names: Mapping[str, str] | None = None,
                   refusal: str | None = None, marked: Collection[str] = ()) -> microbatch.Layout:
    """`microbatch.layout` of a call (arguments as there: the chunks in order, each
    one's device, placeholder -> value of the whole batch, the split inputs and their
    dimensions, the nodes the call returns, placeholder -> the forward input it holds,
    as messages name inputs, the placeholders the plan's batch_dims mark None), refused
    unless the plan accepts per-micro-batch statistics where it found a reduction over
    the batch or rows mixed along the split dimension. Where the probe could not
    compare values (`Layout.unchecked`), warns (UserWarning) that micro-batches of this
    model were not checked for mixing rows; the executor probes once per input signature.
    `refusal`: the capture's own (`capture_refusal`), raised before any probe, after
    batch norm in training in a module the chunks call whole (microbatch.leaf_refusal:
    the call is in the capture's mode, module docstring).

    Raises
    ------
    Refused : batch norm in a module called whole, unless `microbatch_statistics`;
        `refusal`; as microbatch.layout (no batch dimension in an output, the model
        fails on fewer rows), and `Layout.reduction` unless `microbatch_statistics`.
    """
    leaf = None if microbatch_statistics else next(
        filter(None, (microbatch.leaf_refusal(c.module.graph, c.module, source, "plan") for c in chunks)), None)
    if leaf or refusal:
        raise Refused(leaf or refusal)
    try:
        layout = microbatch.layout(chunks, devices, inputs, dims, output_nodes, source, names, marked)
    except PlanError as exc:
        raise Refused(str(exc)) from exc
    if layout.reduction and not microbatch_statistics:
        raise Refused(layout.reduction)
    if layout.unchecked:
        warnings.warn(f"{source}: {layout.unchecked}, so rows mixed along it would go unrefused; where they might, "
                      f"{ONE_MICROBATCH}", stacklevel=2)
    return layout
