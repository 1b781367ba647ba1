"""placer.runtime.pool: how many workers a host may run, on which devices, and what a
worker is sent. (Workers measuring, dying and being replaced, dying with their parent
and Ctrl-C: tests/test_distributed.py's pool section.)"""

import pytest

from graphs.devices import Cluster, Device, host_cores, parse_cluster
from graphs.errors import DeviceSpecError
from placer.plan import Plan
from placer.runtime.pool import _on_devices, check_workers, max_workers, worker_device_sets


def test_no_more_workers_than_cores():
    gpus = Cluster(devices=(Device("cuda:0", "cuda", "cuda:0"),))  # no CPU device: only the cores count
    assert max_workers() == host_cores()
    check_workers(max_workers(), gpus)
    with pytest.raises(DeviceSpecError, match=rf"--workers {host_cores() + 1}: this host has {host_cores()} core"):
        check_workers(host_cores() + 1, gpus)


@pytest.mark.skipif(host_cores() < 2, reason="two workers need two cores")
def test_workers_that_would_run_cpu_devices_on_a_share_of_the_cores_are_refused():
    # the plan runs cpu:0,cpu:1 on every core between them; a worker would have half
    cores = host_cores()
    with pytest.raises(DeviceSpecError) as refused:
        check_workers(2, parse_cluster("cpu:0,cpu:1"))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--workers 2: each worker would run cpu:0,cpu:1 on {cores // 2} of this host's "
                              f"{cores} cores, where the plan runs them on {2 * (cores // 2)}")
    assert "so its measurements would not be the plan's; use --workers 1" in message
    if cores == 2:
        assert "(one thread each)" in message
    with pytest.raises(DeviceSpecError, match=rf"would run cpu on {cores // 2} of this host's {cores} cores, "
                                              rf"where the plan runs it on {cores},"):
        check_workers(2, parse_cluster("cpu"))
    check_workers(1, parse_cluster("cpu:0,cpu:1"))  # one worker has every core


@pytest.mark.skipif(host_cores() < 2, reason="two workers need two cores")
def test_gpu_devices_are_not_refused_for_the_cpus_sake():
    # built by hand: the rule needs no GPU to check, and parse_cluster would refuse cuda:N here
    gpus = Cluster(devices=tuple(Device(f"cuda:{i}", "cuda", f"cuda:{i}") for i in range(2)))
    check_workers(2, gpus)
    with_cpu = Cluster(devices=(*gpus.devices, Device("cpu", "cpu", "cpu", threads=host_cores())))
    with pytest.raises(DeviceSpecError, match=r"would run cpu on \d+ of this host's"):
        check_workers(2, with_cpu)


def test_each_worker_gets_its_own_cores():
    sets = worker_device_sets(["cpu:0", "cpu:1"], 1)
    assert sets == [(["cpu:0", "cpu:1"], sets[0][1])] and len(sets[0][1]) == host_cores()


def test_a_plan_is_renamed_onto_a_workers_devices():
    plan = Plan(devices=["cpu:0", "cpu:1"], assignment={"a": "cpu:0", "b": "cpu:1"},
                device_map={"": "cpu", "layer": "cpu"}, fingerprint="f")
    moved = _on_devices(plan, ["cpu:2", "cpu:3"])
    assert moved.devices == ["cpu:2", "cpu:3"] and moved.assignment == {"a": "cpu:2", "b": "cpu:3"}
    assert moved.device_map == {"": "cpu", "layer": "cpu"}  # accelerate names: a CPU is "cpu" wherever it is
