"""placer.runtime.placed: the placed module behaves as the eager model does in every
respect a training loop sees: modes, no_grad, other batch sizes and sequence lengths,
buffers, state_dict and tied weights, devices chosen at apply time, copies."""

from __future__ import annotations

import copy
import io
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import placer
from graphs.capture import owning_module
from graphs.errors import ExecutionError, PlanError
from placer.plan import Plan, plan_from_assignment
from placer.runtime import PlacedModule, apply
from placer.runtime.placed import EXTRA_CAPTURES

TWO = ["cpu:0", "cpu:1"]
Outputs = namedtuple("Outputs", ["logits", "aux"])


class TinyLM(nn.Module):
    """Token and position embeddings (positions up to the input's length), dropout,
    a running count buffer, an auxiliary output in training only, and a tied head."""

    def __init__(self, vocab: int = 40, width: int = 16, max_len: int = 12):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(width))
        self.aux = nn.Linear(width, 2)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, ids):
        self.seen.add_(ids.shape[0])
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        h = h + self.body(h)
        logits = self.head(h)
        return Outputs(logits, self.aux(h.mean(1))) if self.training else logits


def tokens(batch: int = 4, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 40, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def body_on_second(node) -> str:
    return "cpu:1" if owning_module(node).startswith(("body", "aux")) else "cpu:0"


@pytest.fixture
def pair():
    """(eager reference, placed copy of the same weights)."""
    torch.manual_seed(0)
    ref = TinyLM()
    model = copy.deepcopy(ref)
    placed = apply(model, plan_from_assignment(model, body_on_second, TWO, inputs=(tokens(),)))
    yield ref, placed
    placed.close()


def assert_same(a, b):
    assert type(a) is type(b)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y)


def test_train_and_eval_give_eager_behaviour_of_that_mode(pair):
    ref, placed = pair
    x = tokens()
    torch.manual_seed(7)
    out = placed(x)
    torch.manual_seed(7)
    assert_same(out, ref(x))  # train: dropout on, the auxiliary output there
    placed.eval()
    ref.eval()
    assert not placed.training and not placed.original.training and not placed.body[2].training
    assert_same(placed(x), ref(x))  # eval: a tensor, dropout off
    with torch.no_grad():
        out, expected = placed(x), ref(x)
    assert not out.requires_grad
    assert_same(out, expected)
    placed.train()
    ref.train()
    torch.manual_seed(8)
    out = placed(x)
    torch.manual_seed(8)
    assert_same(out, ref(x))
    torch.testing.assert_close(placed.seen, ref.seen)  # the buffer counted every forward, once


@pytest.mark.parametrize("batch,seq", [(7, 8), (1, 8), (4, 5), (3, 12)])
def test_other_batch_sizes_and_sequence_lengths_work_where_eager_does(pair, batch, seq):
    ref, placed = pair
    x = tokens(batch, seq)
    placed.eval()
    ref.eval()
    assert_same(placed(x), ref(x))
    placed.train()
    ref.train()
    torch.manual_seed(3)
    out = placed(x)
    out.logits.sum().backward()
    torch.manual_seed(3)
    expected = ref(x)
    expected.logits.sum().backward()
    assert_same(out, expected)
    torch.testing.assert_close(placed.tok.weight.grad, ref.tok.weight.grad)


def test_keyword_arguments_bind_like_the_forward_signature(pair):
    ref, placed = pair
    placed.eval()
    ref.eval()
    assert_same(placed(ids=tokens()), ref(tokens()))
    with pytest.raises(TypeError):
        placed(tokens(), tokens())


def test_state_dict_tied_weights_and_the_original_stay_the_eager_ones(pair):
    ref, placed = pair
    assert list(placed.state_dict()) == list(ref.state_dict())
    assert placed.head.weight is placed.tok.weight and placed.original.head.weight is placed.original.tok.weight
    assert isinstance(placed, PlacedModule) and isinstance(placed.original, TinyLM)
    fresh = TinyLM()
    fresh.load_state_dict(placed.state_dict())
    placed.load_state_dict(fresh.state_dict())


def test_apply_never_changes_a_parameter_or_buffer():
    torch.manual_seed(0)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placed = apply(model, plan_from_assignment(model, body_on_second, TWO, inputs=(tokens(),)))
    assert all(torch.equal(before[k], v) for k, v in placed.state_dict().items())
    placed.close()


def test_applying_a_plan_to_a_placed_model_is_refused_and_its_original_takes_it_again():
    torch.manual_seed(0)
    model = TinyLM().eval()
    plan = plan_from_assignment(model, body_on_second, TWO, inputs=(tokens(),))
    placed = apply(model, plan)
    with pytest.raises(PlanError, match=r"^the model is already placed: apply the plan to its \.original"):
        apply(placed, plan)
    placed.close()
    again = apply(placed.original, plan)
    torch.testing.assert_close(again(tokens()), model(tokens()))
    again.close()


def test_torch_compile_runs_a_placed_model_as_it_is_and_a_compiled_model_is_refused_in_one_line():
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    plan = plan_from_assignment(model, body_on_second, TWO, inputs=(tokens(),))
    placed = apply(model, plan)
    compiled = torch.compile(placed)  # dynamo leaves the placed forward to run as it is
    for run in (compiled, ref):
        torch.manual_seed(1)  # the same dropout masks
        out = run(tokens())
        (out.logits.sum() + out.aux.sum()).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with pytest.raises(PlanError, match=r"^the model is a torch.compile wrapper: apply the plan to the model itself "
                                        r"\(`placer.apply\(model._orig_mod, plan\)`\)"):
        apply(torch.compile(TinyLM()), plan)
    placed.close()


def test_devices_are_remapped_one_to_one_at_apply_time():
    torch.manual_seed(0)
    ref = TinyLM().eval()
    model = copy.deepcopy(ref)
    plan = plan_from_assignment(model, body_on_second, TWO, inputs=(tokens(),))
    placed = apply(model, plan, devices="cpu:2,cpu:3")
    assert {c.device for c in placed.executor.chunks} == {"cpu:2", "cpu:3"}
    assert_same(placed(tokens()), ref(tokens()))
    placed.close()
    with pytest.raises(PlanError, match="as many, of the same kinds"):
        apply(TinyLM(), plan, devices="cpu:0")
    gpu_plan = Plan(devices=["cuda:0", "cpu"], assignment={}, device_map={}, fingerprint="f")
    with pytest.raises(PlanError, match=r"\(cuda,cpu\)"):
        apply(TinyLM(), gpu_plan, devices="cpu:0,cpu:1")


def test_copies_and_pickles_are_placed_again(pair, tmp_path):
    ref, placed = pair
    placed.eval()
    ref.eval()
    twin = copy.deepcopy(placed)
    assert isinstance(twin, PlacedModule) and not twin.training
    assert twin.tok.weight is not placed.tok.weight and twin.head.weight is twin.tok.weight
    assert_same(twin(tokens()), ref(tokens()))
    buffer = io.BytesIO()
    torch.save(placed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_same(loaded(tokens()), ref(tokens()))
    assert list(loaded.state_dict()) == list(ref.state_dict())
    twin.close()
    loaded.close()


class Gated(nn.Module):
    """An output structure that depends on an argument: a dict with the mask given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, mask=None):
        y = F.relu(self.fc(x))
        return y if mask is None else {"y": y * mask, "kept": mask.sum()}


def on_cpu0(cls: type) -> tuple[nn.Module, PlacedModule, torch.Tensor]:
    """A `cls()` model, a copy of it placed all on cpu:0 of two devices, and a (3, 6) batch."""
    torch.manual_seed(0)
    ref = cls()
    model = copy.deepcopy(ref)
    x = torch.randn(3, 6)
    return ref, placer.apply(model, plan_from_assignment(model, lambda n: "cpu:0", TWO, inputs=(x,))), x


def test_a_call_with_other_arguments_gets_its_own_capture():
    ref, placed, x = on_cpu0(Gated)
    assert_same(placed(x), ref(x))
    out = placed(x, mask=torch.ones(3, 6))
    assert type(out) is dict
    torch.testing.assert_close(out["y"], ref(x, torch.ones(3, 6))["y"])
    out["extra"] = 1  # a plain, mutable dict
    placed.close()


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, temperature: float = 1.0):
        return self.fc(x) / temperature


def test_a_float_argument_new_on_every_call_keeps_few_captures_and_warns_once():
    """new-user trial 8: an annealed float argument made a capture per call, each kept
    for good: memory grew every step, silently."""
    ref, placed, x = on_cpu0(Tempered)
    kept = len(placed.graphs)
    temperatures = [2.0 - 0.1 * step for step in range(12)] + [2.0]  # the first value again, its capture dropped
    with pytest.warns(UserWarning) as caught:
        for t in temperatures:
            torch.testing.assert_close(placed(x, t), ref(x, t))
            assert len(placed.graphs) <= kept + EXTRA_CAPTURES
    assert len(caught) == 1 and "temperature" in str(caught[0].message) and "as tensors" in str(caught[0].message)
    placed.close()


def test_a_dropped_capture_still_runs_the_backward_of_its_calls():
    """review: dropping a capture closed its executor while a backward through it was pending."""
    ref, placed, x = on_cpu0(Tempered)
    temperatures = [1.0 + step / 10 for step in range(EXTRA_CAPTURES + 3)]
    with pytest.warns(UserWarning, match="new capture"):
        sum(placed(x, t).sum() for t in temperatures).backward()
    sum(ref(x, t).sum() for t in temperatures).backward()
    for p, q in zip(placed.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    placed.close()



@pytest.mark.parametrize("devices", [["cpu:0"], TWO])
def test_outputs_require_grad_exactly_where_eager_s_do(devices):
    """Frozen parameters and inputs without grad give outputs without grad (one device:
    a plain call; two: the engine), as eager; a parameter unfrozen later counts at once."""
    torch.manual_seed(0)
    ref = Gated()
    model = copy.deepcopy(ref)
    x = torch.randn(3, 6)
    plan = plan_from_assignment(model, lambda n: devices[-1] if owning_module(n) == "fc" else devices[0], devices,
                                inputs=(x,))
    placed = placer.apply(model, plan)
    for m in (ref, placed):
        m.requires_grad_(False)
    assert not placed(x).requires_grad and not ref(x).requires_grad
    assert placed(x.requires_grad_()).requires_grad and ref(x).requires_grad
    x = x.detach()
    placed.fc.bias.requires_grad_(True)
    ref.fc.bias.requires_grad_(True)
    out, expected = placed(x), ref(x)
    assert out.requires_grad and expected.requires_grad
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(placed.fc.bias.grad, ref.fc.bias.grad)
    assert placed.fc.weight.grad is None
    placed.close()

def test_a_closed_placed_model_refuses_every_call_at_once(pair):
    _, placed = pair
    placed.close()
    with pytest.raises(ExecutionError, match="closed"):
        placed(tokens())
    placed.eval()  # a mode never run before would need a new capture: still refused
    with pytest.raises(ExecutionError, match="closed"):
        placed(tokens())


def split_at(model: nn.Module, second: str, rows: int = 3, **options) -> PlacedModule:
    """`model` (inputs of `rows` x 4) placed with its module `second` on cpu:1, the rest on cpu:0."""
    return apply(model, plan_from_assignment(model, lambda n: TWO[owning_module(n) == second], TWO,
                                             inputs=(torch.randn(rows, 4),), **options))


def test_a_second_backward_or_a_gradient_of_the_gradient_is_refused_in_one_line():
    # new-user trial 5: retain_graph=True then backward again failed with AttributeError, and a
    # gradient penalty (create_graph=True) silently had no graph
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    placed = split_at(model, "2")
    try:
        loss = placed(torch.randn(3, 4)).mean()
        loss.backward(retain_graph=True)
        with pytest.raises(ExecutionError, match="one backward: a second backward through the same forward"):
            loss.backward()
        x = torch.randn(3, 4, requires_grad=True)
        with pytest.raises(ExecutionError, match="create_graph=True"):
            torch.autograd.grad(placed(x).sum(), x, create_graph=True)
        (g,) = torch.autograd.grad(placed(x).sum(), x)  # first order: as eager's
        torch.testing.assert_close(g, torch.autograd.grad(model(x).sum(), x)[0])
    finally:
        placed.close()


def test_a_module_under_two_names_keeps_both_in_state_dict():
    # trial 5: `self.enc2 = self.enc1` lost enc2's keys, so the checkpoint did not load into the plain model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model.again = model[0]
    ref_keys = list(model.state_dict())
    placed = split_at(model, "2")
    try:
        assert list(placed.state_dict()) == ref_keys and "again.weight" in ref_keys
        fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        fresh.again = fresh[0]
        fresh.load_state_dict(placed.state_dict())
        assert len(list(placed.parameters())) == len(list(model.parameters())) == 4
    finally:
        placed.close()


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.c = nn.Linear(8, 2)
        self.register_buffer("shift", torch.full((8,), 0.5))

    def forward(self, x):
        return self.c(self.a(x).relu() + self.shift)


def with_buffer_placed() -> tuple[WithBuffer, PlacedModule]:
    """(the model, its placed self): `c` on cpu:1, the rest on cpu:0."""
    torch.manual_seed(0)
    model = WithBuffer()
    return model, split_at(model, "c")


@pytest.mark.parametrize("change, named", [
    (lambda p: setattr(p.c, "weight", nn.Parameter(torch.ones(2, 8))), "'c.weight' was replaced or removed"),
    (lambda p: setattr(p.original, "c", nn.Linear(8, 2)), "'c' was replaced or removed"),
    (lambda p: setattr(p, "shift", torch.zeros(8)), "'shift' was replaced or removed"),
    (lambda p: p.a.register_forward_hook(lambda m, i, o: o * 2), "a hook of module 'a' was added or removed"),
    (lambda p: p.to(torch.float64), "'shift' is torch.float64 where it was torch.float32"),  # .to(): new buffers
    (lambda p: setattr(p.a, "out_features", 9), "attribute 'a.out_features' changed from 8 to 9"),
    (lambda p: p.c.register_parameter("extra", nn.Parameter(torch.ones(1))), "'c.extra' was added or removed"),
])
def test_a_model_changed_after_apply_is_refused_at_the_next_call(change, named):
    # new-user trial 5: each of these was silently ignored (the graphs kept the old ones), a wrong number
    model, placed = with_buffer_placed()
    try:
        x = torch.randn(3, 4)
        with torch.no_grad():
            placed.a.weight.mul_(0.5)  # changes in place are seen
        placed.load_state_dict(placed.state_dict())
        torch.testing.assert_close(placed(x), model(x))
        change(placed)
        with pytest.raises(ExecutionError, match=f"the model changed after placer.apply \\({named}"):
            placed(x)
    finally:
        placed.close()


class RegistersOnGrowth(nn.Module):
    """A leaf module that re-registers its cache buffer when a longer input comes (the
    rotary-embedding caches of older Hugging Face models do so)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 4), persistent=False)

    def forward(self, x):
        if x.shape[0] > self.cache.shape[0]:
            self.register_buffer("cache", torch.zeros(x.shape[0], 4), persistent=False)
        return x + self.cache[: x.shape[0]]


def test_what_a_leaf_module_changes_of_itself_is_read_live_and_not_refused():
    model = nn.Sequential(nn.Linear(4, 4), RegistersOnGrowth(), nn.Linear(4, 2))
    placed = split_at(model, "2", rows=2, leaf_modules=(RegistersOnGrowth,))
    try:
        for rows in (2, 5, 3):
            torch.testing.assert_close(placed(torch.ones(rows, 4)), model(torch.ones(rows, 4)))
        placed.original[2].register_forward_hook(lambda m, i, o: o * 2)  # fx calls nn's modules whole: run live
        torch.testing.assert_close(placed(torch.ones(2, 4)), model(torch.ones(2, 4)))
        placed.original[0] = nn.Linear(4, 4)  # but the graph holds the modules it calls
        with pytest.raises(ExecutionError, match="'0' was replaced"):
            placed(torch.ones(2, 4))
    finally:
        placed.close()


def test_autograd_grad_and_backward_inputs_leave_parameters_grads_as_eager_does():
    # review: the chunks' backward accumulated into every parameter's .grad under autograd.grad(out, x)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ref = copy.deepcopy(model)
    placed = split_at(model, "2")
    try:
        x = torch.randn(3, 4, requires_grad=True)
        (g,) = torch.autograd.grad(placed(x).sum(), x)
        assert all(p.grad is None for p in placed.parameters())
        torch.testing.assert_close(g, torch.autograd.grad(ref(x).sum(), x)[0])
        x.grad = None
        placed(x).sum().backward(inputs=[x])
        assert all(p.grad is None for p in placed.parameters()) and torch.equal(x.grad, g)
        placed(x).sum().backward()  # a plain backward: every parameter, as before
        assert all(p.grad is not None for p in placed.parameters())
    finally:
        placed.close()


def test_a_hook_on_the_placed_model_itself_runs_and_is_not_refused():
    model, placed = with_buffer_placed()
    try:
        x = torch.randn(3, 4)
        placed.register_forward_hook(lambda m, i, o: o * 2)  # nn.Module.__call__ runs it around the placed forward
        torch.testing.assert_close(placed(x), model(x) * 2)
    finally:
        placed.close()


def test_a_call_eager_would_fail_on_raises_eager_s_error_not_a_capture_s():
    """new-user trial 8: a wrong input width raised torch.export's CaptureError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    placed = placer.apply(model, plan_from_assignment(model, lambda n: "cpu:0", TWO, inputs=(x,)))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        placed(torch.randn(3, 5))
    placed.close()


def test_a_forward_hook_is_warned_about_at_the_users_line():
    # new-user trial 10: a hook that logged ran while the model was captured, never at a placed call, silently
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    plan = plan_from_assignment(model, lambda n: "cpu:1" if owning_module(n) == "2" else "cpu:0", ["cpu:0", "cpu:1"],
                                inputs=(x,))
    model[2].register_forward_pre_hook(lambda module, inputs: None)
    with pytest.warns(UserWarning, match=r"^placer: module '2' has a forward hook: the placed model runs what it "
                                         r"computes on tensors, as captured, but not its other Python work") as caught:
        placed = apply(model, plan)
    assert caught[0].filename == __file__
    placed.close()
