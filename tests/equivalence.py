"""Placed against unplaced, in every respect a training loop sees: the logic of
../shared/tools/equiv_nested.py as a test helper.

Output type and values (nested outputs: tuples, dicts, namedtuples, ModelOutputs),
state_dict keys, tied parameters, gradients, buffers after each training forward,
parameters after each SGD step, and eval-mode outputs under torch.no_grad(). With
`seed`, torch is seeded before each forward, so dropout draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch.utils._pytree import tree_flatten

import placer
from graphs.workload import default_loss


def ties(model: torch.nn.Module) -> list[list[str]]:
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return sorted(sorted(v) for v in seen.values() if len(v) > 1)


def compare(expected, actual, what: str) -> None:
    assert type(actual) is type(expected), f"{what}: output type {type(actual).__name__} != {type(expected).__name__}"
    flat_e, spec_e = tree_flatten(expected)
    flat_a, spec_a = tree_flatten(actual)
    assert spec_a == spec_e, f"{what}: output structure {spec_a} != {spec_e}"
    for i, (e, a) in enumerate(zip(flat_e, flat_a)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.shape == e.shape, f"{what}: leaf {i} shape"
            err = (a.detach().cpu().float() - e.detach().float()).abs().max().item() if e.numel() else 0.0
            assert torch.allclose(a.detach().cpu().float(), e.detach().float(), rtol=1e-4, atol=1e-5), \
                f"{what}: leaf {i} differs, max abs err {err:.3e}"
        else:
            assert a == e, f"{what}: leaf {i} is {a!r}, expected {e!r}"


def check_equivalent(source: ModuleType, make_plan: Callable[[torch.nn.Module, tuple], placer.Plan],
                     steps: int = 2, seed: bool = True, eval_mode: bool = True) -> placer.Plan:
    """Build the workload `source` twice (same seed), place one copy by the plan
    `make_plan(model, inputs)` makes for it, and assert both behave alike for `steps`
    SGD steps and in eval mode. Returns the plan. Raises AssertionError naming the
    first difference."""
    loss_fn = getattr(source, "loss_fn", None) or default_loss
    torch.manual_seed(0)
    ref = source.build_model()
    torch.manual_seed(0)
    model = source.build_model()
    inputs = source.example_inputs()
    plan = make_plan(model, inputs)
    placed = placer.apply(model, plan)
    try:
        assert list(placed.state_dict()) == list(ref.state_dict()), "state_dict keys differ"
        assert ties(placed.original) == ties(ref), "tied parameters differ"
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
        opt = torch.optim.SGD(placed.parameters(), lr=0.01, momentum=0.9)
        for step in range(steps):
            opt_ref.zero_grad()
            opt.zero_grad()
            if seed:
                torch.manual_seed(1234)
            out_ref = ref(*inputs)
            loss_fn(out_ref, *inputs).backward()
            if seed:
                torch.manual_seed(1234)
            out = placed(*inputs)
            loss_fn(out, *inputs).backward()
            compare(out_ref, out, f"step {step} train output")
            _compare_grads(ref, placed, step)
            expected = dict(ref.named_buffers())
            for name, b in placed.named_buffers():
                assert torch.allclose(b.cpu().float(), expected[name].float(), rtol=1e-4, atol=1e-5), \
                    f"step {step}: buffer {name} differs after forward"
            opt_ref.step()
            opt.step()
            expected = dict(ref.named_parameters())
            for name, p in placed.named_parameters():
                assert torch.allclose(p.detach().cpu(), expected[name].detach(), rtol=1e-4, atol=1e-5), \
                    f"step {step}: parameter {name} differs after the optimizer step"
        if eval_mode:
            ref.eval()
            placed.eval()
            with torch.no_grad():
                compare(ref(*inputs), placed(*inputs), "eval output")
    finally:
        placed.close()
    return plan


def _compare_grads(ref: torch.nn.Module, placed: torch.nn.Module, step: int) -> None:
    """Relative to each gradient's scale, floored at 1e-3 of the largest gradient
    anywhere (gradients that are ~0 in theory give meaningless relative errors)."""
    expected = dict(ref.named_parameters())
    scale = max([float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None] + [1e-12])
    for name, p in placed.named_parameters():
        g, r = p.grad, expected[name].grad
        assert (g is None) == (r is None), f"step {step}: gradient presence differs for {name}"
        if g is not None:
            err = (g.detach().cpu() - r).abs().max() / max(float(r.abs().max()), 1e-3 * scale)
            assert err < 1e-3, f"step {step}: gradient of {name} differs (relative error {float(err):.2e})"
