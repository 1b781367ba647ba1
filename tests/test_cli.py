"""The `placer` command end to end, as a user runs it: a real process, real exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKLOAD = "zoo:transformer:small"
DEVICES = "cpu:0,cpu:1"


def placer(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "placer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("opt")
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--budget", "4", "--iters", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_inspect_json_has_the_documented_keys():
    result = placer("inspect", WORKLOAD, "--devices", DEVICES, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("nodes", "edges", "groups", "param_bytes", "compute_ms", "critical_path_ms", "lower_bound_ms"):
        assert key in summary
    assert summary["lower_bound_ms"] >= summary["critical_path_ms"] > 0
    assert summary["compute_ms"]["cpu"] > 0


def test_optimize_writes_plan_results_and_report(optimized):
    for name in ("plan.json", "results.json", "report.md", "report.html"):
        assert (optimized / name).is_file(), name
    results = json.loads((optimized / "results.json").read_text())
    methods = {row["method"]: row for row in results["methods"]}
    assert {"single", "metis", "expert", "rl"} <= set(methods)
    best = methods[results["best"]]
    measured = [row["measured_ms"] for row in results["methods"] if row["measured_ms"] is not None]
    assert best["measured_ms"] == min(measured)
    plan = json.loads((optimized / "plan.json").read_text())
    assert plan["format"] == "placer.plan/v1" and plan["method"] == results["best"]
    assert plan["measured_ms"] == best["measured_ms"]
    html = (optimized / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    markdown = (optimized / "report.md").read_text()
    assert "RL" in markdown and "METIS" in markdown
    assert not list(optimized.glob("*.tmp"))


def test_plan_is_reusable_by_measure_train_and_compare(optimized, tmp_path):
    plan = str(optimized / "plan.json")
    measured = placer("measure", WORKLOAD, "--plan", plan, "--iters", "2", "--json")
    assert measured.returncode == 0, measured.stderr
    data = json.loads(measured.stdout)
    assert data["feasible"] and data["median_ms"] > 0 and set(data["peak_bytes"]) == set(DEVICES.split(","))
    trained = placer("train", WORKLOAD, "--plan", plan, "--steps", "2")
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.count("loss") == 2
    metis = tmp_path / "metis.json"
    made = placer("baseline", WORKLOAD, "--method", "metis", "--devices", DEVICES, "--out", str(metis))
    assert made.returncode == 0 and metis.is_file(), made.stderr
    compared = placer("compare", WORKLOAD, plan, str(metis), "--iters", "2", "--out", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())["methods"]
    assert len(rows) == 2 and all(r["measured_ms"] for r in rows)
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_resume_continues_the_search(optimized):
    first = json.loads((optimized / "results.json").read_text())["curve"]
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--budget", "8", "--iters", "2", "--out",
                    str(optimized), "--resume")
    assert result.returncode == 0, result.stderr
    resumed = json.loads((optimized / "results.json").read_text())["curve"]
    assert resumed[:len(first)] == first and len(resumed) > len(first)  # the same search, carried on


def test_baseline_all_prints_every_method():
    result = placer("baseline", WORKLOAD, "--method", "all", "--devices", DEVICES)
    assert result.returncode == 0, result.stderr
    for name in ("single", "round_robin", "expert", "balanced", "sequential_fill", "metis", "kernighan_lin", "etf"):
        assert name in result.stdout
    assert "lower bound" in result.stdout


def test_bad_inputs_are_one_line_and_exit_2(tmp_path):
    assert_one_line_error(placer("inspect", str(tmp_path / "nope.py")), "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("def build_model(:\n")
    assert_one_line_error(placer("inspect", str(bad)), "bad.py", "syntax")
    assert_one_line_error(placer("inspect", "zoo:resnet"), "zoo:resnet")
    assert_one_line_error(placer("inspect", WORKLOAD, "--devices", "gpu:0"), "gpu:0")
    assert_one_line_error(placer("inspect", WORKLOAD, "--devices", "cuda:9"), "cuda:9")
    assert_one_line_error(placer("baseline", WORKLOAD, "--method", "single", "--devices", DEVICES,
                                 "--memory", "cpu:0=1KiB,cpu:1=1KiB"))
    assert_one_line_error(placer("inspect", WORKLOAD, "--max-groups", "0"), "--max-groups")
    assert_one_line_error(placer("optimize", WORKLOAD, "--budget", "0"), "--budget")
    corrupt = tmp_path / "plan.json"
    corrupt.write_text("{not json")
    assert_one_line_error(placer("measure", WORKLOAD, "--plan", str(corrupt)), "plan.json")


def test_a_plan_for_another_model_is_refused(optimized):
    result = placer("measure", "zoo:rnnlm:small", "--plan", str(optimized / "plan.json"))
    assert_one_line_error(result, "another model")


def test_debug_shows_the_traceback(tmp_path):
    result = placer("--debug", "inspect", str(tmp_path / "nope.py"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_infeasible_optimize_leaves_no_plan_or_report(tmp_path):
    out = tmp_path / "out"
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--memory", "cpu:0=1KiB,cpu:1=1KiB",
                    "--budget", "2", "--out", str(out))
    assert_one_line_error(result)
    assert not (out / "plan.json").exists() and not (out / "report.html").exists()


def test_parallel_measurement_with_workers(tmp_path):
    out = tmp_path / "w"
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--budget", "2", "--iters", "2",
                    "--workers", "2", "--reward", "measure", "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    measured = [row for row in results["methods"] if row["measured_ms"] is not None]
    assert len(measured) >= 2 and results["best"] in {row["method"] for row in measured}
