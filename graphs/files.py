"""Files: writing so that a reader (or a run killed half-way) never sees half a file,
and the one cache folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write` on a fresh temporary file beside `path`, then rename it over
    `path`: readers see the old file or the whole new one. The temporary name is
    unique, so two processes saving at once do not collide; a failed write leaves
    no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    return write_atomically(path, lambda f: f.write(text.encode()))


def cache_dir() -> Path:
    """The one folder for on-disk caches (profiles, calibrations): $PLACER_CACHE, with
    `~` expanded, or ~/.cache/placer."""
    return Path(os.environ.get("PLACER_CACHE") or Path.home() / ".cache" / "placer").expanduser()
