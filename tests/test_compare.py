"""placer.compare: saved plans measured beside the unplaced model, in-process."""

import json

import pytest
import torch

import placer.compare as compare_module
from graphs.devices import parse_cluster
from graphs.errors import DeviceSpecError, PlanError
from graphs.problem import PlacementProblem, build_problem
from graphs.synthetic import random_grouped_graph
from placer.baselines import run_baselines
from placer.choose import simplicity, verdict_choice
from placer.compare import compare
from placer.measurements import Protocol, unplaced_plan
from placer.plan import make_plan, plan_from_assignment
from placer.results import MethodResult
from tests.test_optimize import WORKLOAD

PROTOCOL = Protocol(min_runs=3, max_runs=6, cap_s=0.01, warmup=1)  # a session stops at min_runs steps each


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plans")
    workload = folder / "branchy.py"
    workload.write_text(WORKLOAD)
    problem = build_problem(str(workload), "cpu:0,cpu:1")
    paths = []
    for name, placement in run_baselines(problem, ["single", "round_robin"]).items():
        paths.append(make_plan(problem, placement, name).save(folder / f"{name}.json"))
    return str(workload), paths


def test_plans_are_measured_beside_unplaced_and_nothing_is_written_as_a_plan(plans, tmp_path):
    workload, paths = plans
    results = compare(workload, paths, out_dir=tmp_path, protocol=PROTOCOL, warn=pytest.fail)
    assert [r.method for r in results.methods] == ["unplaced", "single", "round_robin"]
    assert all(r.measured and r.session in ("compare", "confirm") for r in results.methods)
    # Ratios only beside unplaced's last (confirm) session: another session's would contradict the ms column.
    assert all((r.vs_unplaced is not None) == (r.session == results.unplaced.session) and r.plan
               for r in results.methods[1:])
    assert any(r.vs_unplaced is not None for r in results.methods[1:])
    assert results.command == "compare" and results.choice.headline and results.plan is None
    assert "plan.json" not in results.choice.headline  # compare writes no plan
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["choice"]["method"] == results.best and (tmp_path / "report.md").is_file()
    assert not (tmp_path / "plan.json").exists()


@pytest.fixture(scope="module")
def whole_host_plan(plans, tmp_path_factory):
    """What optimize writes when unplaced wins: the whole model on `cpu`."""
    workload, _ = plans
    return unplaced_plan(build_problem(workload, "cpu")).save(tmp_path_factory.mktemp("whole") / "plan.json")


def boom(*args, **kwargs):
    raise AssertionError("work started before the plans were checked")


def test_plans_for_different_devices_each_run_on_their_own_beside_unplaced(plans, whole_host_plan, tmp_path):
    workload, paths = plans
    results = compare(workload, [whole_host_plan, paths[1]], out_dir=tmp_path, protocol=PROTOCOL, warn=pytest.fail)
    rows = {r.method: r for r in results.methods}
    assert list(rows) == ["unplaced", "unplaced (plan.json)", "round_robin"]
    assert all(r.measured and r.session in ("compare", "confirm") for r in rows.values())
    judged = [r for r in results.methods[1:] if r.session == results.unplaced.session]
    assert judged and all(r.vs_unplaced is not None and r.vs_unplaced.reference == "unplaced" for r in judged)
    assert rows["unplaced"].devices == rows["unplaced (plan.json)"].devices == ["cpu"]
    assert rows["round_robin"].devices == ["cpu:0", "cpu:1"]
    # Each plan ran on its own devices: its memory was measured on them.
    assert set(rows["unplaced (plan.json)"].peak_bytes) == {"cpu"}
    assert set(rows["round_robin"].peak_bytes) == {"cpu:0", "cpu:1"}
    assert results.devices == ["cpu", "cpu:0", "cpu:1"] and results.bounds["lower_bound_ms"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["devices"] for r in saved["methods"]] == [["cpu"], ["cpu"], ["cpu:0", "cpu:1"]]


def test_a_plan_for_another_model_is_refused_before_any_work(plans, tmp_path, monkeypatch):
    workload, paths = plans
    other = plan_from_assignment(torch.nn.Sequential(torch.nn.Linear(4, 4)), lambda node: "cpu:0",
                                 ["cpu:0", "cpu:1"], inputs=(torch.randn(2, 4),)).save(tmp_path / "other.json")
    monkeypatch.setattr(compare_module, "build_problem", boom)
    with pytest.raises(PlanError, match="other.json was made for another model"):
        compare(workload, [paths[0], other], out_dir=tmp_path / "out", protocol=PROTOCOL)
    assert not (tmp_path / "out").exists()


def test_a_plan_on_devices_this_host_lacks_is_refused_before_any_work(plans, tmp_path, monkeypatch):
    workload, paths = plans
    other = json.loads(paths[1].read_text())
    other["devices"] = ["cpu:0", "cpu:1", "cuda:99"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    monkeypatch.setattr(compare_module, "load_workload", boom)
    with pytest.raises(DeviceSpecError, match=r"other.json places the model on cpu:0, cpu:1, cuda:99, but device "
                                              r"'cuda:99' does not exist on this host.*placer optimize --devices"):
        compare(workload, [paths[0], tmp_path / "other.json"], out_dir=tmp_path / "out", protocol=PROTOCOL)
    assert not (tmp_path / "out").exists()


def test_a_rows_cut_edges_are_counted_on_its_own_device_sets_problem():
    pair = PlacementProblem(random_grouped_graph(12, seed=3), parse_cluster("cpu:0,cpu:1"))
    other = PlacementProblem(random_grouped_graph(8, seed=5), parse_cluster("cpu:0,cpu:1,cpu:2"))
    placement = [g % 3 for g in range(other.n_groups)]
    row = MethodResult("rl", "rl", placement=placement, devices=["cpu:0", "cpu:1", "cpu:2"])
    cut = sum(placement[u] != placement[v] for u, v in other.costs.edges.tolist())
    assert cut > 0 and simplicity(row, [pair, other]) == (1, 3, 1, cut, 3)
    assert simplicity(row, pair) == (1, 3, 1, 0, 3)  # another device set's groups say nothing of this placement


def test_when_unplaced_wins_compares_headline_promises_no_plan_file():
    unplaced = MethodResult("unplaced", "unplaced", devices=["cpu"], measured_ms=10.0)
    choice = verdict_choice(unplaced, unplaced, "confirm", ["unplaced"], "cpu", writes_plan=False)
    assert choice.method == "unplaced" and choice.headline.startswith("No plan is measurably faster")
    assert "plan.json" not in choice.headline


@pytest.mark.parametrize("reading", ["direct", "load average"])
def test_compare_gives_no_verdict_over_an_unplaced_timed_on_a_busy_host(plans, tmp_path, monkeypatch, two_threads,
                                                                         reading):
    # Trial 2 item 1: compare printed "215.84x" over an unplaced whose threads a busy host stalled, without a note.
    workload, paths = plans
    if reading == "direct":  # other processes' CPU time on unplaced's cores, over its own steps
        monkeypatch.setenv("PLACER_OTHER_CORES", "1.5")
        cause = "No verdict: other processes held 1.5 of the "
    else:  # the fallback where the host's tick counters cannot tell
        monkeypatch.setattr("placer.runtime.timing.busy_host", lambda cores: {"load": 7.5, "cores": cores})
        cause = "No verdict: the host was busy (load 7.5 on "
    results = compare(workload, paths, out_dir=tmp_path, protocol=PROTOCOL, warn=pytest.fail)
    assert results.choice.verdict == "unmeasured" and results.best is None
    assert results.choice.headline.startswith(cause)
    assert "plan.json" not in results.choice.headline and "--resume" not in results.choice.headline
    assert all(r.vs_unplaced is None or r.vs_unplaced.verdict == "unmeasured" for r in results.methods)
    assert sum("the host was busy" in note for note in results.notes) == 1  # on the terminal, once


def test_a_plan_file_given_twice_is_one_row_and_a_whole_host_plan_is_named_the_unplaced_model(plans, whole_host_plan,
                                                                                              tmp_path):
    workload, paths = plans
    results = compare(workload, [str(paths[1]), whole_host_plan, paths[1]], out_dir=tmp_path, protocol=PROTOCOL,
                      warn=pytest.fail)
    assert [r.method for r in results.methods] == ["unplaced", "round_robin", "unplaced (plan.json)"]
    assert f"{paths[1]} given more than once: measured once, in one row" in results.notes
    (twin,) = [r for r in results.methods if r.notes]
    assert twin.method == "unplaced (plan.json)" and twin.notes[0].startswith(
        "unplaced (plan.json): the unplaced model (the whole model on cpu, as unplaced runs it)")
    assert twin.notes[0] in results.notes


def test_a_hand_edited_plan_is_its_own_candidate_simulated_from_its_assignment(plans, tmp_path):
    """A hand edit of plan.json changes `assignment`, not the stored `placement` or
    `simulated_ms`: compare must read the plan from its assignment, or the edited plan
    would pass for the original (one candidate, one shared measurement) with its number."""
    workload, paths = plans
    original = json.loads(paths[1].read_text())  # round_robin
    problem = build_problem(workload, "cpu:0,cpu:1")
    members = problem.groups.nodes[0]["members"]
    assert len(members) > 1  # so that moving one member splits the group
    other = {"cpu:0": "cpu:1", "cpu:1": "cpu:0"}
    edited = {**original, "assignment": {n: other[d] if n in members else d
                                         for n, d in original["assignment"].items()}}
    first_member = members[0]
    split = {**original, "assignment": {**original["assignment"],
                                        first_member: other[original["assignment"][first_member]]}}
    edited_path, split_path = tmp_path / "edited.json", tmp_path / "split.json"
    edited_path.write_text(json.dumps(edited))
    split_path.write_text(json.dumps(split))
    results = compare(workload, [paths[1], edited_path, split_path], out_dir=tmp_path / "out", protocol=PROTOCOL,
                      warn=pytest.fail)
    rows = {r.plan: r for r in results.methods[1:]}
    first, moved, halved = rows[str(paths[1])], rows[str(edited_path)], rows[str(split_path)]
    assert first.placement == original["placement"]
    assert moved.placement == [1 - original["placement"][0], *original["placement"][1:]]
    simulator = compare_module.Simulator(problem, compare_module.load_calibration(problem))
    assert moved.simulated_ms == pytest.approx(simulator.simulate(moved.placement).step_ms)
    assert halved.placement is None and halved.simulated_ms is None
    assert any("not simulated" in n and "split.json" in n for n in results.notes)


def test_a_plan_edited_to_a_micro_batch_count_the_profile_lacks_shows_no_simulated_time(plans, tmp_path):
    """review: the simulator answers inf for a count without a profile; shown as a number."""
    workload, paths = plans
    edited = {**json.loads(paths[1].read_text()), "microbatches": 3, "schedule": "gpipe"}
    path = tmp_path / "three.json"
    path.write_text(json.dumps(edited))
    results = compare(workload, [path], out_dir=tmp_path / "out", protocol=PROTOCOL, warn=pytest.fail)
    row = results.methods[1]
    assert row.microbatches == 3 and row.simulated_ms is None
    assert any(n.startswith("round_robin: not simulated") for n in results.notes)
