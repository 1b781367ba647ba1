"""The micro-batch refusals every backend applies alike: the in-process engine
(executor.py) and the pipelining backend (placer.distributed.pipelining) call these,
so that a model micro-batches would change is refused the same way, with the same
message, whichever runs it (microbatch.py says what is refused and why).

- `refuse_static`, from the graph alone, when the plan is built: a parameter with a
  gradient hook (`gradient_hook`), batch norm in training, buffers (or parameters)
  updated in forward.
- `checked_layout`, from a probe of the model on a few rows (microbatch.layout):
  reductions over the batch and rows mixed along the split dimension; and a warning
  where the probe could not compare values (a random op it cannot hold fixed).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.errors import PlanError
from placer.runtime import microbatch
from placer.runtime.chunks import Chunk

__all__ = ["Refused", "refuse_static", "checked_layout", "gradient_hook", "hook_refusal"]


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


def hook_refusal(source: str, *modules: nn.Module) -> str | None:
    """Why micro-batches are refused for `modules`: a parameter with a gradient hook
    (`gradient_hook`); None if none has one."""
    hooked = gradient_hook(*modules)
    return hooked and (f"{source}: parameter '{hooked}' has a gradient hook, which micro-batches would run once each, "
                       f"on each one's share of the gradient; use microbatches = 1, or remove the hook")


def refuse_static(graph: fx.Graph, root: nn.Module, source: str, microbatch_statistics: bool,
                  extra_roots: Sequence[nn.Module] = ()) -> None:
    """Refuse micro-batches of `graph` with a parameter that has a gradient hook
    (`gradient_hook`, always), or that `microbatch.static_refusal` finds would change
    what the model computes unless the workload accepts per-micro-batch statistics.
    `root`, `extra_roots`: where the graph's targets are found.

    Raises
    ------
    Refused : a gradient hook (`hook_refusal`), batch norm in training or a buffer or parameter updated
        in forward (one line, with the fix).
    """
    hooked = hook_refusal(source, root, *extra_roots)
    if hooked:
        raise Refused(hooked)
    if not microbatch_statistics:
        reason = microbatch.static_refusal(graph, root, source, extra_roots)
        if reason:
            raise Refused(reason)


def checked_layout(chunks: Sequence[Chunk], devices: Sequence[torch.device], inputs: Mapping[str, Any],
                   dims: Mapping[str, int], output_nodes: Sequence[str], source: str,
                   microbatch_statistics: bool) -> microbatch.Layout:
    """`microbatch.layout` of a call (arguments as there: the chunks in order, each
    one's device, placeholder -> value of the whole batch, the split inputs and their
    dimensions, the nodes the call returns), refused unless the workload accepts
    per-micro-batch statistics where it found a reduction over the batch or rows
    mixed along the split dimension. Where the probe could not compare values
    (`Layout.unchecked`), warns (UserWarning) that micro-batches of this model were
    not checked for mixing rows; the executor probes once per input signature.

    Raises
    ------
    Refused : as microbatch.layout (no batch dimension in an output, the model fails
        on fewer rows), and `Layout.reduction` unless `microbatch_statistics`.
    """
    try:
        layout = microbatch.layout(chunks, devices, inputs, dims, output_nodes, source)
    except PlanError as exc:
        raise Refused(str(exc)) from exc
    if layout.reduction and not microbatch_statistics:
        raise Refused(layout.reduction)
    if layout.unchecked:
        warnings.warn(f"{source}: {layout.unchecked}, so rows mixed along it would go unrefused "
                      f"(microbatches = 1 is safe)", stacklevel=2)
    return layout
