"""capture: the OpGraph schema, shapes and bytes, weight tying, fallbacks to torch.fx,
untraceable models."""

import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import nn

from graphs.capture import capture, tensor_shapes
from graphs.trace import tensors_fingerprint
from graphs.workload import Workload
from graphs.errors import CaptureError, WorkloadError

NODE_ATTRS = {"op", "target", "module", "op_type", "params", "out_bytes", "order"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


class Tied(nn.Module):
    """An embedding whose weight the output projection reuses (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.block = Block()
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.block(self.emb(tokens)))


def workload(model, *inputs, **kw):
    return Workload(name="t", spec="t.py", model=model, inputs=inputs, **kw)


def by_module(g, module: str, op_type: str) -> dict:
    [data] = [d for d in g.nodes.values() if d["module"] == module and d["op_type"] == op_type]
    return data


def test_the_batch_size_lies_along_the_workloads_batch_dims():
    class StepsFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x, mask):  # x: [steps, batch, 6], mask: [batch]
            return self.lin(x) * mask.unsqueeze(-1)

    x, mask = torch.randn(5, 3, 6), torch.ones(3)
    assert capture(workload(StepsFirst(), x, mask)).graph["batch_size"] == 5  # dimension 0 unless named
    assert capture(workload(StepsFirst(), x, mask, batch_dims={"x": 1})).graph["batch_size"] == 3


def test_schema_shapes_and_bytes():
    model = Tied()
    g = capture(workload(model, torch.randint(0, 20, (2, 5))))
    assert nx.is_directed_acyclic_graph(g)
    assert g.graph["name"] == "t" and g.graph["granularity"] == "op" and g.graph["leaf_paths"] == []
    assert g.graph["capture"] == {"method": "export", "leaf_paths": [], "inputs": [{"shape": [2, 5], "dtype": "int64"}],
                                  "tensors": tensors_fingerprint(model), "shapes": tensor_shapes(model),
                                  "batch_dims": {}}
    assert set(g.graph["tensor_names"]) == {"emb.weight", "block.fc.weight", "block.fc.bias", "head.weight"}
    assert g.graph["batch_size"] == 2
    assert len(g.graph["fingerprint"]) == 16
    for name, data in g.nodes(data=True):
        assert NODE_ATTRS <= set(data), name
    assert sorted(d["order"] for _, d in g.nodes(data=True)) == list(range(g.number_of_nodes()))
    kinds = {d["op"]: d["op_type"] for d in g.nodes.values()}
    assert kinds == {"placeholder": "input", "output": "output", "call_function": kinds["call_function"]}
    emb = by_module(g, "emb", "embedding")
    assert emb["target"] == "aten.embedding.default" and emb["out_bytes"] == 2 * 5 * 8 * 4
    fc = by_module(g, "block.fc", "linear")
    assert fc["params"] == {"block.fc.weight": 8 * 8 * 4, "block.fc.bias": 8 * 4}
    assert by_module(g, "block", "activation")["target"] == "aten.relu.default"
    head = by_module(g, "head", "linear")
    assert head["out_bytes"] == 2 * 5 * 20 * 4 and head["params"] == {"emb.weight": 20 * 8 * 4}
    for u, v, data in g.edges(data=True):
        assert data["bytes"] == g.nodes[u]["out_bytes"]


def test_tied_weight_is_one_parameter_and_a_colocation_set():
    g = capture(workload(Tied(), torch.randint(0, 20, (2, 5))))
    users = [n for n, d in g.nodes(data=True) if "emb.weight" in d["params"]]
    assert len(users) == 2  # the head reaches the same tensor under another name
    assert users in g.graph["colocate"]


def test_capture_leaves_the_model_alone():
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {path: dict(vars(m)) for path, m in model.named_modules()}
    capture(workload(model, torch.randint(0, 20, (2, 5))))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {path: dict(vars(m)) for path, m in model.named_modules()} == attributes
    assert model.training and all(m.training for m in model.modules())


def test_leaf_modules_are_kept_whole_by_torch_fx():
    g = capture(workload(Tied(), torch.randint(0, 20, (2, 5)), leaf_modules=(Block,)))
    assert g.graph["capture"]["method"] == "fx"
    block = [d for d in g.nodes.values() if d["module"].startswith("block")]
    assert len(block) == 1 and block[0]["op"] == "call_module" and block[0]["op_type"] == "other"
    assert set(block[0]["params"]) == {"block.fc.weight", "block.fc.bias"}


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace a branch on a value
            return self.fc(x)
        return -self.fc(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = DataDependent()

    def forward(self, x):
        return self.inner(self.pre(x))


def test_untraceable_submodule_falls_back_to_torch_fx_and_a_leaf(capsys):
    w = workload(Outer(), torch.randn(3, 4))
    g = capture(w)  # the leaf branches on a value, so shapes come from a real run, silently
    assert capsys.readouterr() == ("", "")
    assert g.graph["capture"]["method"] == "fx"
    assert g.graph["granularity"] == "module" and g.graph["leaf_paths"] == ["inner"]
    inner = [d for d in g.nodes.values() if d["target"] == "inner"]
    assert len(inner) == 1 and inner[0]["op"] == "call_module" and inner[0]["out_bytes"] == 3 * 4 * 4
    exported, leaf = w.notes
    assert "torch.export could not capture" in exported and "torch.fx instead" in exported
    assert "'inner'" in leaf and "one unit" in leaf


def test_untraceable_root_names_module_and_line_and_a_fix_that_fits():
    w = workload(DataDependent(), torch.randn(3, 4))
    with pytest.raises(CaptureError) as err:
        capture(w)
    message = str(err.value)
    assert "DataDependent" in message and "test_capture.py:" in message and "if x.sum() > 0" in message
    assert "torch.export failed too" in message and "leaf_modules" in message and "\n" not in message
    # forward(self, x) already takes the batch as a tensor: no wrapper to write (new-user trial 2)
    assert "wrap the model in a module" not in message and "torch.where" in message


def test_an_untraceable_forward_of_non_tensor_arguments_is_asked_for_a_wrapper():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, batch):
            x = self.lin(batch["x"])
            return x if x.sum() > 0 else -x

    from graphs.trace_fx import trace_fx
    with pytest.raises(CaptureError, match="wrap the model in a module"):
        trace_fx(Branchy(), leaf_classes=(), leaf_paths=(), allow_fallback=False, inputs=None, kwargs={})


def test_capture_is_deterministic():
    a = capture(workload(Tied(), torch.randint(0, 20, (2, 5))))
    b = capture(workload(Tied(), torch.randint(0, 20, (2, 5))))
    assert a.graph == b.graph and dict(a.nodes(data=True)) == dict(b.nodes(data=True))
    assert list(a.edges(data=True)) == list(b.edges(data=True))


def test_a_model_that_fails_on_its_inputs_names_the_node_and_prints_nothing(capsys):
    bad = nn.Sequential(nn.Linear(4, 8), nn.Linear(5, 2))  # 8 features in, 5 expected
    with pytest.raises(WorkloadError) as err:
        capture(workload(bad, torch.randn(3, 4)))
    message = str(err.value)
    assert message.startswith("t.py: the model fails on its example inputs at layer '1' (Linear): ")
    assert "mat1 and mat2 shapes cannot be multiplied" in message and "\n" not in message
    assert capsys.readouterr() == ("", "")


def test_torchs_own_logs_of_a_failing_capture_never_reach_the_terminal_and_its_levels_come_back():
    # A fresh process: torch's log handler writes to the stderr of the moment torch was
    # imported, which under pytest is a capture no fixture of this test can see.
    script = textwrap.dedent("""
        import logging, torch
        from torch import nn
        from graphs.capture import capture
        from graphs.errors import WorkloadError
        from graphs.workload import Workload
        names = ("torch", "torch._subclasses.fake_tensor")
        before = [logging.getLogger(n).level for n in names]
        try:
            capture(Workload(name="t", spec="t.py", model=nn.Linear(2, 2), inputs=(torch.randn(2, 3),)))
        except WorkloadError as exc:
            print(exc)
        print([logging.getLogger(n).level for n in names] == before)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.stderr == ""
    message, restored = done.stdout.splitlines()
    assert message.startswith("t.py: the model fails on its example inputs") and restored == "True"
