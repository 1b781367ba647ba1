"""placer.run_folder through placer.optimize: a fresh run into a folder holding
another workload's run is refused before any work; one holding the same job's run
starts afresh without its search checkpoint; --resume needs the folder."""

import pytest

import placer.optimize as job
from graphs.errors import CheckpointError
from graphs.devices import host_cores
from placer.book import MeasurementBook
from placer.run_folder import check_fresh, check_resume

DEVICES = "cpu:0,cpu:1"
WORKLOAD = "zoo:mlp"


class Started(Exception):
    """Raised where the work (profiling) would begin."""


def started(*args, **kwargs):
    raise Started


def earlier_run(out, workload: str = WORKLOAD, devices: tuple[str, ...] = ("cpu:0", "cpu:1")) -> dict[str, bytes]:
    """A folder holding a run's files: its book (with its identity), results, plan and search checkpoint."""
    identity = {"workload": workload, "devices": list(devices), "memory": [None] * len(devices), "max_groups": 256,
                "workers": 1, "cores": host_cores()}
    MeasurementBook(identity, out / "measurements.json").save()
    (out / "search").mkdir(parents=True)
    files = {"plan.json": b"{}", "results.json": b"{}", "search/policy.pt": b"policy", "search/checkpoint.pt": b"ck"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: (out / name).read_bytes() for name in ("measurements.json", *files)}


def snapshot(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("workload, devices", [("zoo:rnnlm", ("cpu:0", "cpu:1")), (WORKLOAD, ("cpu:0", "cpu:1", "cpu:2"))])
def test_a_fresh_run_into_another_jobs_folder_is_refused_before_any_work(tmp_path, monkeypatch, workload, devices):
    monkeypatch.setattr(job, "build_problem", started)
    before = earlier_run(tmp_path, workload, devices)
    with pytest.raises(CheckpointError, match=f"--out {tmp_path} holds a run of {workload} on {','.join(devices)}: "
                                              f"use another --out, --resume to continue it, or delete it"):
        job.optimize(WORKLOAD, DEVICES, out_dir=tmp_path, warn=lambda text: None)
    assert snapshot(tmp_path) == before


def test_a_fresh_run_of_the_same_job_removes_its_stale_search_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "build_problem", started)
    earlier_run(tmp_path)
    told = []
    with pytest.raises(Started):
        job.optimize(WORKLOAD, DEVICES, out_dir=tmp_path, warn=told.append)
    assert not (tmp_path / "search").exists() and (tmp_path / "measurements.json").exists()
    assert len(told) == 1 and "removed the earlier run's search checkpoint" in told[0]


def test_a_workload_file_named_by_another_path_is_the_same_job(tmp_path, monkeypatch):
    workload = tmp_path / "wl.py"
    workload.write_text("x")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    earlier_run(out, "wl.py")
    told = []
    check_fresh(out, {"workload": str(workload), "devices": ["cpu:0", "cpu:1"]}, told.append)
    assert not (out / "search").exists() and told


def test_resume_into_a_missing_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "build_problem", started)
    with pytest.raises(CheckpointError, match="cannot --resume in .*missing: the folder does not exist"):
        job.optimize(WORKLOAD, DEVICES, out_dir=tmp_path / "missing", resume=True, warn=lambda text: None)
    assert not (tmp_path / "missing").exists()


def test_resume_keeps_the_search_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(job, "build_problem", started)
    before = earlier_run(tmp_path)
    with pytest.raises(Started):
        job.optimize(WORKLOAD, DEVICES, out_dir=tmp_path, resume=True, warn=lambda text: None)
    assert snapshot(tmp_path) == before


def test_resume_with_other_devices_names_what_differs_and_not_uncapped_memory(tmp_path):
    # Trial 2 item 8: "memory was [None, None], now [None, None, None]" beside the devices was noise.
    earlier_run(tmp_path)
    now = {"workload": WORKLOAD, "devices": ["cpu:0", "cpu:1", "cpu:2"], "memory": [None] * 3, "max_groups": 256,
           "workers": 1}
    with pytest.raises(CheckpointError) as refused:
        check_resume(tmp_path / "measurements.json", now, job.RESUME_KEYS)
    assert "devices was ['cpu:0', 'cpu:1'], now ['cpu:0', 'cpu:1', 'cpu:2']" in str(refused.value)
    assert "memory" not in str(refused.value)
    capped = {**now, "memory": [None, None, 1024]}  # a cap is a difference worth naming
    with pytest.raises(CheckpointError, match=r"memory was \[None, None\], now \[None, None, 1024\]"):
        check_resume(tmp_path / "measurements.json", capped, job.RESUME_KEYS)
