"""Workloads: a model, one example training batch, its loss and optimizer.

The workload-file contract (DESIGN.md): a Python file defining `build_model()` and
`example_inputs()`; optionally `loss_fn(output, *inputs)`, `make_optimizer(params)`,
`leaf_modules` and `expert_placement(module_path, n_devices)`. `zoo:NAME[:SIZE]`
names a bundled workload instead (graphs.zoo).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

LossFn = Callable[..., torch.Tensor]
OptimizerFactory = Callable[..., torch.optim.Optimizer]
ExpertFn = Callable[[str, int], "int | None"]


def default_loss(output, *inputs) -> torch.Tensor:
    """The mean of the output (of every tensor in it, if it is a tuple or list)."""
    if isinstance(output, (tuple, list)):
        return sum(default_loss(o) for o in output if isinstance(o, torch.Tensor))
    return output.float().mean()


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


@dataclass
class Workload:
    name: str  # short name for output folders and reports, e.g. "nmt-small"
    spec: str  # what the user wrote: a path or "zoo:nmt:small"
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss_fn: LossFn = default_loss
    make_optimizer: OptimizerFactory = default_optimizer
    leaf_modules: tuple[type, ...] = ()
    expert_placement: ExpertFn | None = None  # module path, n_devices -> device index or None
    notes: list[str] = field(default_factory=list)  # things the user should be told (fallbacks)

    def fresh_model(self) -> nn.Module:
        """An independent copy with the same initial weights (each placement is measured
        on its own copy, so that moving parameters never leaks between runs)."""
        return copy.deepcopy(self.model)
