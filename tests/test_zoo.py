"""The benchmark zoo: every model trains at its small size, is captured by torch.export
at fine grain, is deterministic under a seed, has an expert placement that covers its
layers; the paper sizes build (on the meta device: no memory) with the expected
shapes and parameter counts, and trace with torch.fx (export at paper size takes
tens of seconds)."""

import functools
import math

import pytest
import torch

from graphs.capture import owning_module
from graphs.trace import trace_model
from graphs.zoo import SIZES, ZOO, workload_module
from graphs.errors import WorkloadError

NAMES = sorted(ZOO)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the other tests' threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(name: str, seed: int = 0):
    torch.manual_seed(seed)
    module = ZOO[name]
    return module.build_model("small"), module.example_inputs("small")


@functools.cache
def captured_small(name: str):
    """small(name) and its export capture, made once for the module (export is the
    expensive part). The model may have trained since: the graph's structure is fixed."""
    model, inputs = small(name)
    return model, inputs, trace_model(model, inputs=inputs, allow_fallback=False)


@functools.cache
def on_meta(name: str, size: str):
    """Model and batch on the meta device, built once: shapes without memory or compute."""
    with torch.device("meta"):
        return ZOO[name].build_model(size), ZOO[name].example_inputs(size)


@pytest.mark.parametrize("name", NAMES)
def test_every_model_has_the_common_sizes(name):
    assert set(SIZES) <= set(ZOO[name].SIZES)


@pytest.mark.parametrize("name", NAMES)
def test_small_model_traces_whole_and_trains(name):
    model, inputs, traced = captured_small(name)
    loss_fn = ZOO[name].loss_fn
    assert traced.method == "export" and traced.leaf_paths == () and not traced.fallback_notes
    assert 20 < len(traced.gm.graph.nodes) < 1500

    with torch.no_grad():  # the traced graph computes what the model does
        torch.testing.assert_close(traced.run(*inputs), model(*inputs))

    loss = loss_fn(traced.run(*inputs), *inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"

    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert loss_fn(model(*inputs), *inputs) < loss  # a real loss: one step on the batch lowers it


@pytest.mark.parametrize("name", ["rnnlm", "nmt", "transformer"])
def test_language_model_loss_is_cross_entropy_near_chance_at_init(name):
    model, inputs = small(name)
    with torch.no_grad():
        logits = model(*inputs)
        loss = ZOO[name].loss_fn(logits, *inputs)
    assert logits.dtype == torch.float32 and inputs[-1].dtype == torch.int64
    assert abs(loss.item() - math.log(logits.shape[-1])) < 0.5


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_model_and_batch(name):
    (m1, x1), (m2, x2), (_, x3) = small(name, seed=1), small(name, seed=1), small(name, seed=2)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    assert not all(torch.equal(a, c) for a, c in zip(x1, x3))
    with torch.no_grad():
        assert torch.equal(m1(*x1), m2(*x2))


@pytest.mark.parametrize("name", ["rnnlm", "nmt"])
def test_lstms_are_unrolled_time_major(name):
    """One cell per (step, layer) in step-major order: the grid that pipelines."""
    gm = captured_small(name)[2].gm
    calls = [owning_module(n) for n in gm.graph.nodes if str(n.target) == "aten.lstm_cell.default"]
    stacks = ["lstm"] if name == "rnnlm" else ["encoder", "decoder"]
    cfg = ZOO[name].CONFIGS["small"]
    steps = [cfg.steps] if name == "rnnlm" else [cfg.source_steps, cfg.target_steps]
    expected = [f"{stack}.layers.{i}" for stack, n in zip(stacks, steps) for _ in range(n) for i in range(cfg.layers)]
    assert calls == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_devices", [1, 2, 3, 4])
def test_expert_placement_is_valid_and_covers_every_layer(name, n_devices):
    module = ZOO[name]
    for size in module.SIZES:
        model, _ = on_meta(name, size)
        for path, sub in model.named_modules():
            device = module.expert_placement(path, n_devices, size=size)
            assert device is None or 0 <= device < n_devices, (size, path, device)
            if any(True for _ in sub.parameters(recurse=False)):
                assert device is not None, f"{name}:{size}: layer {path} has no expert device"


def test_rnnlm_and_nmt_experts_put_layer_i_on_device_i():
    for path, device in [("embedding", 0), ("lstm.layers.0", 0), ("lstm.layers.1", 1), ("softmax", 1)]:
        assert ZOO["rnnlm"].expert_placement(path, 2) == device
    nmt = ZOO["nmt"]
    for path, device in [("source_embedding", 0), ("encoder.layers.2", 2), ("decoder.layers.3", 3),
                         ("attention.score", 3), ("softmax", 3)]:
        assert nmt.expert_placement(path, 4, size="paper4") == device
    assert nmt.expert_placement("decoder.layers.3", 2, size="paper4") == 1
    assert nmt.expert_placement("attention", 4, size="paper") == 1  # beside the last of 2 layers
    assert nmt.expert_placement("", 4) is None and nmt.expert_placement("encoder.layers", 4) is None


def test_inception_expert_deals_each_blocks_towers():
    expert = ZOO["inception_v3"].expert_placement
    towers = ["branch1x1.conv", "branch5x5_2.bn", "branch3x3dbl_3.conv", "branch_pool.conv"]
    assert [expert(f"Mixed_5b.{t}", 4) for t in towers] == [0, 1, 2, 3]
    assert [expert(f"Mixed_5b.{t}", 2) for t in towers] == [0, 1, 0, 1]
    e_towers = ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3b", "branch_pool"]
    assert [expert(f"Mixed_7c.{t}", 4) for t in e_towers] == [0, 1, 1, 2, 3]
    assert expert("Conv2d_1a_3x3.conv", 4) == 0 and expert("fc", 4) == 0
    assert expert("Mixed_6a", 4) is None and expert("", 4) is None


def test_transformer_expert_splits_blocks_into_even_contiguous_runs():
    expert = ZOO["transformer"].expert_placement
    devices = [expert(f"blocks.{i}.attn.qkv", 4, size="paper") for i in range(12)]
    assert devices == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert expert("wte", 4, size="paper") == 0 and expert("lm_head", 4, size="paper") == 3


@pytest.mark.parametrize("name, size, params_millions", [
    ("rnnlm", "paper", (100, 115)),  # 2 x 33.6M LSTM + 2 x 20.5M embedding and softmax
    ("nmt", "paper", (130, 140)),
    ("nmt", "paper4", (160, 175)),
    ("inception_v3", "paper", (23, 27)),  # torchvision's 27.2M less the 3.3M aux head
    ("transformer", "paper", (160, 165)),  # GPT-2 small's 124M plus an untied 38.6M head
])
def test_paper_sizes_build_and_trace(name, size, params_millions):
    model, inputs = on_meta(name, size)
    low, high = params_millions
    assert low * 1e6 < sum(p.numel() for p in model.parameters()) < high * 1e6
    gm = trace_model(model, allow_fallback=False).gm
    assert len(gm.graph.nodes) > 50


@pytest.mark.parametrize("name, size, logits_shape", [
    ("rnnlm", "paper", (64, 20, 10000)),
    ("nmt", "paper", (128, 50, 32000)),
    ("inception_v3", "paper", (32, 1000)),
    ("transformer", "paper", (8, 512, 50257)),
])
def test_paper_sizes_have_the_papers_shapes(name, size, logits_shape):
    model, inputs = on_meta(name, size)
    logits = model(*inputs)  # meta tensors: shapes only, no compute
    assert tuple(logits.shape) == logits_shape
    assert ZOO[name].loss_fn(logits, *inputs).shape == ()


def test_workload_module_binds_the_size():
    bound = workload_module("nmt", "paper4")
    assert bound.expert_placement("decoder.layers.3", 4) == 3
    torch.manual_seed(0)
    source, target = workload_module("nmt", "small").example_inputs()
    assert source.shape == (8, 10) and target.shape == (8, 11)


@pytest.mark.parametrize("name, size", [("resnet", "small"), ("rnnlm", "paper4"), ("nmt", "huge")])
def test_unknown_zoo_name_or_size_is_a_workload_error(name, size):
    with pytest.raises(WorkloadError, match=f"zoo:{name}"):
        workload_module(name, size)
