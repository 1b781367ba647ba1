"""A model changed after placer.apply in ways its captures baked in (new-user trial 11): each was
a silently wrong number; now the next call refuses it in one line, and applying the plan again
to `placed.original` trains like the changed plain model."""

from __future__ import annotations

import copy
import tempfile
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graphs.capture import owning_module
from graphs.errors import ExecutionError, PlanError
from placer.plan import plan_from_assignment
from placer.runtime.placed import apply

TWO = ["cpu:0", "cpu:1"]


class Shifted:
    def __init__(self, shift: float):
        self.shift = shift

    def __call__(self, x):
        return x + self.shift


class Options(nn.Module):
    """A model with what trial 11 changed after apply: a Python float, a flag, a plain
    tensor attribute, a config object, dropout and a ModuleList that a forward loops over."""

    offset = 0.0  # a class-level default, which an instance attribute would hide (review 14)

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(double_last=False, inner=SimpleNamespace(shift=0.0))
        self.act = Shifted(0.0)  # a callable object with state, as activation classes are
        self.scale = 1.0
        self.use_skip = True
        self.mask = torch.ones(8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer(h).relu() + (h if self.use_skip else 0)
        h = self.drop(h * self.mask) * self.scale
        out = self.act(self.head(h)) + self.config.inner.shift + self.offset
        return out * 2 if self.config.double_last else out


def placed_pair() -> tuple[Options, object]:
    """(a plain model, its copy placed with its head on cpu:1)."""
    torch.manual_seed(0)
    model = Options()
    twin = copy.deepcopy(model)
    plan = plan_from_assignment(twin, lambda n: TWO[owning_module(n) == "head"], TWO, inputs=(torch.randn(4, 8),))
    return model, apply(twin, plan)


# (the change, what the refusal names, whether the plan still fits the changed model's graph)
@pytest.mark.parametrize("change, named, same_graph", [
    (lambda m: setattr(m, "scale", 2.0), "attribute 'scale' changed from 1.0 to 2.0", True),
    (lambda m: setattr(m.drop, "p", 0.0), "attribute 'drop.p' changed from 0.5 to 0.0", True),
    (lambda m: setattr(m, "mask", torch.zeros(8)), "attribute 'mask' changed from tensor", True),
    (lambda m: setattr(m, "mask", torch.ones(8)), "attribute 'mask' changed from tensor", True),  # graphs read the old
    (lambda m: setattr(m, "use_skip", False), "attribute 'use_skip' changed from True to False", False),
    (lambda m: setattr(m.config, "double_last", True), "attribute 'config.double_last' changed from False to True",
     False),
    (lambda m: m.layers.append(nn.Linear(8, 8)), "'layers.2' was added or removed", False),
    (lambda m: setattr(m.config.inner, "shift", 1.0), "attribute 'config.inner.shift' changed from 0.0 to 1.0", True),
    (lambda m: setattr(m.act, "shift", 1.0), "attribute 'act.shift' changed from 0.0 to 1.0", True),
    (lambda m: setattr(m, "offset", 1.0), "attribute 'offset' was set, hiding its class's value", True),
    (lambda m: delattr(m.config, "double_last"), "attribute 'config.double_last' was removed", None),
])
def test_a_change_the_captures_baked_in_is_refused_and_applying_again_trains_like_eager(change, named, same_graph):
    model, placed = placed_pair()
    try:
        x = torch.randn(4, 8)
        placed.eval(), model.eval()
        torch.testing.assert_close(placed(x), model(x))
        change(placed)  # `placed.scale = 2.0` sets the model's own attribute
        if same_graph is not None:
            change(model)
        for mode in ("train", "eval"):  # trial 11: a capture made later (eval) saw it, the training one did not
            getattr(placed, mode)()
            with pytest.raises(ExecutionError, match=f"the model changed after placer.apply \\({named}"):
                placed(x)
        if same_graph is None:  # a model that no longer runs
            return
        if not same_graph:  # another graph: the plan is for another model, and apply says so
            with pytest.raises(PlanError, match="plan was made for another model"):
                apply(placed.original, placed.plan)
            return
        placed.original.drop.p = model.drop.p = 0.0  # then one training step is the same in both
        again = apply(placed.original, placed.plan)
        try:
            again.eval(), model.eval()
            torch.testing.assert_close(again(x), model(x))
            again.train(), model.train()
            for m in (again, model):
                opt = torch.optim.SGD(m.parameters(), lr=0.1)
                m(x).square().mean().backward()
                opt.step()
            for (name, p), q in zip(again.named_parameters(), model.parameters()):
                torch.testing.assert_close(p, q, msg=name)
        finally:
            again.close()
    finally:
        placed.close()


def test_an_equal_value_set_again_and_bookkeeping_read_back_are_no_change():
    model, placed = placed_pair()
    try:
        x = torch.randn(4, 8)
        placed.scale = 1.0  # a new float object, equal: no change
        placed.config.double_last = False
        placed.original.epoch = 3  # a new name, which the captured forward cannot have read
        placed.config.architectures = ["Options"]  # what save_pretrained writes
        assert placed.scale == placed.original.scale == 1.0
        placed.eval(), model.eval()
        torch.testing.assert_close(placed(x), model(x))
        with torch.no_grad():
            placed.original.mask[:4] = 0  # in place: the graphs read the same tensor
            model.mask[:4] = 0
        torch.testing.assert_close(placed(x), model(x))
    finally:
        placed.close()


def test_saving_a_hugging_face_model_is_no_change():
    """review 14: save_pretrained writes config.architectures and config.dtype, which no forward
    reads; training every N steps with a checkpoint between was refused."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    plan = plan_from_assignment(twin, lambda n: TWO[owning_module(n).startswith("classifier")], TWO, inputs=(ids,))
    placed = apply(twin, plan)
    try:
        torch.testing.assert_close(placed(ids).logits, model(ids).logits)
        with tempfile.TemporaryDirectory() as folder:
            placed.save_pretrained(folder)
        torch.testing.assert_close(placed(ids).logits, model(ids).logits)
        placed.config.num_labels = 3  # what a forward may read is still checked
        with pytest.raises(ExecutionError, match="attribute 'config"):
            placed(ids)
    finally:
        placed.close()


def test_a_global_module_hook_added_after_apply_is_refused():
    """review 14: torch.nn.modules.module.register_module_forward_hook changed every eager
    module's output while the placed graphs ran without it."""
    model, placed = placed_pair()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(ExecutionError, match=r"\(a global module hook was added or removed\)"):
            placed(torch.randn(4, 8))
    finally:
        handle.remove()
        placed.close()


def test_a_hook_removed_after_the_snapshot_is_a_change():
    """A removal moves no hook counter: the table's size shows it."""
    from placer.runtime.model_changes import ModelSnapshot

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    own = model[0].register_forward_hook(lambda *args: None)
    every = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        snapshot = ModelSnapshot(list(model.named_modules()))
        assert snapshot.change() is None
        every.remove()
        assert snapshot.change() == "a global module hook was added or removed"
        snapshot = ModelSnapshot(list(model.named_modules()))
        own.remove()
        assert snapshot.change() == "a hook of module '0' was added or removed"
    finally:
        every.remove()


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.to(torch.float64), torch.float64),
                                            (lambda m: m.bfloat16(), torch.bfloat16)])
def test_parameters_converted_in_place_are_refused_and_a_plan_for_the_converted_model_runs_it(convert, dtype):
    """`.to(dtype)` converts a parameter in place (its `.data`), keeping the object; on a model
    without buffers nothing was replaced, and GPT2 made bfloat16 after apply then failed in torch
    on the float32 constants its capture held (review 14)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    plan = plan_from_assignment(twin, lambda n: TWO[owning_module(n) == "2"], TWO, inputs=(torch.randn(4, 8),))
    placed = apply(twin, plan)
    try:
        convert(placed)
        convert(model)
        assert placed.original[0].weight.dtype == dtype
        with pytest.raises(ExecutionError, match=f"the model changed after placer.apply \\('0.weight' is {dtype} "
                                                 f"where it was torch.float32: .to\\(\\), .half\\(\\)"):
            placed(torch.randn(4, 8, dtype=dtype))
        with pytest.raises(PlanError, match="plan was made for another model"):
            apply(placed.original, placed.plan)
        x = torch.randn(4, 8, dtype=dtype)
        again = apply(placed.original, plan_from_assignment(placed.original, lambda n: TWO[owning_module(n) == "2"],
                                                            TWO, inputs=(x,)))
        try:
            torch.testing.assert_close(again(x), model(x))
        finally:
            again.close()
    finally:
        placed.close()


def test_a_module_whose_class_was_swapped_is_refused():
    """`m.__class__ = Other` keeps every table and attribute but runs another forward."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model, placed = placed_pair()
    try:
        placed.head.__class__ = Doubled
        with pytest.raises(ExecutionError, match=r"\(module 'head' is a Doubled where it was a Linear\)"):
            placed(torch.randn(4, 8))
    finally:
        placed.close()


def test_a_parameter_moved_to_another_device_is_refused(monkeypatch):
    """Where a tensor can move (a GPU is visible; here pretended, and the move is to the meta device),
    the snapshot keeps every parameter's device: `.cuda()` moves them in place."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, placed = placed_pair()
    try:
        placed.head.to("meta")
        with pytest.raises(ExecutionError, match=r"\('head.weight' is on meta where the plan put it on cpu: .to\(\)"):
            placed(torch.randn(4, 8))
    finally:
        placed.close()


def test_a_leaf_module_converted_after_apply_is_refused_too():
    """A module the capture runs whole reads its insides live, so its tables are not checked, but its tensors'
    dtypes are: converted, it met its neighbours' float32 tensors with torch's raw error (review 15)."""
    from tests.test_trace import HoldsAReader  # fx keeps its reader of a buffer's value whole

    torch.manual_seed(0)
    model, x = HoldsAReader(), torch.randn(3, 4)
    plan = plan_from_assignment(model, lambda n: TWO[n.name.startswith("head")], TWO, inputs=(x,))
    placed = apply(copy.deepcopy(model), plan)
    try:
        assert "inner" in placed.graphs[0].traced.leaf_paths
        placed.original.inner.double()
        with pytest.raises(ExecutionError, match=r"\('inner.fc.weight' is torch.float64 where it was torch.float32"):
            placed(x)
    finally:
        placed.close()
