"""placer.compare: saved plans measured beside the unplaced model, in-process."""

import json

import pytest

import placer.compare as compare_module
from graphs.errors import PlanError
from graphs.problem import build_problem
from placer.baselines import run_baselines
from placer.compare import compare
from placer.measurements import Protocol
from placer.plan import make_plan
from tests.test_optimize import WORKLOAD

PROTOCOL = Protocol(min_runs=3, max_runs=6, cap_s=0.5, warmup=1)


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
    assert all(r.vs_unplaced is not None and r.plan for r in results.methods[1:])
    assert results.command == "compare" and results.choice.headline and results.plan is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["choice"]["method"] == results.best and (tmp_path / "report.md").is_file()
    assert not (tmp_path / "plan.json").exists()


def test_plans_for_other_devices_are_refused_before_any_work(plans, tmp_path, monkeypatch):
    workload, paths = plans
    other = json.loads(paths[1].read_text())
    other["devices"] = ["cpu:0", "cpu:1", "cpu:2"]
    (tmp_path / "other.json").write_text(json.dumps(other))

    def boom(*args, **kwargs):
        raise AssertionError("work started before the plans were checked")

    monkeypatch.setattr(compare_module, "load_workload", boom)
    with pytest.raises(PlanError, match="same devices"):
        compare(workload, [paths[0], tmp_path / "other.json"], out_dir=tmp_path / "out", protocol=PROTOCOL)
    assert not (tmp_path / "out").exists()
