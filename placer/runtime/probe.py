"""Run a placed model's chunks on a few rows of a batch, as micro-batches' checks need
(placer.runtime.microbatch.layout): on this thread, without gradients, each node's
output shapes recorded, random numbers held fixed so that values do not depend on
how many rows the model sees, and the random generators and every buffer restored
afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["Probe", "probe"]


@dataclass
class Probe:
    """One `probe` run: every node's output shapes (per pytree leaf; non-tensor
    leaves as they are), the values of the inputs and the chunks' outputs, and the
    first random op it could not hold fixed ("aten.op in node 'n'"; None if none)."""

    shapes: dict[str, list]
    values: dict[str, Any]
    random: str | None = None


class _FixedRandom(TorchDispatchMode):
    """Random numbers held fixed, so that a model's values do not depend on how many
    rows it sees: dropout (`native_dropout`, an op's `dropout`/`dropout_p` argument)
    keeps every value; ops that only draw (`bernoulli_`, `uniform_`, `rand_like`,
    `randperm`: no tensor input but the one they fill or copy the shape of) return 1
    (0 for integers); other random ops run as they are and are recorded in `random`."""

    def __init__(self):
        super().__init__()
        self.node = ""
        self.random: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names = [a.name for a in func._schema.arguments]
        dropout = next((names.index(n) for n in ("dropout_p", "dropout") if n in names), None)
        if dropout is not None:
            if dropout < len(args):
                args = (*args[:dropout], 0.0, *args[dropout + 1:])
            else:
                kwargs = {**kwargs, names[dropout]: 0.0}
            return func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        if func is torch.ops.aten.native_dropout.default:
            return args[0].clone(), torch.ones_like(args[0], dtype=torch.bool)
        tensors = [a.name for a in func._schema.arguments if "Tensor" in str(a.type)]
        base = func._schema.name.split("::")[-1]
        if not tensors or (tensors == ["self"] and (base.endswith("_") or base.endswith("_like"))):
            out = func(*args, **kwargs)
            return out.fill_(1 if out.is_floating_point() or out.dtype == torch.bool else 0)
        if self.random is None:
            self.random = f"{func._schema.name.replace('::', '.')} in node '{self.node}'"
        return func(*args, **kwargs)


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, seen: dict[str, list], mode: _FixedRandom):
        super().__init__(module)
        self.seen = seen
        self.mode = mode

    def run_node(self, n: fx.Node) -> Any:
        self.mode.node = n.name
        out = super().run_node(n)
        if n.op not in ("output", "get_attr"):
            self.seen[n.name] = _shapes(out)
        return out


def probe(chunks: Sequence[Any], devices: Sequence[torch.device], inputs: Mapping[str, Any], dims: Mapping[str, int],
          rows: int, start: int = 0) -> Probe:
    """Run the chunks (in order, on this thread, without gradients, random numbers
    held fixed: `_FixedRandom`) on rows [start, start + rows) of the inputs that
    `dims` splits (other inputs whole). The random generators and every buffer the
    chunks hold are restored afterwards."""
    seen: dict[str, list] = {}
    values = {name: v.narrow(dims[name], start, rows) if name in dims else v for name, v in inputs.items()}
    for name, v in values.items():
        seen[name] = _shapes(v)
    buffers = {id(b): b for c in chunks for b in c.module.buffers()}
    saved = {k: b.clone() for k, b in buffers.items()}
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    fixed = _FixedRandom()
    with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else "cpu"), torch.no_grad():
        try:
            for chunk, device in zip(chunks, devices):
                args = [_to(values[name], device) for name in chunk.inputs]
                with fixed:
                    outs = _Recorder(chunk.module, seen, fixed).run(*args)
                values.update(zip(chunk.outputs, outs))
        finally:
            for k, b in buffers.items():
                b.copy_(saved[k])
    return Probe(seen, values, fixed.random)


def _to(value: Any, device: torch.device) -> Any:
    flat, spec = tree_flatten(value)
    return tree_unflatten([x.to(device) if isinstance(x, torch.Tensor) else x for x in flat], spec)


def _shapes(value: Any) -> list:
    return [tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in tree_flatten(value)[0]]
