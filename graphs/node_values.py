"""Values a node of a captured graph reads, rebuilt for running the node alone
(graphs.profile): detached, copied where the node may write them, each container
kept as its own type."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.fx.immutable_collections import immutable_dict


def as_leaf(value: object, copy_values: bool = False) -> object:
    """A detached tensor that requires grad where the original did: sharing its storage,
    or with `copy_values` a copy of its values (each tensor inside a structure so)."""
    if not isinstance(value, torch.Tensor):
        return rebuilt(value, lambda v: as_leaf(v, copy_values))
    leaf = value.detach().clone() if copy_values else value.detach()
    if value.requires_grad:
        leaf.requires_grad_()
    return leaf


def rebuilt(value: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """`value` with `fn` applied to every tensor inside, each container rebuilt as its
    own type: a ModelOutput or OrderedDict a leaf module returned stays one, so that the
    getattr node reading `.last_hidden_state` off it is timed as the model runs it
    (fx's map_aggregate would make it an immutable_dict)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [rebuilt(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return type(value)(rebuilt(v, fn) for v in value)
    if isinstance(value, dict):
        items = {k: rebuilt(v, fn) for k, v in value.items()}
        if type(value) in (dict, immutable_dict):
            return type(value)(items)
        out = copy.copy(value)  # its own class and attributes (a ModelOutput refuses update())
        for k, v in items.items():
            out[k] = v
        return out
    return value
