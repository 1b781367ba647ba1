"""What every experiment records beside its numbers, written once for all scripts.

    from _record import host_info, host_lines, record   # this folder is on sys.path when run as a script

    results = {"host": host_info(), ...}                # the host: placer.results.environment + load
    record("runtime", results, markdown)                # experiments/results/runtime.{json,md}

`host_info` says where and when the numbers were made and how busy the host was as
the run started (load average, and whether the heavy lock was held): a number is
only worth recording on a quiet host (load < 1), so a busy start is marked
`quiet: false` and the Markdown says so. `record` writes NAME.json (strict JSON) and
NAME.md atomically.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from graphs.files import write_text_atomically
from placer.results import environment, write_json

RESULTS = Path(__file__).resolve().parent / "results"
HEAVY_LOCK = "/tmp/placer-heavy.lock"
QUIET_LOAD = 1.0

__all__ = ["RESULTS", "host_info", "host_lines", "record"]


def host_info(command: str | None = None) -> dict:
    """The host (placer.results.environment: name, OS, processor, cores, torch,
    Python, placer, UTC date, command), its `platform` string, the code's git commit,
    and the 1-minute load average at the start and whether it was quiet (load < 1)."""
    command = command or shlex.join([Path(sys.executable).name, *sys.argv])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {**environment(command), "platform": platform.platform(), "commit": _commit(),
            "load_1min": load, "quiet": load is not None and load < QUIET_LOAD}


def _commit() -> str | None:
    """The checkout's commit, with "+changes" where tracked files differ from it (results are compared only
    between runs of the same code); None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def host_lines(host: dict) -> list[str]:
    """Markdown lines describing `host` (for a results file's footer)."""
    lines = [f"- host: {host.get('host')}, {host.get('processor')}, {host.get('cores')} cores",
             f"- torch {host.get('torch')}, Python {host.get('python')}, placer {host.get('placer')}",
             f"- date: {host.get('date')}, commit {host.get('commit') or 'not recorded'}",
             f"- command: `{host.get('command')}`"]
    load = host.get("load_1min")
    if load is not None:
        quiet = "quiet" if host.get("quiet") else "NOT quiet: numbers are not for the record"
        lines.append(f"- load average at the start: {load:.2f} ({quiet})")
    return lines


def record(name: str, data: dict, markdown: str, folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write folder/NAME.json (strict JSON; `data` gets a "host" if it has none) and
    folder/NAME.md; returns both paths."""
    data = {"host": host_info(), **data} if "host" not in data else data
    json_path = write_json(Path(folder) / f"{name}.json", data)
    md_path = write_text_atomically(Path(folder) / f"{name}.md", markdown.rstrip("\n") + "\n")
    return json_path, md_path
