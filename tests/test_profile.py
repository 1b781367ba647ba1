"""profile: measured costs and memory per node, stable between runs, cached on disk."""

import json
import statistics
from collections import OrderedDict

import pytest
import torch
from torch import nn

import graphs.profile as profile_module
import graphs.timing as timing
from graphs.capture import capture
from graphs.group import COPIED_ATTRS, group
from graphs.profile import profile
from graphs.workload import Workload

MEMORY = ("param_bytes", "grad_bytes", "opt_bytes", "act_bytes")


class TiedMLP(nn.Module):
    """Embedding -> two linear layers -> output projection tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.ones(32))

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head(self.fc2(torch.relu(self.fc1(h))) * self.scale)


def make_workload(**kw):
    torch.manual_seed(0)
    return Workload(name="tied", spec="tied.py", model=TiedMLP(), inputs=(torch.randint(0, 50, (16, 8)),), **kw)


def run(w, tmp_path, **kw):
    return profile(capture(w), w, threads=1, repeats=3, cache_dir=tmp_path, **kw)


def by_module(g) -> dict[str, dict]:
    """Module path -> its nodes' costs and bytes added up (a layer's get_attr nodes and
    its op), the root's op by its type (relu)."""
    sums: dict[str, dict] = {}
    for d in g.nodes.values():
        key = d["module"] or d["op_type"]
        into = sums.setdefault(key, {"fwd_ms": 0.0, "bwd_ms": 0.0, "opt_ms": 0.0, **dict.fromkeys(MEMORY, 0)})
        for attr in ("fwd_ms", "bwd_ms", "opt_ms"):
            into[attr] += d[attr]["cpu"]
        for attr in MEMORY:
            into[attr] += d[attr]
    return sums


def test_costs_are_positive_and_memory_is_measured(tmp_path):
    g = run(make_workload(), tmp_path)
    assert g.graph["device_kinds"] == ["cpu"] and g.graph["capture"]["method"] == "export"
    ops = by_module(g)
    for name in ("emb", "fc1", "fc2", "head", "activation"):
        assert ops[name]["fwd_ms"] > 0 and ops[name]["bwd_ms"] > 0, name
    assert ops["input"]["fwd_ms"] == 0 and ops["output"]["bwd_ms"] == 0
    # the tied weight is counted once, at its first user; the buffer has no gradient
    assert ops["emb"]["param_bytes"] == 50 * 32 * 4 and ops["head"]["param_bytes"] == 0
    # the root's own buffer, counted at the op that reads it
    assert ops["elementwise"]["param_bytes"] == 32 * 4 and ops["elementwise"]["grad_bytes"] == 0
    assert ops["fc1"]["grad_bytes"] == (32 * 64 + 64) * 4
    # SGD with momentum keeps one buffer per parameter
    assert ops["fc1"]["opt_bytes"] == ops["fc1"]["grad_bytes"] and ops["fc1"]["opt_ms"] > 0
    total_params = sum(p.numel() * 4 for p in TiedMLP().parameters()) + 32 * 4
    assert sum(d["param_bytes"] for d in g.nodes.values()) == total_params
    # fc2 saves its input (relu's output, saved by relu first) and so adds nothing new;
    # fc1 saves its input, the embedding's output
    assert ops["fc1"]["act_bytes"] == 16 * 8 * 32 * 4
    assert ops["activation"]["act_bytes"] == 16 * 8 * 64 * 4
    assert ops["fc2"]["act_bytes"] == 0


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.relu(self.a(x)) + x  # in place on a Linear's output: backward still works
        return self.b(y.mul_(2))


def test_in_place_ops_are_timed(tmp_path):
    w = Workload(name="inplace", spec="inplace.py", model=InPlace(), inputs=(torch.randn(4, 8),))
    g = run(w, tmp_path)
    for data in g.nodes.values():
        if data["op"].startswith("call_"):
            assert data["fwd_ms"]["cpu"] > 0 and data["bwd_ms"]["cpu"] > 0, data["target"]
    assert "aten.relu_.default" in {d["target"] for d in g.nodes.values()}  # in place, as the model does it


class BucketIndex(nn.Module):
    """T5's pattern: embedding indices built by in-place adds (each run alone, repeated,
    would grow them past the table), then read by an embedding and by a gather."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        buckets = (x > 0).long()
        buckets += 3
        buckets += (x > 1).long()
        return self.lin(self.bias(buckets)).sum(-1) + x.gather(1, buckets)


def test_a_node_that_writes_its_inputs_is_timed_on_copies_so_later_index_reads_stay_in_range(tmp_path):
    w = Workload(name="buckets", spec="buckets.py", model=BucketIndex(), inputs=(torch.randn(3, 6),))
    g = run(w, tmp_path, kinds=("cpu",))
    targets = {d["target"] for d in g.nodes.values()}
    assert {"aten.add_.Tensor", "aten.embedding.default", "aten.gather.default"} <= targets
    assert all(d["fwd_ms"]["cpu"] > 0 for d in g.nodes.values() if d["op"].startswith("call_"))


class AttrOutput(OrderedDict):
    """A ModelOutput-like result: a dict whose items are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return AttrOutput(last_hidden_state=self.lin(x), pooled=x.mean(1))


class ReadsAttributes(nn.Module):
    """The encoder kept whole (a leaf, as fx's fallback keeps what it cannot trace):
    its structured output is read by getattr nodes."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = self.encoder(x)
        return self.head(out.last_hidden_state) + out.pooled.unsqueeze(-1)


def test_getattr_nodes_on_a_leaf_modules_structured_output_are_timed(tmp_path):
    w = Workload(name="attrs", spec="attrs.py", model=ReadsAttributes(), inputs=(torch.randn(3, 4),),
                 leaf_modules=(Encoder,))
    g = run(w, tmp_path)
    assert g.graph["capture"]["method"] == "fx"
    reads = [d for d in g.nodes.values() if d["target"] == "getattr"]
    assert len(reads) == 2 and all(d["fwd_ms"]["cpu"] > 0 for d in reads)


def test_adam_state_is_twice_the_parameters(tmp_path):
    w = make_workload(make_optimizer=lambda params: torch.optim.Adam(params))
    ops = by_module(run(w, tmp_path))
    assert ops["fc1"]["opt_bytes"] >= 2 * ops["fc1"]["grad_bytes"]


def test_profile_does_not_touch_the_users_model(tmp_path):
    w = make_workload()
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    run(w, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in w.model.state_dict().items())
    assert all(p.grad is None for p in w.model.parameters())


def test_two_uncached_runs_agree(tmp_path):
    w = make_workload()
    a, b = run(w, tmp_path / "a"), run(w, tmp_path / "b")
    total_a = sum(d["fwd_ms"]["cpu"] + d["bwd_ms"]["cpu"] for d in a.nodes.values())
    total_b = sum(d["fwd_ms"]["cpu"] + d["bwd_ms"]["cpu"] for d in b.nodes.values())
    assert total_a > 0 and 1 / 5 < total_a / total_b < 5
    for name in a.nodes:
        assert all(a.nodes[name][m] == b.nodes[name][m] for m in MEMORY)


def test_second_call_is_served_from_the_cache(tmp_path, monkeypatch):
    w = make_workload()
    ops = capture(w)
    seen = []
    first = profile(ops, w, threads=1, repeats=2, cache_dir=tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (ops.number_of_nodes(), ops.number_of_nodes())

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(profile_module, "time_ms", no_timing)
    second = profile(ops, w, threads=1, repeats=2, cache_dir=tmp_path)
    assert dict(first.nodes(data=True)) == dict(second.nodes(data=True))
    # another key (repeats) is a miss
    with pytest.raises(AssertionError, match="timed again"):
        profile(ops, w, threads=1, repeats=3, cache_dir=tmp_path)


def spoil_nan(data: dict) -> None:
    next(iter(data["nodes"].values()))["fwd_ms"] = float("nan")


def spoil_negative(data: dict) -> None:
    next(iter(data["nodes"].values()))["bwd_ms"] = -1.0


def spoil_string(data: dict) -> None:
    next(iter(data["nodes"].values()))["act_bytes"] = "12"


def spoil_missing(data: dict) -> None:
    del next(iter(data["nodes"].values()))["opt_ms"]


def spoil_steps(data: dict) -> None:
    del data["microbatch_step_ms"]


def spoil_absent(data: dict) -> None:
    data["microbatch_absent"] = {"4": 12}  # a reason that is not text


def spoil_scale(data: dict) -> None:
    data["profile_scale"] = "2"


def spoil_spread(data: dict) -> None:
    data["whole_step_spread"] = 1.5  # a least sample above the median


@pytest.mark.parametrize("spoil", [None, spoil_nan, spoil_negative, spoil_string, spoil_missing, spoil_steps,
                                   spoil_absent, spoil_scale, spoil_spread])
def test_a_corrupt_cache_file_is_a_miss_with_a_warning_and_rewritten(tmp_path, spoil):
    w = make_workload()
    ops = capture(w)
    profile(ops, w, threads=1, repeats=1, cache_dir=tmp_path)
    [path] = tmp_path.glob("profile-*.json")
    if spoil is None:
        path.write_text("{not json")
    else:
        data = json.loads(path.read_text())
        spoil(data)
        path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=f"ignoring the (unreadable )?profile cache {path}"):
        again = profile(ops, w, threads=1, repeats=1, cache_dir=tmp_path)
    assert json.loads(path.read_text())["nodes"].keys() == set(again.nodes)


def test_an_unusable_cache_folder_is_a_warning_not_an_error(tmp_path, monkeypatch):
    w = make_workload()
    ops = capture(w)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    monkeypatch.setenv("PLACER_CACHE", str(not_a_folder))
    with pytest.warns(UserWarning, match="cannot write the profile cache .*cache/profile-"):
        g = profile(ops, w, threads=1, repeats=1)
    assert g.graph["device_kinds"] == ["cpu"]
    folder = tmp_path / "folder"
    folder.mkdir()
    profile(ops, w, threads=1, repeats=1, cache_dir=folder)
    [path] = folder.glob("profile-*.json")
    path.unlink()
    path.mkdir()  # a directory where the file should be
    with pytest.warns(UserWarning) as caught:
        profile(ops, w, threads=1, repeats=1, cache_dir=folder)
    assert [str(c.message).split(":")[0] for c in caught] == [f"ignoring the unreadable profile cache {path}",
                                                             f"cannot write the profile cache {path}"]
    assert all("\n" not in str(c.message) for c in caught)


def test_micro_batch_step_times_for_every_count_that_divides_the_batch(tmp_path):
    g = run(make_workload(), tmp_path)  # batch 16
    steps = g.graph["microbatch_step_ms"]
    assert sorted(steps) == [1, 2, 4, 8] and all(ms > 0 for ms in steps.values())
    assert g.graph["microbatch_absent"] == {}
    assert g.graph["microbatch_step_ms_by_kind"] == {"cpu": steps}
    assert g.graph["profile_scale"]["cpu"] > 0
    assert 0 < g.graph["whole_step_spread"]["cpu"] <= 1
    cached = run(make_workload(), tmp_path).graph
    assert {k: cached[k] for k in COPIED_ATTRS} == {k: g.graph[k] for k in COPIED_ATTRS}
    grouped = group(g, 4)  # what bounds and the simulator read, on the grouped graph too
    assert {k: grouped.graph[k] for k in COPIED_ATTRS} == {k: g.graph[k] for k in COPIED_ATTRS}
    torch.manual_seed(0)
    odd = Workload(name="odd", spec="odd.py", model=TiedMLP(), inputs=(torch.randint(0, 50, (6, 8)),))
    g = run(odd, tmp_path).graph
    assert sorted(g["microbatch_step_ms"]) == [1, 2]
    assert g["microbatch_absent"] == dict.fromkeys(
        (4, 8), "the batch (6 rows of input 'tokens', the first with a batch dimension) does not divide into m")
    normed = Workload(name="bn", spec="bn.py", model=nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
                      inputs=(torch.randn(2, 4),))
    g = run(normed, tmp_path).graph
    assert sorted(g["microbatch_step_ms"]) == [1]  # BatchNorm refuses a batch of one
    assert g["microbatch_absent"][2].startswith("a training step at batch / m fails: ValueError: Expected more than 1")
    assert g["microbatch_absent"][4] == ("the batch (2 rows of input 'input', the first with a batch dimension) "
                                         "does not divide into m")
    cached = run(normed, tmp_path).graph
    assert cached["microbatch_absent"] == g["microbatch_absent"]


class Scaled(nn.Module):
    """x: [batch, 4]; table: [5, 4], not batched (rows of its own); scale: a 0-dimensional tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x, table, scale):
        return self.fc(x) @ table * scale


def test_inputs_not_as_long_as_the_first_go_whole_to_every_micro_batch_as_the_runtime_splits_them(tmp_path):
    # new-user trial s25: a second input (a table, a scalar) left a model without micro-batches and without a word
    torch.manual_seed(0)
    w = Workload(name="scaled", spec="scaled.py", model=Scaled(),
                 inputs=(torch.randn(16, 4), torch.randn(5, 4), torch.tensor(2.0)))
    g = run(w, tmp_path)
    assert sorted(g.graph["microbatch_step_ms"]) == [1, 2, 4, 8] and g.graph["microbatch_absent"] == {}
    none = Workload(name="scaled", spec="scaled.py", model=Scaled(), inputs=w.inputs,
                    batch_dims={"x": None, "table": None})
    assert run(none, tmp_path).graph["microbatch_absent"] == dict.fromkeys(
        (2, 4, 8), "no input has a batch dimension to split (each is 0-dimensional or marked None in batch_dims)")
    # new-user trial s26: a per-feature scale of 4 values beside 4 rows is split with them and breaks the model
    chance = Workload(name="scaled", spec="scaled.py", model=Scaled(),
                      inputs=(torch.randn(4, 4), torch.randn(5, 4), torch.randn(4)))
    why = run(chance, tmp_path).graph["microbatch_absent"][2]
    assert why.startswith("a training step at batch / m fails: RuntimeError: ")
    assert why.endswith("(inputs split: x, scale; one not batched but as long as the batch by chance goes whole to "
                        "every micro-batch where the workload's batch_dims marks it None)")


class FixedSteps(nn.Module):
    """x: [4 steps, batch, 4]: a layer mixes the 4 steps, so only the batch (dimension 1) can be halved."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return self.out(self.mix(x.transpose(0, 2)).transpose(0, 2))


def test_micro_batches_are_sliced_along_the_workloads_batch_dims(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 4)
    steps = Workload(name="steps", spec="steps.py", model=FixedSteps(), inputs=(x,))
    assert sorted(run(steps, tmp_path).graph["microbatch_step_ms"]) == [1]  # 2 steps of 4: the model fails
    named = Workload(name="steps", spec="steps.py", model=FixedSteps(), inputs=(x,), batch_dims={"x": 1})
    g = run(named, tmp_path)  # the same graph and inputs, profiled again: batch_dims is part of the cache key
    assert sorted(g.graph["microbatch_step_ms"]) == [1, 2, 4, 8] and g.graph["batch_size"] == 8


def test_cpu_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    run(make_workload(), tmp_path)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note on a host without a GPU")
def test_cuda_is_skipped_with_a_note_without_a_gpu(tmp_path):
    w = make_workload()
    g = run(w, tmp_path, kinds=("cpu", "cuda"))
    assert g.graph["device_kinds"] == ["cpu"]
    assert any("cuda" in note for note in w.notes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_are_both_profiled(tmp_path):
    g = run(make_workload(), tmp_path, kinds=("cpu", "cuda"))
    assert g.graph["device_kinds"] == ["cpu", "cuda"]
    assert any(d["fwd_ms"]["cuda"] > 0 for d in g.nodes.values() if d["module"] == "fc1")


class BreaksBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y += x  # overwrites what relu's backward needs
        return y


def test_a_model_whose_training_step_fails_is_a_workload_error(tmp_path):
    from graphs.errors import WorkloadError
    w = Workload(name="broken", spec="broken.py", model=BreaksBackward(), inputs=(torch.randn(4, 8),))
    with pytest.raises(WorkloadError, match="broken.py: a training step of the model fails"):
        run(w, tmp_path)


def test_node_times_add_up_to_the_measured_whole_step(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_module, "_whole_step_ms", lambda *args: 250.0)
    g = run(make_workload(), tmp_path)
    total = sum(d["fwd_ms"]["cpu"] + d["bwd_ms"]["cpu"] + d["opt_ms"]["cpu"] for d in g.nodes.values())
    assert total == pytest.approx(250.0)


class Clock:
    """graphs.profile's clock, moved on only by the calls it times: call i lasts
    `durations_ms[i]`."""

    def __init__(self, durations_ms: list[float]):
        self.now, self.durations_ms, self.calls = 0.0, durations_ms, 0

    def perf_counter(self) -> float:
        return self.now

    def call(self) -> int:
        self.now += self.durations_ms[self.calls] / 1e3
        self.calls += 1
        return self.calls


def test_a_slow_first_call_warms_up_and_is_not_a_sample(monkeypatch):
    """Whole steps of 10 (the first), 1, 3 and 2 ms: the recorded median is the real
    steps' (2), not the slower of the two real steps beside the warm-up (3). A slow
    node past its budget keeps one real sample, not its warm-up."""
    clock = Clock([10.0, 1.0, 3.0, 2.0])
    monkeypatch.setattr(timing, "time", clock)
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    w = Workload(name="fake", spec="fake.py", model=model, inputs=(torch.randn(4, 3),),
                 loss_fn=lambda out, x: out.sum() * clock.call())
    assert profile_module._whole_step_ms(model, w, w.inputs, 5, lambda: None) == pytest.approx(2.0)
    assert clock.calls == 1 + profile_module.WHOLE_STEP_REPEATS
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the steps left no trace

    clock = Clock([300.0, 250.0])
    monkeypatch.setattr(timing, "time", clock)
    assert timing.time_ms(clock.call, 5, lambda: None, budget_ms=200.0) == (pytest.approx(250.0), 2)


def test_micro_batch_steps_are_timed_in_rounds_so_a_burst_of_load_disturbs_no_count(monkeypatch):
    """A step costs 1 ms per row of its batch (16 rows), except during a burst of load as
    long as one round (calls 5-8: ten times slower). Timed in rounds (16, 8, 4, 2 rows),
    each count has one slow sample and keeps its true cost, 16 ms for every m; timed
    count by count, the burst would have made two of m=2's three samples, and its
    median, slow (and two of m=4's). Rounds go on while they fit in the budget (these
    take no time), three at least, one where a single repeat is asked for."""
    calls = []

    def step_ms(model, workload, inputs, repeats, sync):
        calls.append(inputs[0].shape[0])
        return inputs[0].shape[0] * (10.0 if 5 <= len(calls) <= 8 else 1.0)

    monkeypatch.setattr(profile_module, "_whole_step_ms", step_ms)
    w = make_workload()
    samples, absent = profile_module._microbatch_step_samples(w.model, w, w.inputs, 5, lambda: None)
    assert absent == {}
    assert calls == [16, 8, 4, 2] * profile_module.WHOLE_STEP_ROUNDS
    assert {m: statistics.median(ms) for m, ms in samples.items()} == {1: 16.0, 2: 16.0, 4: 16.0, 8: 16.0}
    assert min(samples[1]) == 16.0 and max(samples[1]) == 160.0
    monkeypatch.setattr(profile_module, "WHOLE_STEP_BUDGET_MS", 0.0)
    for repeats, rounds in [(5, profile_module.WHOLE_STEP_REPEATS), (1, 1)]:
        calls.clear()
        profile_module._microbatch_step_samples(w.model, w, w.inputs, repeats, lambda: None)
        assert len(calls) == 4 * rounds


def test_a_cache_file_from_before_the_absent_counts_were_kept_serves_only_with_every_count(tmp_path, monkeypatch):
    # the rule changed (s26) only for inputs of unequal lengths, which got no count but 1: a file with every count is
    # what the new rule makes; one without every count is profiled again
    w = make_workload()
    first = run(w, tmp_path)
    torch.manual_seed(0)
    odd = Workload(name="odd", spec="odd.py", model=TiedMLP(), inputs=(torch.randint(0, 50, (6, 8)),))
    run(odd, tmp_path)
    for path in tmp_path.glob("profile-*.json"):
        data = json.loads(path.read_text())
        del data["microbatch_absent"]
        path.write_text(json.dumps(data))

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(profile_module, "time_ms", no_timing)
    again = run(make_workload(), tmp_path)
    assert again.graph["microbatch_absent"] == {}
    assert again.graph["microbatch_step_ms"] == first.graph["microbatch_step_ms"]
    with pytest.raises(AssertionError, match="timed again"):
        run(odd, tmp_path)
