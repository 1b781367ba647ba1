"""graphs.trace: one capture per mode, stable retraces, arguments at their defaults,
calls a capture covers, outputs of the eager type, and a model left as it was found."""

from __future__ import annotations

import copy
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from graphs.errors import CaptureError
from graphs.trace import fingerprint, trace_model, training_flags

Pair = namedtuple("Pair", ["main", "side"])


class PosNet(nn.Module):
    """Positions made in forward (a tensor constant for fx), dropout, a dict output."""

    def __init__(self, seq: int = 6):
        super().__init__()
        self.seq = seq
        self.tok = nn.Embedding(50, 8)
        self.pos = nn.Embedding(seq, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids, mask=None):
        h = self.tok(ids) + self.pos(torch.arange(self.seq)) + torch.tensor([0.5])
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        h = F.dropout(self.fc(h), p=0.5, training=self.training)
        return {"hidden": h, "pair": Pair(h.sum(-1), h.mean())}


def ids(batch: int = 3, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, 50, (batch, seq))


@pytest.mark.parametrize("method", ["export", "fx"])
def test_retracing_gives_the_same_graph_and_fingerprint(method):
    model, x = PosNet(), ids()
    a = trace_model(model, inputs=(x,), method=method)
    b = trace_model(model, inputs=(x,), method=method)
    assert fingerprint(model, a.gm) == fingerprint(model, b.gm)
    assert [(n.op, n.name) for n in a.gm.graph.nodes] == [(n.op, n.name) for n in b.gm.graph.nodes]
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]  # fx stows constants on the graph


@pytest.mark.parametrize("method", ["export", "fx"])
def test_omitted_optional_arguments_are_traced_at_their_defaults(method):
    torch.manual_seed(0)
    model, x = PosNet().eval(), ids()
    traced = trace_model(model, inputs=(x,), method=method, mode="eval")
    assert len(traced.placeholders) == 1
    torch.testing.assert_close(traced.run(x), model(x))
    assert traced.bind((x,), {"mask": None}) is not None  # passing the default is the same call
    assert traced.bind((x, torch.ones(3, 6)), {}) is None  # another call: another capture
    with_mask = trace_model(model, inputs=(x,), kwargs={"mask": torch.ones(3, 6)}, method=method, mode="eval")
    torch.testing.assert_close(with_mask.run(x, mask=torch.ones(3, 6)), model(x, torch.ones(3, 6)))



class Scaled(nn.Module):
    """Python scalars with defaults beside the tensor (new-user trial 5: fx's check of a
    baked float crashed every capture on the fx path)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale: float = 0.5, flag: bool = True, n: int = 3):
        h = self.fc(x) * scale
        return h.relu() * n if flag else h


@pytest.mark.parametrize("method", ["export", "fx"])
def test_scalar_arguments_at_their_defaults_are_baked_and_another_value_is_another_call(method):
    model, x = Scaled(), torch.randn(2, 4)
    traced = trace_model(model, inputs=(x,), method=method)
    assert len(traced.placeholders) == 1
    torch.testing.assert_close(traced.run(x), model(x))
    assert traced.bind((x, 0.5, True, 3), {}) is not None  # the defaults, passed
    assert traced.bind((x,), {"scale": 2.0}) is None and traced.bind((x,), {"flag": False}) is None
    other = trace_model(model, inputs=(x, 2.0), kwargs={"flag": False}, method=method)
    torch.testing.assert_close(other.run(x, 2.0, flag=False), model(x, 2.0, flag=False))


class Reshaped(nn.Module):
    """A tuple and a dict among the defaults, a dict output (fx flattens the call itself
    then, and its code generation failed on the tuple's leaves: "invalid syntax")."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, shape: tuple = (2, 3), weights: dict = {"a": 2.0}):  # read, never mutated
        return {"y": self.fc(x).view(x.shape[0], *shape) * weights["a"], "x": x}


class Extra(Reshaped):
    def forward(self, x, shape: tuple = (2, 3), extra=None):
        y = self.fc(x) if extra is None else self.fc(x) + extra
        return y.view(x.shape[0], *shape)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_tuple_default_before_an_optional_tensor_the_call_passes(method):
    # new-user trial 7: fx wrote the tensor's default into its flattening assignment, a syntax error
    model, x, extra = Extra(), torch.randn(4, 6), torch.ones(6)
    traced = trace_model(model, inputs=(x,), kwargs={"extra": extra}, method=method)
    torch.testing.assert_close(traced.run(x, extra=extra), model(x, extra=extra))


@pytest.mark.parametrize("method", ["export", "fx"])
def test_tuple_and_dict_defaults_are_baked_and_the_output_keeps_its_structure(method):
    model, x = Reshaped(), torch.randn(4, 6)
    traced = trace_model(model, inputs=(x,), method=method)
    out, expected = traced.run(x), model(x)
    assert type(out) is dict and out.keys() == expected.keys()
    torch.testing.assert_close(out, expected)
    assert traced.bind((x,), {"shape": (3, 2)}) is None  # another value: another call


class WithOutput(nn.Module):
    """Returns a transformers ModelOutput, its loss computed when labels are given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, labels=None):
        logits = self.fc(x)
        return CausalLMOutput(loss=None if labels is None else (logits - labels).pow(2).mean(), logits=logits)


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_model_output_comes_back_as_its_own_type(method):
    # new-user trial 6: on the fx path it came back as a dict, and a loss_fn reading out.loss crashed
    model, x = WithOutput(), torch.randn(4, 6)
    for kwargs in ({"labels": x}, {}):
        out, expected = trace_model(model, inputs=(x,), kwargs=kwargs, method=method).run(x, **kwargs), model(x, **kwargs)
        assert type(out) is type(expected) and list(out.keys()) == list(expected.keys())
        torch.testing.assert_close(out.logits, expected.logits)
    assert out.loss is None


@pytest.mark.parametrize("method", ["export", "fx"])
def test_calls_python_binds_alike_give_the_same_placeholder_values(method):
    model, x = PosNet().eval(), ids()
    traced = trace_model(model, inputs=(x,), method=method, mode="eval")
    expected = traced.bind((x,), {})
    assert list(expected.values()) == [x]
    for args, kwargs in [((), {"ids": x}), ((x, None), {}), ((x,), {"mask": None}), ((), {"ids": x, "mask": None})]:
        values = traced.bind(args, kwargs)
        assert values.keys() == expected.keys() and all(a is b for a, b in zip(values.values(), expected.values()))
    with pytest.raises(TypeError):
        traced.bind((x, None, x), {})  # more arguments than the forward takes, as Python says
    with pytest.raises(TypeError):
        traced.bind((), {"mask": None})  # `ids` is required


def test_training_flags_are_in_model_modules_order_each_module_once():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(nn.Sequential(shared, nn.Dropout()), nn.ModuleDict({"a": shared, "b": nn.ReLU()}))
    model.register_module("empty", None)
    model[0][1].eval()
    model[1]["b"].eval()
    assert training_flags(model) == tuple(m.training for m in model.modules())
    assert len(training_flags(model)) == 6

def test_outputs_come_back_as_the_eager_type_and_are_mutable():
    model, x = PosNet().eval(), ids()
    out = trace_model(model, inputs=(x,), mode="eval").run(x)
    assert type(out) is dict and type(out["pair"]) is Pair
    out["loss"] = out["hidden"].sum()  # a plain dict, not fx's immutable_dict


def test_one_capture_per_mode_and_the_model_keeps_its_own_mode():
    model, x = PosNet(), ids()
    model.fc.eval()  # a mixed state, restored after each capture
    flags = [m.training for m in model.modules()]
    train = trace_model(model, inputs=(x,), mode="train")
    evaluation = trace_model(model, inputs=(x,), mode="eval")
    assert [m.training for m in model.modules()] == flags
    dropping = lambda t: [n.args[2] for n in t.gm.graph.nodes if str(n.target) == "aten.dropout.default"]  # noqa: E731
    assert dropping(train) == [True] and dropping(evaluation) in ([], [False])
    assert train.training == (True,) * 4 and evaluation.training == (False,) * 4


def test_an_export_capture_covers_other_batch_sizes_but_not_what_the_model_fixes():
    model = PosNet().eval()
    traced = trace_model(model, inputs=(ids(3),), mode="eval")
    assert traced.bind((ids(7),), {}) is not None  # the batch dim is dynamic
    torch.testing.assert_close(traced.run(ids(7))["hidden"].shape, torch.Size([7, 6, 8]))
    assert traced.bind((ids(1),), {}) is None  # a batch of one is specialized: its own capture
    assert traced.bind((ids(3, 4),), {}) is None  # the model fixes the sequence length
    assert "size 4 in dim 1" in traced.why_not((ids(3, 4),), {})
    assert traced.bind((ids(3).int(),), {}) is None  # another dtype


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = Counter()

    def forward(self, x):
        return self.counter(x) * 2


class RunningMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("running", torch.ones(4))

    def forward(self, x):
        with torch.no_grad():
            self.running.mul_(0.9).add_(x.mean(0))
        return self.fc(x) - self.running


@pytest.mark.parametrize("method", ["export", "fx"])
def test_a_python_attribute_set_in_forward_is_refused_naming_the_module(method):
    model = Counted()
    with pytest.raises(CaptureError) as err:
        trace_model(model, inputs=(torch.randn(2, 4),), method=method)
    message = str(err.value)
    assert "module 'counter' (Counter) changes its attribute 'calls'" in message and "leaf_modules" in message
    assert model.counter.calls == 0


def test_export_records_a_buffer_updated_in_place_and_leaves_it_alone():
    model, x = RunningMean(), torch.randn(2, 4)
    traced = trace_model(model, inputs=(x,))
    assert traced.method == "export" and torch.equal(model.running, torch.ones(4))
    reference = RunningMean()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(traced.run(x), reference(x))
    torch.testing.assert_close(model.running, reference.running)  # updated once, as eager does


def test_fx_refuses_a_buffer_update_it_cannot_record():
    model = RunningMean()
    with pytest.raises(CaptureError, match="module 'RunningMean' .* changes its attribute 'running'"):
        trace_model(model, inputs=(torch.randn(2, 4),), method="fx")
    assert torch.equal(model.running, torch.ones(4))


def test_leaf_modules_run_as_themselves_so_their_updates_happen_every_call():
    model = Counted()
    traced = trace_model(model, leaf_modules=(Counter,), inputs=(torch.randn(2, 4),))
    assert traced.method == "fx" and model.counter.calls == 0
    traced.run(torch.randn(2, 4))
    traced.run(torch.randn(2, 4))
    assert model.counter.calls == 2


def test_a_model_and_its_fresh_copies_are_captured_once_while_nothing_changes(monkeypatch):
    import graphs.trace_export
    from graphs.workload import Workload

    exports = []
    real = graphs.trace_export.export_model
    monkeypatch.setattr(graphs.trace_export, "export_model", lambda *a: exports.append(1) or real(*a))
    workload = Workload(name="pos", spec="pos.py", model=PosNet().eval(), inputs=(ids(),))
    first = trace_model(workload.model, inputs=workload.inputs, mode="eval")
    copy = workload.fresh_model()
    again = trace_model(copy, inputs=(ids(5),), mode="eval")  # other values, another batch size: other shapes
    kept = trace_model(copy, inputs=(ids(),), mode="eval")
    assert len(exports) == 2 and kept.gm is not first.gm  # a graph of its own
    read = {str(n.target): n for n in kept.gm.graph.nodes if n.op == "get_attr"}
    assert kept.gm.get_parameter("fc.weight") is copy.fc.weight and "fc.weight" in read
    x = ids()
    torch.testing.assert_close(kept.run(x)["hidden"], copy(x)["hidden"])
    assert again.bind((ids(5),), {}) is not None
    third = workload.fresh_model()
    kept_for_source = trace_model(third, inputs=(ids(5),), mode="eval")  # a copy's capture serves the next copy
    assert len(exports) == 2 and kept_for_source.gm.get_parameter("fc.weight") is third.fc.weight
    # profiling and placer.apply ask for an export outright, after capture() asked "auto": one export serves both
    trace_model(third, inputs=(ids(5),), mode="eval", method="export", allow_fallback=False)
    assert len(exports) == 2
    copy.seq = 6.0  # any change of what the forward may read makes a new capture
    trace_model(copy, inputs=(ids(),), mode="eval")
    trace_model(copy, inputs=(ids(),), mode="train")
    assert len(exports) == 4


def tiny_gpt2(use_cache: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16, use_cache=use_cache))


def test_a_cache_in_the_output_names_use_cache_false_as_the_fix_first():
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CaptureError) as caught:
        trace_model(tiny_gpt2(use_cache=True), inputs=(ids,))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot capture GPT2LMHeadModel: its output holds the model's key/value cache "
                              "(DynamicCache)")
    assert message.endswith("Fix: set `use_cache=False` in the model's config (e.g. GPT2Config(..., use_cache=False)) "
                            "and pass no use_cache=True")
    assert trace_model(tiny_gpt2(use_cache=False), inputs=(ids,)).method == "export"  # the fix works


def test_a_call_asking_for_the_cache_names_the_fix_where_only_export_may_capture():
    # new-user trial 11: placed(ids, use_cache=True) needs a new capture (export only, as the plan's): it gave
    # export's "Found <class DynamicCache> in output ..." alone
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CaptureError, match=r"^torch.export cannot capture GPT2LMHeadModel: set `use_cache=False` .* "
                                           r"and pass no use_cache=True: its output holds a cache object \(DynamicCache\)"):
        trace_model(tiny_gpt2(use_cache=False), inputs=(ids,), kwargs={"use_cache": True}, method="export")


def test_a_size_that_depends_on_tensor_values_falls_back_to_fx_naming_the_module():
    from tests.test_cases import load_case

    case = load_case("moe_top1_routing")  # top-1 routing: each expert's rows come from nonzero()
    model, inputs = case.build_model(), case.example_inputs()
    traced = trace_model(model, inputs=inputs)
    assert traced.method == "fx"
    assert "the size of nonzero's output in module 'moe' (MoE) depends on tensor values" in traced.fallback_notes[0]
    torch.testing.assert_close(traced.run(*inputs), model(*inputs))
    with pytest.raises(CaptureError, match="torch.export cannot capture Net: the size of nonzero's output"):
        trace_model(model, inputs=inputs, method="export")


class HalvesItsInput(nn.Module):
    def __init__(self, through_view: bool):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.through_view = through_view

    def forward(self, x):
        h = self.fc(x)
        h.relu_()  # its own value: nothing the caller sees
        (x[:, :2] if self.through_view else x).mul_(0.5)
        return h + x


@pytest.mark.parametrize("method", ["export", "fx"])
@pytest.mark.parametrize("through_view", [False, True])
def test_a_forward_that_changes_its_input_in_place_is_refused_naming_it(method, through_view):
    """new-user trial 8: eager changes the caller's tensor, a placed model changed its own copy."""
    with pytest.raises(CaptureError) as caught:
        trace_model(HalvesItsInput(through_view), inputs=(torch.randn(3, 4),), method=method)
    message = str(caught.value)
    assert message.startswith("HalvesItsInput.forward changes its input 'x' in place") and "x.clone()" in message


class WritesCopiesOfItsInput(nn.Module):
    """Each write lands on a copy of an input in eager (a dtype change, contiguous() of
    a transpose, indexing by a tensor): the caller's tensors stay as they were."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, ids, x):
        as_float = ids.to(torch.float32)
        as_float.mul_(2)
        rows = x.t().contiguous()
        rows.add_(1)
        picked = x[ids[:, 0] % 3]
        picked.add_(1)
        return self.fc(x) + as_float.sum() + rows.sum() + picked.sum()


@pytest.mark.parametrize("method", ["export", "fx"])
def test_writes_to_copies_of_an_input_are_not_refused(method):
    ids, x = torch.randint(0, 5, (3, 4)), torch.randn(3, 4)
    model = WritesCopiesOfItsInput()
    traced = trace_model(model, inputs=(ids, x), method=method)
    torch.testing.assert_close(traced.run(ids.clone(), x.clone()), model(ids.clone(), x.clone()))


def test_why_a_capture_does_not_cover_a_call_is_one_short_line():
    """review: tensors inside a structured argument were printed whole."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, extra=None, t: float = 1.0):
            return self.fc(x) / t

    traced = trace_model(Scaled(), inputs=(torch.randn(3, 4),), method="export")
    why = traced.why_not((torch.randn(3, 4),), {"extra": (torch.randn(2, 4), torch.randn(200, 4)), "t": 2.0})
    assert "\n" not in why and "Tensor(200, 4)" in why and "t=2.0" in why and len(why) < 200


class ReadsItsScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("k", torch.tensor(2.0))

    def forward(self, x):
        return self.fc(x) * float(self.k)  # export refuses (data-dependent); fx would bake 2.0 in


class HoldsAReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ReadsItsScale()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_a_buffer_read_as_a_python_number_is_never_baked_into_the_capture():
    """Baked in, a buffer updated in place afterwards was silently not seen (1.5 off at the output):
    the module reading it runs whole instead, and the model's own forward doing it is refused."""
    from graphs.errors import CaptureError
    from placer.plan import plan_from_assignment
    from placer.runtime.placed import apply

    torch.manual_seed(0)
    model, x = HoldsAReader(), torch.randn(3, 4)
    traced = trace_model(model, inputs=(x,))
    assert traced.leaf_paths == ("inner",) and "reads 'inner.k' as a Python value (float())" in \
        traced.fallback_notes[-1]
    twin = copy.deepcopy(model)
    plan = plan_from_assignment(twin, lambda n: ["cpu:0", "cpu:1"][n.name.startswith("head")], ["cpu:0", "cpu:1"],
                                inputs=(x,))
    placed = apply(twin, plan)
    try:
        with torch.no_grad():
            placed.original.inner.k.fill_(5.0)
            model.inner.k.fill_(5.0)
        torch.testing.assert_close(placed(x), model(x))
    finally:
        placed.close()
    with pytest.raises(CaptureError, match=r"own forward \(ReadsItsScale\) at .*reads 'k' as a Python value "
                                           r"\(float\(\)\).*read it as a tensor"):
        trace_model(ReadsItsScale(), inputs=(x,))


class ReadsAValueOfItsBuffer(nn.Module):
    def __init__(self, read):
        super().__init__()
        self.fc, self.read = nn.Linear(4, 4), read
        self.register_buffer("k", torch.tensor([2.0, 3.0]))
        self.plain = torch.tensor(4.0)  # a tensor attribute, not a buffer: fx reads it concrete too

    def forward(self, x):
        return self.fc(x) * self.read(self)


@pytest.mark.parametrize("read", [
    lambda m: m.k.sum().item(),  # a value computed from the buffer (review 15)
    lambda m: float(m.k[0]),
    lambda m: 2.0 if m.k[1] > 2.5 else 1.0,  # a step counter's `if`
    lambda m: 2.0 if torch.equal(m.k, torch.ones(2)) else 1.0,
    lambda m: float(m.k.numpy()[0]),
    lambda m: float(m.plain),
])
def test_a_value_read_from_a_buffer_or_tensor_attribute_is_refused_not_baked(read):
    x = torch.randn(3, 4)
    with pytest.raises(CaptureError, match=r"reads '(k|plain)' as a Python value"):
        trace_model(ReadsAValueOfItsBuffer(read), inputs=(x,), method="fx")
    model = ReadsAValueOfItsBuffer(read)  # export first: it baked a plain tensor attribute read as a number
    try:
        traced = trace_model(model, inputs=(x,))
    except CaptureError as exc:
        assert "as a Python value" in str(exc)
    else:  # export records `.item()` of a buffer as an op of the graph: it reads the value live
        with torch.no_grad():
            model.k.fill_(7.0), model.plain.fill_(5.0)
        torch.testing.assert_close(traced.run(x), model(x))
    assert trace_model(ReadsAValueOfItsBuffer(lambda m: m.k[0] * m.plain), inputs=(torch.randn(3, 4),),
                       method="fx").method == "fx"  # read as tensors: captured
