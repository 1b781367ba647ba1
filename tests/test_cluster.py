import warnings

import pytest
import torch

from graphs.devices import check_numbering, host_cores, parse_cluster, parse_size
from graphs.errors import DeviceSpecError


def test_virtual_cpu_devices_share_the_cores():
    cluster = parse_cluster("cpu:0,cpu:1")
    assert cluster.names == ["cpu:0", "cpu:1"]
    assert all(d.kind == "cpu" and d.torch_device == "cpu" and d.is_virtual_cpu for d in cluster.devices)
    assert all(d.threads == max(1, host_cores() // 2) for d in cluster.devices)
    assert cluster.kinds == ["cpu"]


def test_whole_host_cpu_gets_every_core():
    (device,) = parse_cluster("cpu").devices
    assert device.threads == host_cores() and not device.is_virtual_cpu


def test_default_is_two_virtual_cpus_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("host has a GPU")
    assert parse_cluster(None).names == ["cpu:0", "cpu:1"]


@pytest.mark.parametrize("size,expected", [("16GiB", 16 * 2**30), ("2GB", 2 * 10**9), ("512", 512),
                                           ("1.5MiB", int(1.5 * 2**20)), ("3 kib", 3 * 1024)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def test_memory_caps_apply_to_named_devices():
    cluster = parse_cluster("cpu:0,cpu:1", "cpu:1=2GiB")
    assert [d.memory_bytes for d in cluster.devices] == [None, 2 * 2**30]


@pytest.mark.parametrize("devices,memory,message", [
    ("gpu:0", None, "cannot read device"),
    ("cpu:0,cpu:0", None, "listed twice"),
    ("cpu:0,cpu:00", None, "listed twice"),
    ("cuda,cuda:0", None, r"listed twice in 'cuda,cuda:0' \(as 'cuda' and 'cuda:0'\)"),  # before any GPU check
    ("rank0:cuda,rank0:cuda:0", None, "listed twice"),
    ("", None, "no devices"),
    ("cpu,cpu:1", None, "either the whole host"),
    ("cuda:7", None, "does not exist on this host"),
    ("cpu:0", "cpu:1=1GiB", "not among the devices"),
    ("cpu:0", "cpu:0", "DEVICE=SIZE"),
    ("cpu:0", "cpu:0=lots", "cannot read memory size"),
    ("cpu:0,cpu:1", "cpu:0=1GB,cpu:0=1KiB", "'cpu:0' is capped twice"),
])
def test_bad_specs_are_one_clear_line(devices, memory, message):
    if devices == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("host has 8 GPUs")
    with pytest.raises(DeviceSpecError, match=message) as info:
        parse_cluster(devices, memory)
    assert "\n" not in str(info.value)


def test_one_gpu_may_serve_two_ranks():
    cluster = parse_cluster("rank0:cuda:0,rank1:cuda:0")  # two processes, each its own device
    assert [d.torch_device for d in cluster.devices] == ["cuda:0", "cuda:0"]


def test_links_default_by_kind():
    cluster = parse_cluster("cpu:0,cpu:1")
    link = cluster.link(0, 1)
    assert link.transfer_s(0) == link.latency_s > 0
    assert cluster.index("cpu:1") == 1
    with pytest.raises(DeviceSpecError):
        cluster.index("cpu:5")


def test_more_virtual_cpu_devices_than_cores_is_warned_once_a_process(monkeypatch):
    import graphs.devices as devices

    monkeypatch.setattr(devices, "host_cores", lambda: 2)
    monkeypatch.setattr(devices, "_WARNED", set())  # as in a fresh process
    with pytest.warns(UserWarning, match="3 virtual CPU devices on 2 cores"):
        cluster = devices.parse_cluster("cpu:0,cpu:1,cpu:2")
    assert [d.threads for d in cluster.devices] == [1, 1, 1]
    with warnings.catch_warnings(record=True) as again:  # a command parses its devices several times
        warnings.simplefilter("always")
        devices.parse_cluster("cpu:0,cpu:1,cpu:2")
        devices.parse_cluster("cpu:0,cpu:1,cpu:2", "cpu:0=1GiB")
    assert again == []
    with pytest.warns(UserWarning, match="4 virtual CPU devices on 2 cores"):  # another warning: given too
        devices.parse_cluster("cpu:0,cpu:1,cpu:2,cpu:3")


@pytest.mark.parametrize("spec, expected", [
    ("cpu:0,cpu:5", "cpu:0,cpu:1"), ("cpu:1", "cpu:0"), ("cpu:1,cpu:2", "cpu:0,cpu:1"),
    ("cpu:0,cpu:2,cpu:1,cpu:4", "cpu:0,cpu:1,cpu:2,cpu:3"),
])
def test_the_command_line_numbers_virtual_cpu_devices_from_0_without_gaps(spec, expected):
    with pytest.raises(DeviceSpecError) as info:
        check_numbering(parse_cluster(spec))
    message = str(info.value)
    assert "\n" not in message and spec in message and f"e.g. {expected} " in message and "not a core" in message


@pytest.mark.parametrize("spec", ["cpu:0", "cpu:1,cpu:0", "cpu:0,cpu:1,cpu:2", "cpu", "rank0:cpu:0,rank1:cpu:1"])
def test_numbered_virtual_cpu_devices_the_whole_host_and_other_ranks_devices_pass(spec):
    check_numbering(parse_cluster(spec))  # other ranks' devices live in their own processes: any number


def test_a_single_misnumbered_virtual_cpu_device_is_told_the_one_number_to_write():
    with pytest.raises(DeviceSpecError) as info:  # not "number them cpu:0 to cpu:0 without gaps"
        check_numbering(parse_cluster("cpu:5"))
    assert str(info.value).startswith("virtual CPU device cpu:5: number a single device 0, e.g. cpu:0 (")
