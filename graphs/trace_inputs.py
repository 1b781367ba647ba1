"""Which forward input each placeholder of a capture holds.

Users name a model's inputs as its forward names them (`batch_dims = {"input": 1}`);
a capture's placeholders are named otherwise: torch.export renames an argument that
shadows a Python builtin (`input` becomes `input_1`) and gives a nested argument
(a dict, a tuple of tensors) one placeholder per leaf (`batch_x`, `batch_y`). The
runtime and the distributed backends split batches by placeholder, and name inputs
in messages as the user wrote them: both go through `input_names`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_unflatten

from graphs.errors import PlanError
from graphs.trace import Traced

__all__ = ["input_names", "placeholder_dims", "check_batch_dims", "reads_inputs", "BATCH_FREE"]

# why an output that no input reaches cannot be gathered from micro-batches, and what to do (new-user trial 12:
# open_clip returns `self.logit_scale.exp()`, and was told to compute it in loss_fn, which cannot read the model)
BATCH_FREE = ("does not depend on the batch (a parameter or constant returned as an output, such as a learned "
              "temperature): placer gathers only outputs of the batch from micro-batches, so such a model trains with "
              "one micro-batch")


def input_names(traced: Traced) -> dict[str, str]:
    """Placeholder name -> the forward input it holds (the parameter's name; for a
    `**kwargs` parameter, the keyword the call passed), for every placeholder.

    An export capture's placeholders are the leaves of its call's arguments in order
    (`Traced.in_spec`); an fx capture's are the forward's parameters themselves
    (`*args` and `**kwargs` named without their stars).
    """
    if traced.method != "export" or traced.in_spec is None:
        return {n.name: str(n.target).lstrip("*") for n in traced.placeholders}
    args, kwargs = tree_unflatten([n.name for n in traced.placeholders], traced.in_spec)
    names: dict[str, str] = {}
    for param, value in traced.signature.bind(*args, **kwargs).arguments.items():
        keyword = traced.signature.parameters[param].kind == inspect.Parameter.VAR_KEYWORD
        for name, part in (value.items() if keyword else [(param, value)]):
            names.update((leaf, name) for leaf in tree_leaves(part))
    return names


def placeholder_dims(traced: Traced, batch_dims: Mapping[str, int | None]) -> dict[str, int | None]:
    """`batch_dims` (forward input -> the dimension its batch lies along, None: never
    split) as the capture's placeholders take them: each placeholder of a named input,
    every leaf of a nested one, gets the input's dimension; unnamed inputs are left out
    (the default, 0, applies)."""
    if not batch_dims:
        return {}
    return {placeholder: batch_dims[name] for placeholder, name in input_names(traced).items() if name in batch_dims}


def reads_inputs(node: fx.Node) -> bool:
    """Whether any placeholder (an input of the forward) reaches `node` in its graph."""
    seen, todo = {node}, [node]
    while todo:
        current = todo.pop()
        if current.op == "placeholder":
            return True
        todo.extend(n for n in current.all_input_nodes if n not in seen and not seen.add(n))
    return False


def check_batch_dims(traced: Traced, batch_dims: Mapping[str, int | None], where: str = "") -> None:
    """Refuse `batch_dims` naming no input of the model's forward, as the forward names
    its inputs (`where`: a prefix naming the plan in the message).

    Raises
    ------
    PlanError : a name that is neither a parameter of the forward nor a keyword the
        capture's call passed to its `**kwargs`.
    """
    inputs = traced.signature.parameters
    stray = sorted(set(batch_dims) - set(inputs) - set(input_names(traced).values()))
    if stray:
        raise PlanError(f"{where}batch_dims names {stray[0]!r}, which is no input of the model's forward "
                        f"({', '.join(inputs)}): name one of those")
