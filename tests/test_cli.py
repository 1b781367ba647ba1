"""The `placer` command end to end, as a user runs it: a process of its own, real exit codes
(most forked from a server with torch imported: tests.cli_runner)."""

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from placer.results import method_name
from tests import cli_runner

WORKLOAD = "zoo:transformer:small"
DEVICES = "cpu:0,cpu:1"
# Measurement sessions of --iters timed steps per candidate (the cap ends a session as soon as every
# candidate has them), and a short imitation of the warm start: tests check behaviour, not speed.
FAST = ("--iters", "2", "--measure-cap", "0.01")
SHORT_RL = ("--search", "imitation_steps=20")


def placer(*args: str, cwd: Path | None = None, env_extra: dict | None = None,
           fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """`placer ARGS` in a process of its own, to its end: by default forked from a server with
    torch and placer imported (tests.cli_runner); `fresh_interpreter` runs `python -m placer.cli`,
    for what depends on the interpreter's start."""
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    if not fresh_interpreter:
        return cli_runner.run(list(args), cwd, env, timeout=600)
    return subprocess.run([sys.executable, "-m", "placer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def placers(*commands: Sequence[str]) -> list[subprocess.CompletedProcess]:
    """Independent `placer` commands, each in its own process as placer() runs it, started
    at once so that their interpreter and torch start-ups overlap: their results, in order."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda args: placer(*args), commands))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "\n\n" not in f"\n{result.stderr}", result.stderr  # no empty line (the progress display left one)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("opt")
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--methods", "single,expert,metis,rl",
                    "--budget", "600", "--search", "max_samples=16", "--search", "batch_size=8", *SHORT_RL, *FAST,
                    "--out", str(out), fresh_interpreter=True)  # the whole command as a user starts it
    assert result.returncode == 0, result.stderr
    return out


def test_inspect_json_has_the_documented_keys():
    result = placer("inspect", WORKLOAD, "--devices", DEVICES, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("nodes", "edges", "groups", "param_bytes", "compute_ms", "critical_path_ms", "lower_bound_ms"):
        assert key in summary
    assert any(re.fullmatch(r"virtual CPU devices' intra-op threads \(each its share of this host's \d+ cores\): "
                            r"cpu:0: \d+ threads?, cpu:1: \d+ threads?", note) for note in summary["notes"]), \
        summary["notes"]
    assert summary["lower_bound_ms"] >= summary["critical_path_ms"] > 0
    assert summary["compute_ms"]["cpu"] > 0
    assert summary["devices"] == DEVICES.split(",")  # the devices by name, not by kind


def test_optimize_writes_plan_results_and_report(optimized):
    for name in ("plan.json", "results.json", "report.md", "report.html", "measurements.json"):
        assert (optimized / name).is_file(), name
    text = (optimized / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not strict JSON"))
    assert results["schema"] == "placer.results/v1" and results["status"] == "complete"
    methods = {row["method"]: row for row in results["methods"]}
    assert {"unplaced", "single", "metis", "expert", "rl"} <= set(methods)
    assert methods["unplaced"]["kind"] == "unplaced" and methods["rl"]["kind"] == "rl"
    for row in results["methods"]:
        if row["measured_ms"] is not None:  # every measured row: median, its CI, runs, its session
            low, high = row["ci_ms"]
            assert low <= row["measured_ms"] <= high and row["runs"] >= 2 and row["session"]
            # ratios only in the session that measured unplaced last (placer.choose.settle_ratios)
            same_session = row["session"] == methods["unplaced"]["session"]
            assert row["kind"] == "unplaced" or (row["vs_unplaced"] is not None) == same_session
            assert row["vs_unplaced"] is None or row["vs_unplaced"]["reference"] == "unplaced"
    choice = results["choice"]
    best = methods[results["best"]]
    assert choice["method"] == results["best"] and best["session"] == "confirm"
    # The choice rule: a plan is chosen only when measurably faster than unplaced in the confirm session.
    assert results["best"] == "unplaced" or best["vs_unplaced"]["verdict"] == "faster"
    plan = json.loads((optimized / "plan.json").read_text())
    assert plan["format"].startswith("placer.plan/") and plan["method"] == results["best"]
    assert plan["measured_ms"] == best["measured_ms"]
    if results["best"] == "unplaced":
        assert plan["devices"] == methods["unplaced"]["devices"] == ["cpu"]
        assert "No plan is measurably faster" in choice["headline"]
    html = (optimized / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    markdown = (optimized / "report.md").read_text()
    assert markdown.splitlines()[0] == f"**{choice['headline']}**"
    assert "RL" in markdown and "METIS" in markdown and results["run_id"] in markdown
    assert not list(optimized.glob("*.tmp")) and not list(optimized.glob(".run-*"))
    mask = os.umask(0)
    os.umask(mask)
    for name in ("plan.json", "results.json", "measurements.json"):  # they follow the umask, as the report does
        assert stat.S_IMODE((optimized / name).stat().st_mode) == 0o666 & ~mask, name


def test_plan_is_reusable_by_measure_train_and_compare(optimized, tmp_path):
    plan = str(optimized / "plan.json")
    # plan.json is on cpu when unplaced won, else on DEVICES: a plan on cpu makes the device sets differ either way.
    made = {"metis": tmp_path / "metis.json", "single": tmp_path / "single.json"}
    measured, trained, *baselines = placers(  # independent commands, at once
        ("measure", WORKLOAD, "--plan", plan, "--iters", "2", "--json"),
        ("train", WORKLOAD, "--plan", plan, "--steps", "2"),
        *[("baseline", WORKLOAD, "--method", name, "--devices", devices, "--out", str(made[name]))
          for name, devices in (("metis", DEVICES), ("single", "cpu"))])
    assert measured.returncode == 0, measured.stderr
    data = json.loads(measured.stdout)
    devices = json.loads(Path(plan).read_text())["devices"]  # the chosen plan's: cpu when unplaced won
    assert data["feasible"] and data["median_ms"] > 0 and set(data["peak_bytes"]) == set(devices)
    assert data["ci_ms"][0] <= data["median_ms"] <= data["ci_ms"][1] and data["runs"] == 2
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.count("loss") == 2
    for name, result in zip(made, baselines):
        assert result.returncode == 0 and made[name].is_file(), result.stderr
    compared = placer("compare", WORKLOAD, plan, str(made["metis"]), str(made["single"]), *FAST,
                      "--out", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    rows = results["methods"]
    assert len(rows) == 4 and all(r["measured_ms"] for r in rows)  # the three plans and unplaced, in one session
    assert rows[0]["method"] == "unplaced" and {r["session"] for r in rows} <= {"compare", "confirm"}
    assert all((r["vs_unplaced"] is not None) == (r["session"] == rows[0]["session"]) for r in rows[1:])
    assert any(r["vs_unplaced"] is not None for r in rows[1:])
    for row, path in zip(rows[1:], (plan, made["metis"], made["single"])):  # each on its own devices
        assert row["plan"] == str(path) and row["devices"] == json.loads(Path(path).read_text())["devices"]
        assert set(row["peak_bytes"]) == set(row["devices"])
    assert rows[2]["devices"] == DEVICES.split(",") and rows[3]["devices"] == ["cpu"]
    assert results["choice"]["headline"] and compared.stdout.splitlines()[0] == results["choice"]["headline"]
    assert (tmp_path / "cmp" / "report.html").is_file() and not (tmp_path / "cmp" / "plan.json").exists()


def test_compare_refuses_a_plan_on_devices_this_host_lacks_in_one_line(optimized, tmp_path):
    plan = json.loads((optimized / "plan.json").read_text())
    plan["devices"].append("cuda:99")
    (tmp_path / "far.json").write_text(json.dumps(plan))
    result = placer("compare", WORKLOAD, str(optimized / "plan.json"), str(tmp_path / "far.json"),
                    "--out", str(tmp_path / "cmp"))
    assert_one_line_error(result, "far.json", "cuda:99", "placer optimize --devices")
    assert not (tmp_path / "cmp").exists()


def test_resume_continues_the_search(optimized):
    first = json.loads((optimized / "results.json").read_text())["curve"]
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--methods", "single,expert,metis,rl",
                    "--budget", "600", "--search", "max_samples=32", "--search", "batch_size=8", *SHORT_RL, *FAST,
                    "--out", str(optimized), "--resume")
    assert result.returncode == 0, result.stderr
    resumed = json.loads((optimized / "results.json").read_text())["curve"]
    assert resumed[:len(first)] == first and len(resumed) > len(first)  # the same search, carried on


def test_resume_with_other_devices_is_refused_before_any_work(optimized):
    before = {name: (optimized / name).read_bytes() for name in ("measurements.json", "results.json", "plan.json")}
    result = placer("optimize", WORKLOAD, "--devices", "cpu:0,cpu:1,cpu:2", "--budget", "4", *FAST,
                    "--out", str(optimized), "--resume")
    assert_one_line_error(result, "--resume", "devices")
    assert {name: (optimized / name).read_bytes() for name in before} == before  # nothing measured, nothing lost


def test_a_fresh_run_into_another_workloads_folder_or_a_resume_of_none_is_refused(optimized, tmp_path):
    before = {name: (optimized / name).read_bytes() for name in ("measurements.json", "results.json", "plan.json")}
    missing = tmp_path / "missing"
    result, resumed = placers(("optimize", "zoo:rnnlm:small", "--devices", DEVICES, "--budget", "4", *FAST, "--out",
                               str(optimized)),
                              ("optimize", WORKLOAD, "--budget", "4", "--out", str(missing), "--resume"))
    assert_one_line_error(result, f"holds a run of {WORKLOAD}", "--resume to continue it")
    assert {name: (optimized / name).read_bytes() for name in before} == before and (optimized / "search").is_dir()
    assert_one_line_error(resumed, str(missing), "does not exist")
    assert not missing.exists()


def test_search_options_lists_each_field_with_its_default_and_meaning():
    from placer.rl.trainer import TrainConfig

    result = placer("search-options")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" = ")[0] for line in lines] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(re.fullmatch(r"\w+ = \S+ +\S.*\.", line) for line in lines), result.stdout
    assert re.search(r"^batch_size = 16 +Candidates sampled per round \(RL: per policy update; .*\)\.$", result.stdout,
                     re.M)
    assert "None: no limit." in next(line for line in lines if line.startswith("max_samples"))


def test_baseline_all_prints_every_method():
    result = placer("baseline", WORKLOAD, "--method", "all", "--devices", DEVICES)
    assert result.returncode == 0, result.stderr
    for name in ("single", "round_robin", "expert", "balanced", "sequential_fill", "metis", "kernighan_lin", "etf"):
        assert method_name(name) in result.stdout
    assert "lower bound" in result.stdout


def test_bad_inputs_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def build_model(:\n")
    corrupt = tmp_path / "plan.json"
    corrupt.write_text("{not json")
    cases = [  # (command, fragments of its error line)
        (("inspect", str(tmp_path / "nope.py")), ("nope.py",)),
        (("inspect", str(bad)), ("bad.py", "syntax")),
        (("inspect", "zoo:resnet"), ("zoo:resnet",)),
        (("inspect", WORKLOAD, "--devices", "gpu:0"), ("gpu:0",)),
        (("inspect", WORKLOAD, "--devices", "cuda:9"), ("cuda:9",)),
        (("baseline", WORKLOAD, "--method", "single", "--devices", DEVICES, "--memory", "cpu:0=1KiB,cpu:1=1KiB"), ()),
        (("inspect", WORKLOAD, "--max-groups", "0"), ("--max-groups",)),
        (("optimize", WORKLOAD, "--budget", "0"), ("--budget",)),
        (("measure", WORKLOAD, "--plan", str(corrupt)), ("plan.json",)),
    ]
    for (command, fragments), result in zip(cases, placers(*(command for command, _ in cases))):
        assert_one_line_error(result, *fragments)


def test_a_missing_or_broken_workload_file_is_refused_before_torch_is_imported(tmp_path):
    """Such a refusal (and a bad device string) answers at once: nothing imports torch (seconds) before it."""
    bad = tmp_path / "bad.py"
    bad.write_text("def build_model(:\n")
    (tmp_path / "w.txt").write_text("def build_model(): ...\n")
    missing = str(tmp_path / "nope.py")
    cases = [(("inspect", missing), "nope.py"), (("optimize", str(bad), "--out", str(tmp_path / "out")), "syntax"),
             (("measure", missing, "--plan", str(tmp_path / "plan.json")), "nope.py"),
             (("baseline", str(tmp_path / "w.txt"), "--method", "single"), "not a Python file"),
             (("inspect", "zoo:mlp", "--devices", "gpu:0"), "gpu:0"),
             (("inspect", str(tmp_path)), "is a directory, not a Python file"),
             (("inspect", "zoo:mlp", "--devices", "cpu:0,cpu:5"), "e.g. cpu:0,cpu:1 ")]
    for command, fragment in cases:
        # each import: "import time: ... | name"
        result = placer(*command, env_extra={"PYTHONPROFILEIMPORTTIME": "1"}, fresh_interpreter=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr
        assert "graphs.workload_file" in imported and "torch" not in imported, command
    assert not (tmp_path / "out").exists()


def test_a_plan_for_another_model_is_refused(optimized):
    result = placer("measure", "zoo:rnnlm:small", "--plan", str(optimized / "plan.json"))
    assert_one_line_error(result, "another model")


def test_debug_adds_the_traceback_and_keeps_the_exit_status(tmp_path):
    result = placer("--debug", "inspect", str(tmp_path / "nope.py"))
    assert result.returncode == 2 and "Traceback" in result.stderr  # a bad input, as without --debug
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.py'}: no such file"


def test_infeasible_optimize_leaves_no_plan_or_report(tmp_path):
    out = tmp_path / "out"
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--memory", "cpu:0=1KiB,cpu:1=1KiB",
                    "--budget", "2", "--out", str(out))
    assert_one_line_error(result)
    assert not (out / "plan.json").exists() and not (out / "report.html").exists()


def test_workers_on_cpu_devices_are_refused_before_any_work(tmp_path):
    # each worker would measure cpu:0,cpu:1 on its share of the cores, not on the plan's
    out = tmp_path / "w"
    result = placer("optimize", WORKLOAD, "--devices", DEVICES, "--workers", "2", "--reward", "measure",
                    "--out", str(out))
    assert_one_line_error(result, "--workers 2", "cpu:0,cpu:1", "use --workers 1")
    assert not out.exists()


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "0", "-3", "fast"])
def test_numbers_that_are_not_finite_and_positive_are_refused(text):
    import click

    from placer.cli import FiniteFloat
    with pytest.raises(click.BadParameter):
        FiniteFloat().convert(text, None, None)
    assert FiniteFloat().convert("2.5", None, None) == 2.5
    with pytest.raises(click.BadParameter, match="above 0 and at most 0.5"):
        FiniteFloat(at_most=0.5).convert("0.51", None, None)
    assert FiniteFloat(at_most=0.5).convert("0.5", None, None) == 0.5


def test_report_re_renders_a_results_file_without_running_anything(optimized, tmp_path):
    result = placer("report", str(optimized / "results.json"), "--out", str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    headline = json.loads((optimized / "results.json").read_text())["choice"]["headline"]
    assert result.stdout.splitlines()[0] == headline
    assert (tmp_path / "again" / "report.md").read_text().splitlines()[0] == f"**{headline}**"
    assert (tmp_path / "again" / "report.html").is_file() and not (tmp_path / "again" / "plan.json").exists()


def test_the_progress_display_draws_from_its_callbacks_and_runs_no_thread_of_its_own(monkeypatch):
    # a refresh thread would take the GIL and a core inside timed steps (unplaced's among them)
    import io
    import threading

    from rich.console import Console

    import placer.cli_support as cli_support
    from placer.results import Stage

    out = io.StringIO()
    monkeypatch.setattr(cli_support, "console", Console(file=out, force_terminal=True, width=100))
    before = threading.active_count()
    with cli_support.stage_progress() as update:
        assert threading.active_count() == before
        update(Stage("measuring", 1, 4, {"candidate": "metis"}))
        assert "measuring" in out.getvalue() and "metis" in out.getvalue()
