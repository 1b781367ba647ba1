"""Mistakes a new user made (docs/trial.md, items 5 and 6), driven as the user did: a
real `placer` process. Each is one line `error: ...` and exit status 2 before any work;
a warning is said once; `inspect` and optimize's report give the same lower bound."""

import json

import pytest

from graphs.devices import host_cores
from placer.plan import Plan
from tests.test_cli import DEVICES, FAST, WORKLOAD, assert_one_line_error, placer, placers

MODEL = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def example_inputs():
    return (torch.randn(3, 4),)
"""


def test_a_loss_fn_that_cannot_take_the_inputs_is_refused_by_every_command_before_any_work(tmp_path):
    workload = tmp_path / "badloss.py"
    workload.write_text(MODEL + "\ndef loss_fn(out):\n    return out.sum()\n")  # the trial's: no *inputs
    plan = Plan(devices=DEVICES.split(","), assignment={}, device_map={}, fingerprint="f").save(tmp_path / "plan.json")
    out = tmp_path / "out"
    w = str(workload)
    results = placers(("inspect", w), ("baseline", w, "--method", "single", "--devices", DEVICES),
                      ("measure", w, "--plan", str(plan)), ("train", w, "--plan", str(plan), "--steps", "2"),
                      ("optimize", w, "--devices", DEVICES, "--out", str(out)))
    for result in results:  # not "internal error: TypeError ..." with status 1, as the trial met it
        assert_one_line_error(result, "badloss.py", "loss_fn(out)", "loss_fn(output, *inputs)")
    assert not out.exists()


def test_more_virtual_cpu_devices_than_cores_is_warned_once(tmp_path):
    devices = ",".join(f"cpu:{i}" for i in range(host_cores() + 1))
    result = placer("inspect", WORKLOAD, "--devices", devices)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "virtual CPU devices on" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), result.stderr


def test_inspect_gives_the_lower_bound_that_optimize_reports(tmp_path):
    cache = tmp_path / "cache"
    env = {"PLACER_CACHE": str(cache)}  # this test's profile and calibration alone

    def inspect() -> dict:
        result = placer("inspect", WORKLOAD, "--devices", DEVICES, "--json", env_extra=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = inspect()  # profiles; no calibration yet
    assert any(note.startswith("lower bound as optimize's report gives it") for note in first["notes"])
    (profile,) = cache.glob("profile-*.json")
    data = json.loads(profile.read_text())
    scale, data["profile_scale"] = data["profile_scale"], 2.0  # a whole step twice its ops timed alone
    profile.write_text(json.dumps(data))
    # The report's bound undoes a scale above 1 (graphs.bounds.cost_floor): every cost, so the bound, halves
    # against the plain profiled costs that inspect once summed (and that ignored the scale).
    assert inspect()["lower_bound_ms"] == pytest.approx(first["lower_bound_ms"] * 0.5 / min(1.0, 1.0 / scale))
    out = tmp_path / "out"
    optimized = placer("optimize", WORKLOAD, "--devices", DEVICES, "--methods", "single,metis", "--budget", "5",
                       *FAST, "--out", str(out), env_extra=env)
    assert optimized.returncode == 0, optimized.stderr
    summary, bounds = inspect(), json.loads((out / "results.json").read_text())["bounds"]  # now calibrated
    assert summary["lower_bound_ms"] == bounds["lower_bound_ms"] > 0
    assert (summary["critical_path_ms"], summary["work_ms"]) == (bounds["critical_path_ms"], bounds["work_ms"])
    assert summary["lower_bound_microbatches"] == bounds["microbatches"]
