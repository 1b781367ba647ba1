"""What a careless user or a hostile environment does to `placer`, driven as a user
would: the real command in a subprocess, real signals, real limits. Each kind of
fault ends in one clear line, the right exit status, a saved plan where there is
one, and nothing half-written."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import DEVICES, FAST, WORKLOAD, assert_one_line_error, placer, placers


def start(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """The command running in the background (its output collected by communicate())."""
    return subprocess.Popen([sys.executable, "-m", "placer.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200", **(env or {})},
                            **kwargs)


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def workload_file(tmp_path: Path) -> Path:
    """A tiny workload that prints as it builds and runs, and whose output is NaN."""
    path = tmp_path / "noisy.py"
    path.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = torch.nn.Linear(8, 8)\n"
        "        self.b = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.relu(self.a(x))) * float('nan')\n"
        "def build_model():\n"
        "    print('HELLO FROM build_model')\n"
        "    return Net()\n"
        "def example_inputs():\n"
        "    print('HELLO FROM example_inputs')\n"
        "    return (torch.randn(4, 8),)\n")
    return path


def test_every_input_is_checked_before_any_work_and_nothing_is_created(tmp_path):
    policy = tmp_path / "policy.pt"
    policy.write_bytes(b"not a policy")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (("--policy", str(policy)), ("policy.pt",)),
        (("--workers", "1000"), ("--workers 1000", "core")),
        (("--seed", "99999999999999999999"), ("--seed",)),
        (("--budget", "nan"), ("--budget",)),
        (("--search", "algo=sarsa"), ("sarsa",)),
    ]
    outs = [tmp_path / f"out{i}" for i in range(len(cases))]  # one each: the commands run at once
    bad_outs = (a_file / "out", Path("/proc/placer-test-out"))  # /sys alike: tests/test_files.py
    results = placers(*[("optimize", WORKLOAD, "--out", str(out), *args) for out, (args, _) in zip(outs, cases)],
                      *[("optimize", WORKLOAD, "--out", str(bad_out)) for bad_out in bad_outs])
    for out, (args, fragments), result in zip(outs, cases, results):
        assert_one_line_error(result, *fragments)
        assert not out.exists(), args  # nothing created until every input passed
    for bad_out, result in zip(bad_outs, results[len(cases):]):
        assert_one_line_error(result, str(bad_out))
    cache = placer("inspect", WORKLOAD, env_extra={"PLACER_CACHE": str(a_file)})
    assert_one_line_error(cache, str(a_file), "PLACER_CACHE")


def test_an_unwritable_cache_is_a_warning_and_json_stays_on_stdout(workload_file):
    result = placer("inspect", str(workload_file), "--devices", DEVICES, "--json",
                    env_extra={"PLACER_CACHE": "/proc/placer-cache"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nodes"] > 0  # the workload's prints did not break the JSON
    assert "HELLO FROM build_model" in result.stderr and "HELLO" not in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "/proc/placer-cache" in warnings[0]


def test_nan_output_is_noted_and_a_slow_step_names_its_limit(workload_file, tmp_path):
    plan = tmp_path / "plan.json"
    made = placer("baseline", str(workload_file), "--method", "round_robin", "--devices", DEVICES, "--out", str(plan))
    assert made.returncode == 0, made.stderr
    measured, slow = placers(("measure", str(workload_file), "--plan", str(plan), "--iters", "2", "--json"),
                             ("measure", str(workload_file), "--plan", str(plan), "--iters", "2", "--step-timeout",
                              "1e-9"))
    assert measured.returncode == 0, measured.stderr
    data = json.loads(measured.stdout)
    assert data["feasible"] and any("nan" in note and "diverge" in note for note in data["notes"])
    # a plan that cannot run here (timed out, or refused by the runtime) is the user's to change: exit status 2
    assert_one_line_error(slow, f"{plan}: infeasible: timed out", "1e-09 s limit", "--step-timeout")
    assert "step time" not in slow.stdout


def test_a_full_disk_is_a_warning_and_the_plan_is_still_written(tmp_path):
    out = tmp_path / "out"
    limit = 64 * 1024  # plan.json, results.json and the plots fit; the self-contained report.html does not

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "placer.cli", "optimize", WORKLOAD, "--devices", DEVICES,
                             "--methods", "single,round_robin,expert", *FAST, "--out", str(out)],
                            capture_output=True, text=True, preexec_fn=small_files, timeout=600)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("report" in w and str(out) in w and "File too large" in w for w in warnings), result.stderr
    assert (out / "plan.json").is_file() and (out / "results.json").is_file()
    assert not (out / "report.html").exists() and not (out / "report.md").exists()  # no report rather than half one
    best = json.loads((out / "results.json").read_text())["best"]
    assert json.loads((out / "plan.json").read_text())["method"] == best


def test_sigterm_saves_the_best_plan_says_terminated_and_exits_143(tmp_path):
    out = tmp_path / "out"
    run = start("optimize", WORKLOAD, "--devices", DEVICES, "--methods", "single,expert,rl", "--budget", "300",
                *FAST, "--out", str(out))
    wait_for(lambda: (out / "search").is_dir() or run.poll() is not None, "the search to start")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated" and "Traceback" not in stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "terminated" and results["interrupted_at"].startswith("search")
    assert json.loads((out / "plan.json").read_text())["method"] == results["best"]


def test_ctrl_c_before_anything_is_measured_says_interrupted(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = start("optimize", WORKLOAD, "--devices", DEVICES, "--iters", "100000", "--out", str(out),
                env={"PLACER_CACHE": str(cache)})
    wait_for(lambda: any(cache.glob("profile-*.json")) or run.poll() is not None, "profiling to finish")
    run.send_signal(signal.SIGINT)
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)  # twice, as an impatient user does
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert not (out / "plan.json").exists()


# Measurement workers dying with their parent and ignoring Ctrl-C: tests/test_distributed.py's pool
# section. `placer optimize --workers 2` is refused on CPU devices (tests/test_cli.py), and one worker
# measures in the command's own process, so no command here can start a pool.
