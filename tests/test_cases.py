"""Real-model cases (tests/cases/, each file's docstring says the scenario and its
source): `placer inspect` and `placer baseline --method all` work on each, and a
two-device plan's placed model equals the unplaced model in output type and values,
gradients, buffers after each forward, parameters after two SGD steps, and eval-mode
outputs (tests/equivalence.py, seeded for dropout)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from graphs.capture import node_params, owning_module
from graphs.trace import trace_model
from placer.cli import cli
from placer.plan import plan_from_assignment
from tests.equivalence import check_equivalent

CASES_DIR = Path(__file__).parent / "cases"
CASES = sorted(p.stem for p in CASES_DIR.glob("*.py"))
TWO = ["cpu:0", "cpu:1"]


def torch_version() -> tuple[int, int]:
    return tuple(int(p) for p in torch.__version__.split(".")[:2])


def load_case(name: str):
    """The case file as a module; transformers cases skip where it cannot run."""
    if name.startswith("hf_"):
        if torch_version() < (2, 6):
            pytest.skip("transformers 5 needs torch >= 2.6")
        pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(f"placer_case_{name}", CASES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_in_two(model: torch.nn.Module, inputs: tuple, on_second=None):
    """A two-device plan: the first half of the graph's nodes on cpu:0, the rest on
    cpu:1 (or the nodes `on_second(node)` picks), a parameter with its first reader,
    and its other readers with it."""
    device_of_param: dict[str, str] = {}

    def assign(node) -> str:
        body = [n for n in node.graph.nodes if n.op != "get_attr"]
        at = next(iter(node.users)) if node.op == "get_attr" else node  # a parameter goes where it is read
        device = (("cpu:1" if on_second(at) else "cpu:0") if on_second is not None
                  else "cpu:0" if body.index(at) < len(body) // 2 else "cpu:1")
        params = node_params(node.graph.owning_module, node)
        device = next((device_of_param[p] for p in params if p in device_of_param), device)
        device_of_param.update(dict.fromkeys(params, device))
        return device

    return plan_from_assignment(model, assign, TWO, inputs=inputs)


@pytest.mark.parametrize("name", CASES)
def test_inspect_and_every_baseline_run(name, monkeypatch):
    """In-process (the CLI's own process tests are in test_cli.py): the commands'
    code paths, without a fresh interpreter per case."""
    captured_by = f"op granularity, captured by torch.{getattr(load_case(name), 'CAPTURE', 'export')}"
    path = str(CASES_DIR / f"{name}.py")
    for command, expected in ((["inspect"], captured_by), (["baseline", "--method", "all"], "METIS")):
        shown = io.StringIO()
        monkeypatch.setattr("placer.cli_support.STDOUT", shown)  # where the CLI prints its own output
        result = CliRunner().invoke(cli, [*command, path, "--devices", ",".join(TWO)])
        assert result.exit_code == 0, repr(result.exception)
        assert expected in shown.getvalue() and "lower bound" in shown.getvalue()


@pytest.mark.parametrize("name", CASES)
def test_a_two_device_plan_trains_and_evaluates_like_eager(name):
    case = load_case(name)
    plan = check_equivalent(case, split_in_two, steps=2, seed=True, eval_mode=True)
    assert set(plan.assignment.values()) == set(TWO) and plan.capture.method == getattr(case, "CAPTURE", "export")


def test_gpt2_is_captured_at_op_grain_and_each_block_places_alone():
    case = load_case("hf_gpt2_tied_lm_head")
    in_block = lambda n: owning_module(n).startswith("lm.transformer.h.1")  # noqa: E731
    captured = []

    def make_plan(model, inputs):
        # the capture call plan_from_assignment makes: it reuses this one (graphs.trace_cache), no second export
        captured.append(trace_model(model, inputs=inputs))
        return split_in_two(model, inputs, on_second=in_block)

    plan = check_equivalent(case, make_plan, steps=1, seed=False, eval_mode=False)
    (traced,) = captured
    ops = [n for n in traced.gm.graph.nodes if n.op == "call_function"]
    assert traced.method == "export" and len(ops) >= 100
    module_of = {n.name: owning_module(n) for n in traced.gm.graph.nodes}
    moved = {module_of[name] for name, device in plan.assignment.items() if device == "cpu:1"}
    assert moved and all(m.startswith("lm.transformer.h.1") for m in moved)
