"""graphs.files: atomic writes that follow the umask, and the checks of folders."""

import os
import stat

import pytest

from graphs.files import cache_dir, cache_dir_problem, folder_problem, write_text_atomically


def test_atomic_writes_follow_the_umask_and_leave_no_temporary(tmp_path):
    mask = os.umask(0o077)
    try:
        path = write_text_atomically(tmp_path / "a" / "plan.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "{}"
    path = write_text_atomically(tmp_path / "a" / "plan.json", "[]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["plan.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_text_atomically(tmp_path / "x.json", "old")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    from graphs.files import write_atomically
    with pytest.raises(OSError):
        write_atomically(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_folder_problem_names_what_is_wrong(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert folder_problem(a_file) == "is a file"
    assert folder_problem(a_file / "out") == f"is under the file {a_file}"
    assert folder_problem("/proc/placer") == "is on the virtual file system /proc"
    assert folder_problem("/sys/placer/x") == "is on the virtual file system /sys"


def test_the_cache_folder_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PLACER_CACHE", "~/placer-cache-test")
    assert cache_dir() == cache_dir().expanduser() and "~" not in str(cache_dir())
    a_file = tmp_path / "f"
    a_file.write_text("x")
    monkeypatch.setenv("PLACER_CACHE", str(a_file))
    kind, message = cache_dir_problem()
    assert kind == "file" and str(a_file) in message and "PLACER_CACHE" in message
    monkeypatch.setenv("PLACER_CACHE", "/proc/placer-cache")
    assert cache_dir_problem()[0] == "unwritable"
    monkeypatch.setenv("PLACER_CACHE", str(tmp_path / "cache"))
    assert cache_dir_problem() is None
