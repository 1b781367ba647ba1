"""The placed graph as one autograd node: `PlacedGraph`, whose forward runs the
executor's forward pass and whose backward runs its backward pass, so that the CPU
autograd engine does not run the whole backward on one thread. One backward per
forward, of first order: the executor frees a forward's state in its backward, and
the chunks' backward builds no graph of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from graphs.errors import ExecutionError
from placer.runtime.values import move

__all__ = ["Call", "PlacedGraph"]


@dataclass
class Call:
    """One forward call of a placed model, as PlacedGraph needs it."""

    executor: Any  # the Executor
    inputs: dict  # placeholder name -> value
    tensor_inputs: list[str]  # placeholders whose values are tensors, in PlacedGraph's argument order
    output_nodes: list[str]  # the nodes (or placeholders) the model's output reads
    out_device: torch.device  # where outputs are returned (the inputs' device, like accelerate)
    # Filled in by PlacedGraph.forward: each output node's value as (leaves, spec), and
    # which leaves are the tensors PlacedGraph returns, in order.
    structure: dict = field(default_factory=dict)
    refs: list[tuple[str, int]] = field(default_factory=list)


class PlacedGraph(torch.autograd.Function):
    """The whole placed graph as one autograd node whose backward runs the chunks'
    backward concurrently on their workers (see executor.py)."""

    @staticmethod
    def forward(ctx, call: Call, anchor: torch.Tensor, *tensor_inputs: torch.Tensor):
        ctx.set_materialize_grads(False)  # outputs the loss ignores cost no backward work
        values, state = call.executor.forward(call.inputs, grad=True, output_nodes=call.output_nodes)
        values = {**call.inputs, **values}
        ctx.call, ctx.state = call, state
        outs, constant = [], []
        for name in call.output_nodes:
            flat, spec = tree_flatten(values[name])
            call.structure[name] = (flat, spec)
            for i, t in enumerate(flat):
                if isinstance(t, torch.Tensor):
                    out = move(t, call.out_device).detach()
                    call.refs.append((name, i))
                    outs.append(out)
                    if not t.requires_grad:
                        constant.append(out)
        ctx.mark_non_differentiable(*constant)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # backward(create_graph=True), autograd.grad(create_graph=True)
            raise ExecutionError("a placed model has no gradient of its gradient: create_graph=True (a gradient "
                                 "penalty, double backward) needs the unplaced model, or that part of it run unplaced")
        call, state = ctx.call, ctx.state
        if state is None:
            raise ExecutionError("a placed model's forward takes one backward: a second backward through the same "
                                 "forward (retain_graph=True) is not supported; sum the losses and call backward "
                                 "once ((loss1 + loss2).backward()), or run the forward again")
        ctx.state = None  # free the chunk graphs' bookkeeping once used
        kept = _grads_to_keep(ctx, call.executor)
        output_grads: dict[str, list] = {}
        for (name, i), g in zip(call.refs, grads):
            if g is not None:
                slot = output_grads.setdefault(name, [None] * len(call.structure[name][0]))
                slot[i] = g if slot[i] is None else slot[i] + g
        cuda = [g.device for g in grads if g is not None and g.device.type == "cuda"]
        input_grads = call.executor.backward(state, output_grads, engine_device=cuda[0] if cuda else None)
        for param, grad in kept:
            param.grad = grad
        result = []
        for name in call.tensor_inputs:
            direct = output_grads.get(name, [None])[0]  # the model returned this input itself
            g = (input_grads.get(name) or [None])[0]
            result.append(direct if g is None else g if direct is None else g + direct)
        return (None, None, *result)


def _grads_to_keep(ctx, executor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(parameter, a copy of its .grad) for every parameter, where this backward must leave
    them as they are: `torch.autograd.grad(out, inputs)` and `backward(inputs=...)`
    accumulate into no parameter of a placed model (parameters are not inputs of its one
    autograd node), while the chunks' backward accumulates into every parameter it
    reaches. The anchor's AccumulateGrad tells them apart at no cost: only a plain
    backward runs it. Empty for a plain backward."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    anchor = ctx.next_functions[0][0]
    if will_run is None or anchor is None or will_run(anchor):
        return []
    params = {id(p): p for chunk in executor.chunks for p in chunk.module.parameters() if p.requires_grad}
    return [(p, None if p.grad is None else p.grad.clone()) for p in params.values()]

