"""placer.runtime.pool: how many workers a host may run, and what a worker is sent.
(Workers measuring, dying and being replaced: tests/test_distributed.py; dying with
their parent and Ctrl-C: tests/test_cli_faults.py.)"""

import pytest

from graphs.devices import host_cores
from graphs.errors import DeviceSpecError
from placer.plan import Plan
from placer.runtime.pool import _on_devices, check_workers, max_workers, worker_device_sets


def test_no_more_workers_than_cores():
    assert max_workers() == host_cores()
    check_workers(max_workers())
    with pytest.raises(DeviceSpecError, match=rf"--workers {host_cores() + 1}: this host has {host_cores()} core"):
        check_workers(host_cores() + 1)


def test_each_worker_gets_its_own_cores():
    sets = worker_device_sets(["cpu:0", "cpu:1"], 1)
    assert sets == [(["cpu:0", "cpu:1"], sets[0][1])] and len(sets[0][1]) == host_cores()


def test_a_plan_is_renamed_onto_a_workers_devices():
    plan = Plan(devices=["cpu:0", "cpu:1"], assignment={"a": "cpu:0", "b": "cpu:1"},
                device_map={"": "cpu", "layer": "cpu"}, fingerprint="f")
    moved = _on_devices(plan, ["cpu:2", "cpu:3"])
    assert moved.devices == ["cpu:2", "cpu:3"] and moved.assignment == {"a": "cpu:2", "b": "cpu:3"}
    assert moved.device_map == {"": "cpu", "layer": "cpu"}  # accelerate names: a CPU is "cpu" wherever it is
