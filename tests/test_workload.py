"""load_workload: the workload-file contract and zoo names, and one clear line per mistake."""

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from graphs.workload import default_loss, default_optimizer, load_workload
from graphs.zoo import ZOO
from graphs.errors import WorkloadError

GOOD = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def example_inputs():
    return (torch.randn(3, 4),)
"""


def write(tmp_path, text, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_good_file_loads_with_defaults(tmp_path):
    w = load_workload(write(tmp_path, GOOD))
    assert w.name == "model"
    assert isinstance(w.model, torch.nn.Module)
    assert len(w.inputs) == 1 and w.inputs[0].shape == (3, 4)
    assert w.loss_fn is default_loss and w.make_optimizer is default_optimizer
    assert w.leaf_modules == () and w.expert_placement is None


def test_same_seed_same_weights_and_inputs(tmp_path):
    path = write(tmp_path, GOOD)
    a, b, c = load_workload(path), load_workload(path), load_workload(path, seed=1)
    assert torch.equal(a.model[0].weight, b.model[0].weight) and torch.equal(a.inputs[0], b.inputs[0])
    assert not torch.equal(a.model[0].weight, c.model[0].weight)


def test_optional_hooks_and_single_tensor_input(tmp_path):
    path = write(tmp_path, GOOD.replace("return (torch.randn(3, 4),)", "return torch.randn(3, 4)") + """
class Block(nn.Module):
    pass

leaf_modules = [Block]

def loss_fn(output, x):
    return output.sum()

def make_optimizer(params):
    return torch.optim.Adam(params)

def expert_placement(module_path, n_devices):
    return 0
""")
    w = load_workload(path)
    assert isinstance(w.inputs, tuple) and len(w.inputs) == 1
    assert [c.__name__ for c in w.leaf_modules] == ["Block"]
    assert w.loss_fn(torch.ones(2), None).item() == 2
    assert isinstance(w.make_optimizer([torch.nn.Parameter(torch.ones(1))]), torch.optim.Adam)
    assert w.expert_placement("x", 2) == 0


def test_two_files_with_the_same_stem_do_not_collide(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = load_workload(write(tmp_path / "a", GOOD))
    two = load_workload(write(tmp_path / "b", GOOD.replace("nn.Linear(8, 2)", "nn.Linear(8, 5)")))
    assert one.model[2].out_features == 2 and two.model[2].out_features == 5


def test_a_workload_imports_a_module_beside_it_without_leaving_its_folder_on_sys_path(tmp_path):
    # As under `python model.py`: the file's folder is importable while it loads and builds
    # (at import and inside build_model), and is off sys.path again afterwards.
    write(tmp_path, "from torch import nn\nclass Net(nn.Linear):\n    pass\n", name="h17_sibling_net.py")
    write(tmp_path, "def width():\n    return 6\n", name="h17_sibling_width.py")
    path = write(tmp_path, """
        import torch
        from h17_sibling_net import Net

        def build_model():
            from h17_sibling_width import width
            return Net(4, width())

        def example_inputs():
            return (torch.randn(3, 4),)
        """)
    w = load_workload(path)
    assert type(w.model).__name__ == "Net" and w.model.out_features == 6
    assert str(tmp_path) not in sys.path and str(tmp_path.resolve()) not in sys.path


@pytest.mark.parametrize("text, fragments", [
    ("def build_model(:\n    pass\n", ["syntax error at line 1"]),
    (GOOD.replace("def build_model", "def make_model"), ["build_model"]),
    (GOOD.replace("def example_inputs", "def batch"), ["example_inputs"]),
    (GOOD.replace("return nn.Sequential", "raise ValueError('no weights here')\n    return nn.Sequential"),
     ["build_model()", "ValueError", "no weights here"]),
    (GOOD.replace("return (torch.randn(3, 4),)", "return torch.randn(3, 4) / 0 + undefined_name"),
     ["example_inputs()", "NameError"]),
    (GOOD.replace("return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))", "return 42"),
     ["build_model()", "int", "nn.Module"]),
    (GOOD.replace("return (torch.randn(3, 4),)", "return {'x': torch.randn(3, 4)}"),
     ["example_inputs()", "dict", "tuple of tensors"]),
    (GOOD.replace("return (torch.randn(3, 4),)", "return (torch.randn(3, 4), 7)"),
     ["example_inputs()", "item 1", "int"]),
    ("import torch\nraise RuntimeError('broken at import')\n", ["importing", "RuntimeError", "broken at import"]),
    ("import sys\nsys.exit('usage: model.py ARGS')\n", ["importing", "SystemExit", "usage: model.py ARGS"]),
    (GOOD + "\nleaf_modules = ['Linear']\n", ["leaf_modules", "'Linear'"]),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(path)
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="no such file"):
        load_workload(str(tmp_path / "nope.py"))


def test_a_folder_is_not_a_python_file(tmp_path):
    with pytest.raises(WorkloadError, match=r"is a directory, not a Python file \(give the path of the workload"):
        load_workload(str(tmp_path))


def test_not_a_python_file(tmp_path):
    path = write(tmp_path, GOOD, name="model.txt")
    with pytest.raises(WorkloadError, match=r"model\.txt: not a Python file"):
        load_workload(path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # chmod cannot stop root, who may run the tests
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    assert str(err.value) == f"{path}: cannot read it: Permission denied"


def test_zoo_names():
    name = sorted(ZOO)[0]
    w = load_workload(f"zoo:{name}")
    assert w.name == f"{name}-small" and w.spec == f"zoo:{name}"
    for bad, fragments in [("zoo:nosuch", ["nosuch", name]), (f"zoo:{name}:huge", ["huge", "small"]),
                           ("zoo:", ["zoo:NAME"])]:
        with pytest.raises(WorkloadError) as err:
            load_workload(bad)
        assert all(f in str(err.value) for f in fragments) and "\n" not in str(err.value)


@pytest.mark.parametrize("function, call", [
    ("build_model", None), ("example_inputs", None), ("loss_fn", lambda w: w.loss_fn(torch.ones(2), None)),
    ("make_optimizer", lambda w: w.make_optimizer([torch.nn.Parameter(torch.ones(1))])),
    ("expert_placement", lambda w: w.expert_placement("x", 2)),
])
@pytest.mark.parametrize("exit_call", ["sys.exit(3)", "sys.exit(0)", "raise SystemExit('bye')", "exit()"])
def test_a_workload_function_that_exits_is_a_workload_error_naming_it(tmp_path, function, call, exit_call):
    hooks = GOOD + """
def loss_fn(output, x):
    return output.sum()

def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1)

def expert_placement(module_path, n_devices):
    return 0
"""
    text = "import sys\n" + hooks.replace(f"def {function}(", f"def {function}(*a, **k):\n    {exit_call}\n\n"
                                                             f"def _unused_{function}(")
    path = write(tmp_path, text)
    with pytest.raises(WorkloadError) as err:
        w = load_workload(path)
        call(w)
    message = str(err.value)
    assert message.startswith(f"{path}: {function}() called sys.exit(") and "\n" not in message


@pytest.mark.parametrize("hook, required", [
    ("def build_model(size):\n    return nn.Linear(4, 2)", "build_model()"),
    ("def example_inputs(n):\n    return (torch.randn(n, 4),)", "example_inputs()"),
    ("def loss_fn(out):\n    return out.sum()", "loss_fn(output, *inputs)"),  # the trial's: no inputs
    ("def loss_fn(output, x, target):\n    return output.sum()", "loss_fn(output, *inputs)"),  # one input, not two
    ("def make_optimizer():\n    return None", "make_optimizer(params)"),
    ("def expert_placement(module_path):\n    return 0", "expert_placement(module_path, n_devices)"),
])
def test_a_workload_function_with_the_wrong_signature_is_refused_at_load_naming_the_one_required(
        tmp_path, hook, required):
    name = hook.split("(")[0].removeprefix("def ")
    marker = tmp_path / "ran"  # none of the file's functions may run once one signature is wrong
    text = GOOD.replace("return nn.Sequential", f"open({str(marker)!r}, 'w').close()\n    return nn.Sequential")
    path = write(tmp_path, f"{text}\n{hook}\n")
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {name}(") and "\n" not in message
    assert f"cannot be called as {required}" in message and f"define it as def {required}" in message
    if name == "example_inputs":  # both are checked before build_model runs
        assert not marker.exists()


@pytest.mark.parametrize("hook", [
    "def loss_fn(output, *inputs):\n    return output.sum()",
    "def loss_fn(output, x, scale=2.0):\n    return output.sum() * scale",
    "loss_fn = lambda *args: args[0].sum()",
    "import functools\ndef _loss(weight, output, x):\n    return output.sum() * weight\n"
    "loss_fn = functools.partial(_loss, 3.0)",
    "make_optimizer = torch.optim.Adam",
    "def expert_placement(module_path, n_devices, size='small'):\n    return 0",
])
def test_a_workload_function_that_takes_what_placer_passes_loads(tmp_path, hook):
    w = load_workload(write(tmp_path, f"{GOOD}\n{hook}\n"))
    if "loss_fn" in hook:
        assert w.loss_fn(torch.ones(2), *w.inputs).item() > 0


def test_a_model_without_parameters_is_a_workload_error(tmp_path):
    path = write(tmp_path, GOOD.replace("return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
                                        "return nn.ReLU()"))
    with pytest.raises(WorkloadError, match=r"model\.py: build_model\(\) returned a ReLU without parameters"):
        load_workload(path)
    frozen = write(tmp_path, GOOD.replace("return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
                                          "return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).requires_grad_(False)"))
    with pytest.raises(WorkloadError, match=r"model\.py: no parameter of the Sequential build_model\(\) returned "
                                            r"requires grad: there is nothing to train \(unfreeze"):
        load_workload(frozen)  # new-user trial 12: an internal error at the first measured step


def test_the_default_loss_reads_every_floating_tensor_of_a_structured_output():
    out = {"logits": torch.ones(2, 3), "parts": (torch.full((2,), 3.0), torch.arange(4))}
    assert default_loss(out).item() == 4.0  # 1 + 3; the integer tensor is no loss
    with pytest.raises(WorkloadError, match=r"the default loss .* finds none in the model's dict output: define "
                                            r"loss_fn\(output, \*inputs\)"):
        default_loss({"ids": torch.arange(3)})


def test_ctrl_c_in_a_workload_function_stays_an_interruption(tmp_path):
    path = write(tmp_path, GOOD + "\ndef loss_fn(output, x):\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_workload(path).loss_fn(torch.ones(2), None)


# -- micro-batch options ----------------------------------------------------------------

SEQUENCE = """
import torch
from torch import nn

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 2)

    def forward(self, x, mask, scale=1.0):  # x: [steps, batch, 6]; mask: [batch, steps]
        return self.lin(x) * mask.t().unsqueeze(-1) * scale

def build_model():
    return Tagger()

def example_inputs():
    return torch.randn(5, 4, 6), torch.ones(4, 5), torch.tensor(2.0)
"""


def test_micro_batch_options_default_to_dimension_0_and_refusing_batch_statistics(tmp_path):
    w = load_workload(write(tmp_path, SEQUENCE))
    assert w.batch_dims == {} and w.microbatch_statistics is False


def test_micro_batch_options_load_with_negative_dimensions_counted_from_the_end(tmp_path):
    w = load_workload(write(tmp_path, SEQUENCE + "\nbatch_dims = {'x': -2}\nmicrobatch_statistics = True\n"))
    assert w.batch_dims == {"x": 1} and w.microbatch_statistics is True


@pytest.mark.parametrize("options, fragments", [
    ("batch_dims = {'y': 1}", ["batch_dims names 'y', which is not an input of Tagger.forward",
                               "its inputs: x, mask, scale"]),
    ("batch_dims = {'scale': 0}", ["batch_dims names 'scale', a tensor without dimensions", "leave it out"]),
    ("batch_dims = {'x': 3}", ["batch_dims['x'] = 3", "x has shape [5, 4, 6]", "from 0 to 2"]),
    ("batch_dims = {'x': 1.0}", ["batch_dims['x'] = 1.0", "whole number"]),
    ("batch_dims = {'x': True}", ["batch_dims['x'] = True"]),
    ("batch_dims = [1]", ["batch_dims must map forward input names to dimensions", "[1]"]),
    ("batch_dims = {'x': 1, 'mask': 1}", ["mask's batch along dimension 1 (size 5)", "the batch has 4 rows",
                                          "x along dimension 1"]),
    ("microbatch_statistics = 'yes'", ["microbatch_statistics must be True or False, got 'yes'"]),
])
def test_bad_micro_batch_options_give_one_line_naming_the_file_the_value_and_the_fix(tmp_path, options, fragments):
    path = write(tmp_path, SEQUENCE + "\n" + options + "\n")
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(path)
    for fragment in fragments:
        assert fragment in message


ALIASED = """
import torch
from torch import nn

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)

def build_model():
    return Tagger()

def example_inputs():
    ids = torch.randint(20, (4, 6))
    return (ids, ids)  # labels are the inputs: one tensor twice
"""


def test_one_tensor_given_twice_as_inputs_makes_plans_that_apply(tmp_path):
    """new-user trial 8: `(ids, ids)` made plans whose fingerprint no later capture
    reproduced (torch.export captured the two inputs as one), so every plan was refused."""
    import placer
    from graphs.problem import build_problem
    from placer.plan import make_plan

    path = write(tmp_path, ALIASED)
    workload = load_workload(path)
    ids, labels = workload.inputs
    assert torch.equal(ids, labels) and ids.untyped_storage().data_ptr() != labels.untyped_storage().data_ptr()
    problem = build_problem(workload, "cpu:0,cpu:1")
    plan = make_plan(problem, [g % 2 for g in range(problem.n_groups)], "round_robin")
    model = workload.fresh_model()
    eager = workload.fresh_model()
    placed = placer.apply(model, plan)
    try:
        torch.testing.assert_close(placed(ids, ids), eager(ids, ids))
    finally:
        placed.close()
