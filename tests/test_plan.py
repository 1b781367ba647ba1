"""placer.plan: plan files (placer.plan/v2, and v1 as one micro-batch) and expanding
placements into them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from graphs.capture import capture_traced, owning_module, tensor_shapes
from graphs.group import group
from graphs.trace import fingerprint, tensors_fingerprint, trace_model
from graphs.devices import parse_cluster
from graphs.errors import InfeasibleError, PlanError
from placer.plan import (FORMAT, FORMAT_V1, Plan, accelerate_name, derive_device_map, load_plan, make_plan,
                         plan_from_assignment, with_workload_options)
from graphs.problem import PlacementProblem
from placer.runtime import apply


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.dec = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)) + self.enc[0].bias.sum())


def by_module(mapping: dict[str, str], default: str = "cpu:0"):
    """Assign a node by the first module-path prefix in `mapping` it falls under."""
    def assign(node) -> str:
        path = owning_module(node)
        return next((d for prefix, d in mapping.items() if path.startswith(prefix)), default)
    return assign


def test_save_and_load_round_trip(tmp_path):
    x = torch.randn(4, 6)
    plan = plan_from_assignment(Net(), by_module({"dec": "cpu:1"}), ["cpu:0", "cpu:1"], inputs=(x,), method="hand")
    path = plan.save(tmp_path / "sub" / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["microbatches"] == 1 and data["schedule"] is None
    assert data["capture"] == {"method": "export", "leaf_paths": [], "inputs": [{"shape": [4, 6], "dtype": "float32"}],
                               "tensors": tensors_fingerprint(Net()), "shapes": tensor_shapes(Net()), "batch_dims": {}}
    assert load_plan(path) == plan
    assert load_plan(path, fingerprint=plan.fingerprint) == plan
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left behind


def test_micro_batch_options_round_trip_and_older_plans_load_without_them(tmp_path):
    x = torch.randn(4, 6)
    plan = plan_from_assignment(Net(), by_module({"dec": "cpu:1"}), ["cpu:0", "cpu:1"], inputs=(x,),
                                batch_dims={"x": 1}, microbatch_statistics=True)
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["batch_dims"] == {"x": 1} and data["microbatch_statistics"] is True
    loaded = load_plan(path)
    assert loaded == plan and loaded.batch_dims == {"x": 1} and loaded.microbatch_statistics is True
    del data["batch_dims"], data["microbatch_statistics"]  # a plan written before the fields existed
    path.write_text(json.dumps(data))
    older = load_plan(path)
    assert older.batch_dims == {} and older.microbatch_statistics is False


def test_the_workload_files_options_add_to_the_plans():
    from graphs.workload import Workload

    plan = Plan(devices=["cpu:0"], assignment={}, device_map={}, fingerprint="f", batch_dims={"x": 1, "mask": 1})
    workload = Workload(name="w", spec="w.py", model=Net(), inputs=(), batch_dims={"x": 2}, microbatch_statistics=True)
    merged = with_workload_options(plan, workload)
    assert merged.batch_dims == {"x": 2, "mask": 1} and merged.microbatch_statistics is True
    assert plan.batch_dims == {"x": 1, "mask": 1} and plan.microbatch_statistics is False  # the plan is left as it was
    assert with_workload_options(replace(plan, microbatch_statistics=True), Workload(
        name="w", spec="w.py", model=Net(), inputs=())).microbatch_statistics is True


def test_a_hand_made_plan_refuses_batch_dims_naming_no_input():
    with pytest.raises(PlanError, match=r"batch_dims names 'y', which is no input of the model's forward \(x\): "
                                        r"name one of those$"):
        plan_from_assignment(Net(), lambda n: "cpu:0", ["cpu:0"], inputs=(torch.randn(4, 6),), batch_dims={"y": 0})


def test_every_traced_node_is_assigned_and_the_device_map_is_accelerate_style():
    model, x = Net(), torch.randn(4, 6)
    plan = plan_from_assignment(model, by_module({"dec": "cpu:1"}), ["cpu:0", "cpu:1"], inputs=(x,))
    gm = trace_model(model, inputs=(x,)).gm
    assert set(plan.assignment) == {n.name for n in gm.graph.nodes}
    assert plan.fingerprint == fingerprint(model, gm)
    assert {n for n, d in plan.assignment.items() if d == "cpu:1"} >= {"linear_2", "tanh"}
    assert plan.device_map == {"dec": "cpu", "enc": "cpu", "head": "cpu"}  # accelerate's names
    whole = plan_from_assignment(model, lambda n: "cpu:1", ["cpu:0", "cpu:1"], inputs=(x,))
    assert whole.device_map == {"": "cpu"}


def test_accelerate_names_and_a_device_map_that_covers_every_tensor():
    assert [accelerate_name(d) for d in ("cpu", "cpu:3", "cuda", "cuda:1", "rank1:cuda:0")] == \
        ["cpu", "cpu", "cuda:0", "cuda:1", "cuda:0"]

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Sequential(nn.Linear(3, 3))
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            return self.used(x)

    model = WithUnused()
    plan = plan_from_assignment(model, lambda n: "cpu:0", ["cpu:0", "cpu:1"], inputs=(torch.randn(2, 3),))
    assert plan.device_map == {"": "cpu"}
    split = plan_from_assignment(model, lambda n: "cpu:1" if n.op == "output" else "cpu:0", ["cpu:0", "cpu:1"],
                                 inputs=(torch.randn(2, 3),))
    covered = lambda name: any(name == k or name.startswith(k + ".") or k == "" for k in split.device_map)  # noqa: E731
    assert all(covered(name) for name in model.state_dict())


def test_the_readme_snippet_dispatches_the_plans_device_map_with_accelerate(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    x = torch.randn(4, 6)
    path = plan_from_assignment(Net(), by_module({"dec": "cpu:1"}), ["cpu:0", "cpu:1"], inputs=(x,)).save(
        tmp_path / "plan.json")
    torch.manual_seed(0)
    model = accelerate.dispatch_model(Net(), device_map=load_plan(path).device_map)
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), Net()(x))


def test_device_map_lists_single_parameters_of_split_modules():
    modules = {"a": "m", "b": "m.inner", "c": ""}
    params = {"a": ["m.w"], "b": ["m.inner.w"], "c": []}
    assignment = {"a": "cpu:0", "b": "cpu:1", "c": "cpu:0"}
    assert derive_device_map(modules, params, assignment) == {"m.inner": "cpu:1", "m.w": "cpu:0"}


@pytest.mark.parametrize("content,message", [
    (None, "no such plan file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"format": "placer.plan/v0"}), "unknown plan format"),
    (json.dumps({"devices": []}), "unknown plan format"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}}), "lacks device_map, fingerprint"),
    (json.dumps({"format": FORMAT, "devices": "cpu:0", "assignment": [], "device_map": {}, "fingerprint": "f"}),
     "devices must be a list"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {"x": ["cpu:0"]}, "device_map": {},
                 "fingerprint": "f"}), "assignment must map node names to device names"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {"": 0},
                 "fingerprint": "f"}), "device_map must map"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "microbatches": 0}), "microbatches must be a whole number"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "schedule": "zigzag"}), "schedule must be null or one of gpipe"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "schedule": "1f1b"}), r"found '1f1b' \(1F1B runs on the pipelining backend: `placer train "
                                       r"--backend pipelining --schedule 1f1b`\)"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "capture": {"batch_dims": {"x": "one"}}}), "capture.batch_dims must map input names"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "batch_dims": {"x": -1}}),
     r"batch_dims must map input names to whole numbers >= 0, found \{'x': -1\}"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "batch_dims": [1]}), "batch_dims must map input names"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "microbatch_statistics": "yes"}), "microbatch_statistics must be true or false, found 'yes'"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "capture": {"method": "jit"}}), "capture must be an object"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f",
                 "capture": {"method": "export", "inputs": [{"shape": [2], "dtype": "complex9"}]}}),
     "capture.inputs must list"),
    ('{"format": "placer.plan/v2", "devices": ["cpu:0"], "assignment": {}, "device_map": {}, "fingerprint": "f", '
     '"measured_ms": NaN}', "measured_ms must be a finite number"),
    (json.dumps({"format": FORMAT, "devices": ["cpu:0"], "assignment": {"x": "cpu:7"}, "device_map": {},
                 "fingerprint": "f"}), "cpu:7"),
])
def test_bad_plan_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PlanError, match=message) as info:
        load_plan(path)
    assert "plan.json" in str(info.value) and "\n" not in str(info.value)


def test_fingerprint_mismatch_names_both_fingerprints(tmp_path):
    plan = plan_from_assignment(Net(), lambda n: "cpu:0", ["cpu:0"])
    path = plan.save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match=f"plan.json was made for another model \\(fingerprint {plan.fingerprint}, "
                                        f"this model abc\\): re-run `placer optimize` for this model"):
        load_plan(path, fingerprint="abc")


class TwoInputs(nn.Module):
    """Another model, whose forward takes other arguments than Net's (fails on Net's inputs)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        return self.a(x) + y


def test_a_plan_refuses_another_model_by_its_parameters_before_capturing_it(tmp_path):
    plan = plan_from_assignment(Net(), lambda n: "cpu:0", ["cpu:0"], inputs=(torch.randn(4, 6),))
    other = TwoInputs()
    with pytest.raises(PlanError, match=r"^plan was made for another model \(the plan's 'enc.0.weight' \(8, 6\) is "
                                        r"not in this TwoInputs\): re-run `placer optimize` for this model$"):
        apply(other, plan)
    assert other.calls == 0  # refused before any capture ran its forward
    # Same parameter names, other shapes and other input shapes (H8's repro; trial 9: name the parameter).
    small = plan_from_assignment(nn.Sequential(nn.Linear(4, 4)), lambda n: "cpu:0", ["cpu:0"],
                                 inputs=(torch.randn(2, 4),))
    with pytest.raises(PlanError, match=r"another model \('0.weight' is \(64, 32\) here and \(4, 4\) in the plan\)"):
        apply(nn.Sequential(nn.Linear(32, 64)), small)
    with pytest.raises(PlanError, match=r"another model \(this Sequential has '1.weight' \(2, 4\), "
                                        r"which the plan lacks"):
        apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), small)

    older = load_plan(small.save(tmp_path / "older.json"))
    older.capture.shapes = None  # a plan from before the shapes: the hash alone
    with pytest.raises(PlanError, match=r"another model \(its parameters' names or shapes differ\)"):
        apply(nn.Sequential(nn.Linear(32, 64)), older)


class Wrapper(nn.Module):
    """What a workload file builds around the model the user trains (a dict input turned into arguments)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_a_plan_for_a_wrapper_applied_to_the_model_it_holds_says_where_to_apply_it():
    # new-user trial 12: the advice was to re-run optimize, which makes the same wrapper plan again
    inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    outer_plan = plan_from_assignment(Wrapper(inner), lambda n: "cpu:0", ["cpu:0"], inputs=(torch.randn(2, 4),))
    with pytest.raises(PlanError, match=r"another model \(the plan's tensors are this Sequential's under 'model.'\): "
                                        r"apply it to the wrapper it was made for \(whose 'model' is this Sequential\)$"):
        apply(inner, outer_plan)
    inner_plan = plan_from_assignment(inner, lambda n: "cpu:0", ["cpu:0"], inputs=(torch.randn(2, 4),))
    with pytest.raises(PlanError, match=r"another model \(this Wrapper's tensors are the plan's under 'model.'\): "
                                        r"apply it to model.get_submodule\('model'\), which it was made for"):
        apply(Wrapper(inner), inner_plan)
    apply(Wrapper(inner), outer_plan).close()  # as advised
    apply(inner, inner_plan).close()


def test_an_older_plan_without_the_tensors_hash_refuses_another_model_by_the_names_it_places(tmp_path):
    plan = plan_from_assignment(Net(), by_module({"dec": "cpu:1"}), ["cpu:0", "cpu:1"], inputs=(torch.randn(4, 6),))
    data = plan.to_json()
    del data["capture"]["tensors"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = load_plan(path)
    assert old.capture.tensors is None
    with pytest.raises(PlanError, match=r"old.json was made for another model \(it places 'dec', which this "
                                        r"TwoInputs lacks\): re-run `placer optimize` for this model"):
        apply(TwoInputs(), old)
    apply(Net(), old).close()  # its own model still applies


def as_v1(plan: Plan, path):
    """The plan written as format v1 wrote it (fx node names, leaf paths at the top)."""
    data = plan.to_json()
    data.update(format=FORMAT_V1, leaf_paths=data.pop("capture")["leaf_paths"])
    del data["microbatches"], data["schedule"]
    path.write_text(json.dumps(data))
    return path


def test_a_v1_plan_loads_as_one_fx_captured_micro_batch_and_applies_while_the_model_matches(tmp_path):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 6)
    expected = Net()
    expected.load_state_dict(model.state_dict())
    fx_plan = plan_from_assignment(model, by_module({"dec": "cpu:1"}), ["cpu:0", "cpu:1"])  # no inputs: fx, as v1
    loaded = load_plan(as_v1(fx_plan, tmp_path / "v1.json"))
    assert loaded.microbatches == 1 and loaded.schedule is None
    assert loaded.capture.method == "fx" and loaded.capture.inputs is None
    placed = apply(model, loaded)
    torch.testing.assert_close(placed(x), expected(x))
    placed.close()

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)

    with pytest.raises(PlanError, match="v1.json was made for another model .*re-run `placer optimize`"):
        apply(Wider(), loaded)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = Plan(devices=["cpu:0"], assignment={}, device_map={}, fingerprint="old").save(tmp_path / "plan.json")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("graphs.files.os.fsync", disk_full)  # fails after the temporary file is written
    with pytest.raises(OSError):
        Plan(devices=["cpu:0"], assignment={}, device_map={}, fingerprint="new").save(path)
    assert load_plan(path).fingerprint == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def grouped_problem(model: nn.Module, inputs, devices: str, max_groups: int = 3) -> PlacementProblem:
    """A real capture and grouping with made-up costs (profiling is not under test)."""
    traced = trace_model(model)
    ops = capture_traced(traced, model, inputs, name="net")
    ops.graph["device_kinds"] = ["cpu"]
    for _, data in ops.nodes(data=True):
        nbytes = sum(data["params"].values())
        data.update(fwd_ms={"cpu": 0.1}, bwd_ms={"cpu": 0.2}, opt_ms={"cpu": 0.0}, param_bytes=nbytes,
                    grad_bytes=nbytes, opt_bytes=nbytes, act_bytes=data["out_bytes"])
    return PlacementProblem(groups=group(ops, max_groups=max_groups), cluster=parse_cluster(devices),
                            workload="test:net", ops=ops)


def test_make_plan_expands_groups_to_nodes_and_applies():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 6)
    problem = grouped_problem(model, (x,), "cpu:0,cpu:1")
    placement = [i % 2 for i in range(problem.n_groups)]
    plan = make_plan(problem, placement, method="alternate", seed=7, simulated_ms=1.5)
    assert plan.placement == placement and plan.seed == 7 and plan.simulated_ms == 1.5
    assert plan.microbatches == 1 and plan.schedule is None and plan.capture.method == "fx"
    assert plan.workload == "test:net" and plan.fingerprint == problem.ops.graph["fingerprint"]
    for g, members in enumerate(plan.groups):
        assert members == problem.groups.nodes[g]["members"]
        assert {plan.assignment[m] for m in members} == {f"cpu:{placement[g]}"}
    assert set(plan.assignment) == set(problem.ops.nodes)
    expected = Net()
    expected.load_state_dict(model.state_dict())
    placed = apply(model, plan)
    torch.testing.assert_close(placed(x), expected(x))
    placed.close()


def test_make_plan_refuses_an_infeasible_placement_and_bad_micro_batches():
    problem = grouped_problem(Net(), (torch.randn(4, 6),), "cpu:0,cpu:1")
    with pytest.raises(InfeasibleError):
        make_plan(problem, [5] * problem.n_groups, method="bad")
    with pytest.raises(PlanError, match="microbatches must be at least 1"):
        make_plan(problem, [0] * problem.n_groups, method="m", microbatches=0)
    piped = make_plan(problem, [0] * problem.n_groups, method="m", microbatches=2)
    assert piped.microbatches == 2 and piped.schedule == "gpipe"


def test_make_plan_takes_the_micro_batch_options_from_the_problem():
    problem = grouped_problem(Net(), (torch.randn(4, 6),), "cpu:0,cpu:1")
    plain = make_plan(problem, [0] * problem.n_groups, method="m", microbatches=2)
    assert plain.batch_dims == {} and plain.microbatch_statistics is False
    options = replace(problem, batch_dims={"x": 0}, microbatch_statistics=True)
    plan = make_plan(options, [0] * problem.n_groups, method="m", microbatches=2)
    assert plan.batch_dims == {"x": 0} and plan.microbatch_statistics is True


def test_the_problems_batch_size_lies_along_the_workloads_batch_dims():
    class StepsFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x):  # x: [steps, batch, 6]
            return self.lin(x)

    problem = grouped_problem(StepsFirst(), (torch.randn(5, 4, 6),), "cpu:0,cpu:1")
    assert problem.batch_size == 5 and problem.activation_factor(2) == pytest.approx(6 / 5)  # dimension 0
    batch_second = replace(problem, batch_dims={"x": 1})
    assert batch_second.batch_size == 4 and batch_second.activation_factor(2) == 1.0


def test_the_problems_batch_size_reads_batch_dims_by_forward_input_name_and_skips_inputs_never_split():
    class Scaled(nn.Module):  # export names the placeholder of `input` input_1
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, v, input):  # v: [3] per feature, never split; input: [steps, batch, 6]
            return self.lin(input) * v.sum()

    problem = grouped_problem(Scaled(), (torch.randn(3), torch.randn(5, 4, 6)), "cpu:0,cpu:1")
    assert replace(problem, batch_dims={"v": None, "input": 1}).batch_size == 4
    assert replace(problem, batch_dims={"v": None}).batch_size == 5


def test_plan_leaf_paths_reproduce_a_trace_with_leaf_classes():
    """A workload's leaf_modules classes are not in the plan; its leaf paths are."""
    class Opaque(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent: fx cannot trace through it

    class WithOpaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.opaque = Opaque()

        def forward(self, x):
            return self.opaque(self.lin(x))

    model = WithOpaque()
    plan = plan_from_assignment(model, lambda n: "cpu:1" if n.target == "opaque" else "cpu:0", ["cpu:0", "cpu:1"],
                                leaf_modules=(Opaque,))
    assert "opaque" in plan.leaf_paths
    placed = apply(model, plan)
    x = torch.randn(2, 3)
    torch.testing.assert_close(placed(x), model.opaque(model.lin(x)))
    placed.close()


def test_a_plan_from_the_whole_pipeline_applies_to_a_fresh_model(tmp_path):
    """capture -> profile -> group -> placement -> plan file -> apply, as `placer optimize` does."""
    from graphs.workload import Workload
    from graphs.problem import build_problem

    torch.manual_seed(0)
    workload = Workload(name="net", spec="test:net", model=Net(), inputs=(torch.randn(4, 6),))
    problem = build_problem(workload, "cpu:0,cpu:1", max_groups=4, cache_dir=str(tmp_path / "cache"))
    placement = [g % 2 for g in range(problem.n_groups)]
    for tied in problem.colocation_sets:  # Net reads enc.0.bias in its own forward too
        for g in tied:
            placement[g] = placement[tied[0]]
    path = make_plan(problem, placement, method="alternate").save(tmp_path / "plan.json")
    placed = apply(workload.fresh_model(), path)
    assert {c.device for c in placed.executor.chunks} == {"cpu:0", "cpu:1"}
    torch.testing.assert_close(placed(*workload.inputs), workload.model(*workload.inputs))
    placed.close()


def test_the_measurement_pool_refuses_a_plan_its_workers_devices_cannot_stand_for_before_sending_any():
    from placer.runtime.pool import MeasurementPool

    pool = MeasurementPool.__new__(MeasurementPool)  # no worker started: the check comes before any is used
    pool.device_sets, pool.workers = [(["cpu:0", "cpu:1"], [0])], []
    three = Plan(devices=["cpu:0", "cpu:1", "cpu:2"], assignment={}, device_map={}, fingerprint="f")
    with pytest.raises(PlanError, match=r"places nodes on cpu:0,cpu:1,cpu:2; the devices given \(cpu:0,cpu:1\) must "
                                        r"be as many"):
        pool.measure_many([three])


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.twice = False

    def forward(self, x):
        return self.fc(self.fc(x)) if self.twice else self.fc(x)


def test_a_plan_refusing_the_same_tensors_says_the_forward_changed():
    # new-user trial 12: a forward edited after optimize got the same words as another model
    model = Flagged()
    plan = plan_from_assignment(model, lambda n: "cpu:0", ["cpu:0"], inputs=(torch.randn(2, 4),))
    model.twice = True
    with pytest.raises(PlanError, match=r"another model \(fingerprint \w+, this model \w+; its parameters and buffers "
                                        r"are the plan's, its captured forward is not: the forward, or a flag it "
                                        r"reads, changed\): re-run `placer optimize` for this model$"):
        apply(model, plan)
