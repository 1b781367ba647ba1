"""Files: writing so that a reader (or a run killed half-way) never sees half a file,
and the one cache folder."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write` on a fresh temporary file beside `path`, then rename it over `path`.

    Readers see the old file or the whole new one. The temporary name is unique, so two
    processes saving at once do not collide; a failed write leaves no temporary file
    behind. The file's mode follows the umask, as a plain `open()` would (mkstemp's
    own 0600 would hide plans and results from the user's group).

    Parameters
    ----------
    path : the file to (re)place; its folder is created if missing.
    write : called once with the temporary file opened for binary writing.

    Returns
    -------
    The path written.

    Raises
    ------
    OSError
        The folder cannot be created or the disk refuses the write (full, read-only);
        `path` is then unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`write_atomically` for text (UTF-8)."""
    return write_atomically(path, lambda f: f.write(text.encode()))


def cache_dir() -> Path:
    """The one folder for on-disk caches (profiles, calibrations): $PLACER_CACHE, with
    `~` expanded, or ~/.cache/placer."""
    return Path(os.environ.get("PLACER_CACHE") or Path.home() / ".cache" / "placer").expanduser()


VIRTUAL_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be (or become) a folder this process writes files in, or None.

    Nothing is created: the nearest existing ancestor is checked (a folder, writable,
    not on a virtual file system such as /proc or /sys).

    Returns
    -------
    None, or a phrase: "is a file", "is under the file F", "is on the virtual file
    system /proc", "is not writable" (or its nearest existing folder F is not).
    """
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    for root in VIRTUAL_FILE_SYSTEMS:
        if probe == Path(root) or Path(root) in probe.parents:
            return f"is on the virtual file system {root}"
    if not probe.is_dir():
        return "is a file" if probe == path else f"is under the file {probe}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
    return None


def cache_dir_problem() -> tuple[str, str] | None:
    """Why the cache folder (`cache_dir`) cannot be used, or None when it can.

    Returns
    -------
    None, or (kind, message): kind "file" when the path is (or is under) a file, so
    nothing can be cached there; "unwritable" when it cannot be written.
    """
    path = cache_dir()
    problem = folder_problem(path)
    if problem is None:
        return None
    kind = "file" if "file" in problem and "virtual" not in problem else "unwritable"
    fix = "point PLACER_CACHE to a folder, or unset it" if kind == "file" else "point PLACER_CACHE to a writable folder"
    return kind, f"the cache folder {path} {problem}: {fix}"
